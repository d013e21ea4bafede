"""Bounds of configuration values and addresses: ConfigError, never anything else.

Every time option has a floor (no busy loops from a typo) and a ceiling of
MAX_SECONDS (no OverflowError later); addresses are parsed strictly (ASCII
port digits, bracketed IPv6, a plausible host).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import attrs
import pytest

import qdb_client
from qdb_client.config import DEFAULT_FLOOR, FLOORS, ClientConfig
from qdb_client.errors import ConfigError, InvalidArgument, QdbError
from qdb_client.testing import ServerConfig
from qdb_client.validation import (
    MAX_SECONDS,
    int_in,
    parse_address,
    positive_seconds,
    seconds_at_least,
    seconds_or_error,
    text,
)

HOSTS = ["127.0.0.1:7000"]
ROOT = Path(__file__).resolve().parents[2]

#: Every float option of ClientConfig that is a number of seconds with a floor.
TIME_OPTIONS = sorted(
    field.name
    for field in attrs.fields(ClientConfig)
    if field.type in ("float", float) and field.name in FLOORS
)


def floor_of(name: str) -> float:
    return FLOORS.get(name, DEFAULT_FLOOR)


# ------------------------------------------------------------ addresses

VALID_ADDRESSES = [
    ("localhost:7000", ("localhost", 7000)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("[::1]:65535", ("::1", 65535)),
    ("db-1.example.com:7000", ("db-1.example.com", 7000)),
    ("[fe80::1%eth0]:7000", ("fe80::1%eth0", 7000)),
    ("[::ffff:10.0.0.1]:80", ("::ffff:10.0.0.1", 80)),
    ("node_1:00080", ("node_1", 80)),
    ("a:1", ("a", 1)),
]


@pytest.mark.parametrize(("address", "expected"), VALID_ADDRESSES)
def test_valid_addresses(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


INVALID_ADDRESSES = [
    "127.0.0.1:\u00b2",  # superscript two: isdigit() is True, int() raises ValueError
    "host:\u0661\u0662",  # Arabic-Indic digits: int() accepted them as port 12
    "host:\uff11",  # fullwidth digit one
    "[::1",  # unbalanced bracket
    "[::1]",  # no port
    "[::1]x:80",  # junk between ']' and ':'
    "[::1]:",
    "[]:80",
    "[localhost]:80",  # brackets are for IPv6 literals
    "[::1]]:80",
    "::1:7000",  # an IPv6 host must be bracketed
    "fe80::1:80",
    "host]:80",
    "ho st:80",  # whitespace
    " host:80",
    "host\t:80",
    "host\x00:80",  # control characters
    "host\n:80",
    "host\u200b:80",  # zero-width space (not printable)
    ":80",  # empty host
    "host:",  # empty port
    "host",
    "",
    "host:123456",  # more than 5 digits
    "host:0000080",
    "host:0",
    "host:65536",
    "host:99999",
    "host:-1",
    "host:+80",
    "host: 80",
    "host:80 ",
    "host:8_0",
    "a/b:80",
    "user@host:80",
    "h" * 254 + ":80",
]


@pytest.mark.parametrize("address", INVALID_ADDRESSES, ids=repr)
def test_invalid_addresses_are_config_errors(address: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(address)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    "value", [None, 7000, b"host:80", ["a:1"], 10**5000], ids=lambda v: type(v).__name__
)
def test_non_text_addresses_are_config_errors(value: Any) -> None:
    with pytest.raises(ConfigError):
        parse_address(value)


def test_addresses_in_config_and_server_config() -> None:
    with pytest.raises(ConfigError):
        ClientConfig(hosts=["127.0.0.1:\u00b2"])
    with pytest.raises(ConfigError):
        ClientConfig(hosts=["::1:7000"])
    assert ClientConfig(hosts=["[::1]:7000"]).hosts == ("[::1]:7000",)
    with pytest.raises(ConfigError):
        ServerConfig(peers=["host:\u0661\u0662"])


# ------------------------------------------------------- seconds helper


@pytest.mark.parametrize("value", [1, 0.5, 1e-9, MAX_SECONDS, float(MAX_SECONDS), 10**6])
def test_seconds_or_error_accepts(value: float) -> None:
    result = seconds_or_error(value, name="t")
    assert isinstance(result, float) and result == value


BAD_SECONDS = [
    0,
    -1,
    -0.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    1e306,
    MAX_SECONDS + 1,
    MAX_SECONDS * 1.0000001,
    10**400,  # float() of it would raise OverflowError
    10**5000,  # str() of it would raise ValueError
    -(10**5000),
    True,
    False,
    "5",
    None,
    [1],
    1j,
]


@pytest.mark.parametrize("value", BAD_SECONDS, ids=lambda v: type(v).__name__)
def test_seconds_or_error_refuses(value: Any) -> None:
    with pytest.raises(ConfigError, match="timeout") as info:
        seconds_or_error(value, name="timeout")
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("value", BAD_SECONDS, ids=lambda v: type(v).__name__)
def test_seconds_or_error_raises_the_chosen_class(value: Any) -> None:
    """The client's per-call ``timeout=`` uses it with InvalidArgument."""
    with pytest.raises(InvalidArgument, match="timeout"):
        seconds_or_error(value, name="timeout", error=InvalidArgument)


def test_seconds_or_error_minimum_and_maximum() -> None:
    assert seconds_or_error(0.05, name="t", minimum=0.05) == 0.05
    with pytest.raises(ConfigError, match=r"from 0\.05 to 1000000 seconds"):
        seconds_or_error(0.049, name="t", minimum=0.05)
    with pytest.raises(ConfigError, match="at most 10"):
        seconds_or_error(11, name="t", maximum=10)


def test_validators_never_raise_anything_but_config_error() -> None:
    attribute = attrs.fields(ServerConfig).client_idle_timeout
    for validator in (positive_seconds, seconds_at_least(1.0), int_in(0, 10), text):
        for value in BAD_SECONDS:
            try:
                validator(None, attribute, value)
            except ConfigError:
                pass
    with pytest.raises(ConfigError):
        int_in(0, 10)(None, attribute, 10**5000)


# ---------------------------------------------------------- client config


def test_every_time_option_has_a_floor() -> None:
    """Each float option validated as seconds is listed in FLOORS."""
    assert set(TIME_OPTIONS) >= {
        "heartbeat_interval",
        "suspect_interval",
        "ping_timeout",
        "reconnect_initial",
        "retry_initial_backoff",
        "min_attempt_time",
        "connect_timeout",
        "pool_acquire_timeout",
        "request_timeout",
        "node_selection_timeout",
        "breaker_open_timeout",
        "idle_timeout",
        "max_lifetime",
        "close_timeout",
        "retry_budget_window",
    }


def test_the_floors_chosen() -> None:
    assert FLOORS["heartbeat_interval"] == 0.05
    assert FLOORS["suspect_interval"] == 0.05
    assert FLOORS["ping_timeout"] == 0.01
    assert FLOORS["reconnect_initial"] == 0.01
    assert FLOORS["retry_initial_backoff"] == 0.001
    assert FLOORS["min_attempt_time"] == 0.001
    assert FLOORS["connect_timeout"] == 0.01
    assert FLOORS["pool_acquire_timeout"] == 0.001
    assert FLOORS["request_timeout"] == 0.001
    assert FLOORS["node_selection_timeout"] == 0.001
    assert FLOORS["breaker_open_timeout"] == 0.01
    assert FLOORS["idle_timeout"] == 0.1
    assert FLOORS["max_lifetime"] == 0.1
    assert FLOORS["close_timeout"] == 0.001
    assert FLOORS["retry_budget_window"] == 1


def test_heartbeat_of_a_microsecond_is_refused() -> None:
    """The original report: 1e-6 was accepted and sent ~1,500 PINGs a second."""
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        ClientConfig(hosts=HOSTS, heartbeat_interval=1e-6)


@pytest.mark.parametrize("name", TIME_OPTIONS)
def test_time_options_floor(name: str) -> None:
    floor = floor_of(name)
    related = _related(name, floor)
    assert getattr(ClientConfig(hosts=HOSTS, **{name: floor}, **related), name) == floor
    with pytest.raises(ConfigError, match=name):
        ClientConfig(hosts=HOSTS, **{name: floor * 0.99}, **related)


@pytest.mark.parametrize("name", TIME_OPTIONS)
@pytest.mark.parametrize(
    "value",
    [1e306, MAX_SECONDS + 0.5, 10**400, 10**5000, float("inf"), float("nan"), -1, 0, True, "1"],
    ids=lambda v: type(v).__name__ if not isinstance(v, float) else repr(v),
)
def test_time_options_ceiling_and_junk(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=name) as info:
        ClientConfig(hosts=HOSTS, **{name: value})
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("name", TIME_OPTIONS)
def test_time_options_accept_the_ceiling(name: str) -> None:
    related = _related(name, MAX_SECONDS)
    assert getattr(ClientConfig(hosts=HOSTS, **{name: MAX_SECONDS}, **related), name) == MAX_SECONDS


def _related(name: str, value: float) -> dict[str, float]:
    """Options that must be ordered with ``name`` (max >= initial)."""
    if name == "reconnect_initial":
        return {"reconnect_max": max(value, 30.0)}
    if name == "reconnect_max":
        return {"reconnect_initial": min(value, 1.0)}
    if name == "retry_initial_backoff":
        return {"retry_max_backoff": max(value, 5.0)}
    if name == "retry_max_backoff":
        return {"retry_initial_backoff": min(value, 0.1)}
    return {}


@pytest.mark.parametrize(
    "value", [1e306, 10**5000, -1, math.inf, math.nan], ids=["1e306", "huge", "-1", "inf", "nan"]
)
def test_slow_start_is_bounded(value: Any) -> None:
    with pytest.raises(ConfigError, match="slow_start"):
        ClientConfig(hosts=HOSTS, slow_start=value)
    assert ClientConfig(hosts=HOSTS, slow_start=0).slow_start == 0
    assert ClientConfig(hosts=HOSTS, slow_start=MAX_SECONDS).slow_start == MAX_SECONDS


@pytest.mark.parametrize(
    "options",
    [
        {"max_in_flight": 10**5000},
        {"max_retries": -(10**5000)},
        {"reconnect_multiplier": 10**5000},
        {"retry_jitter_factor": 10**400},
        {"client_name": 10**5000},
        {"load_balancing": 10**5000},
        {"retry_jitter": 10**5000},
        {"discover_members": 10**5000},
    ],
    ids=lambda o: next(iter(o)),
)
def test_huge_integers_anywhere_are_config_errors(options: dict[str, Any]) -> None:
    """A message that printed ``10**5000`` used to raise ValueError instead."""
    with pytest.raises(ConfigError) as info:
        ClientConfig(hosts=HOSTS, **options)
    assert len(str(info.value)) < 300


def test_huge_hosts_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        ClientConfig(hosts=10**5000)


def test_config_errors_are_qdb_errors() -> None:
    assert issubclass(ConfigError, QdbError)


def test_server_config_seconds_are_bounded_too() -> None:
    for value in (1e306, 10**5000, MAX_SECONDS + 1):
        with pytest.raises(ConfigError, match="client_idle_timeout"):
            ServerConfig(client_idle_timeout=value)
    assert ServerConfig(client_idle_timeout=0.3).client_idle_timeout == 0.3


# ------------------------------------------------------------------- docs


def test_floors_are_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text("utf-8")
    for name, floor in FLOORS.items():
        assert re.search(rf"\| `{name}` \| {floor:g} \|", doc), name
    assert "10^6" in doc


def test_open_client_refuses_a_busy_heartbeat() -> None:
    with pytest.raises(ConfigError):
        qdb_client.ClientConfig.from_options(HOSTS, heartbeat_interval=1e-6)
