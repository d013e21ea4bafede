"""The checks and conversions of :class:`~qdb_client.config.ClientConfig`'s
fields (each raises ConfigError naming the option and what it accepts), and
the :class:`Credentials` they build.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

import attrs

from .errors import ConfigError
from .uri import Secret, is_uri, split_hosts
from .validation import _show, parse_address, seconds_at_least, text

__all__ = [
    "DEFAULT_FLOOR",
    "FLOORS",
    "JITTER_MODES",
    "LOAD_BALANCING",
    "Credentials",
    "check_number",
    "check_optional_hostname",
    "check_tls",
    "seconds_option",
    "to_credentials",
    "to_hosts",
    "to_listeners",
    "to_secret",
]

#: The smallest value of each time option, in seconds (docs/configuration.md
#: gives the reason for each). Every time option is at most MAX_SECONDS.
#: A floor keeps a typo (``heartbeat_interval=1e-6``) from turning a
#: background loop into a busy loop, and a timeout from expiring before a
#: round trip could possibly complete.
FLOORS: dict[str, float] = {
    "connect_timeout": 0.01,
    "request_timeout": 0.001,
    "close_timeout": 0.001,
    "idle_timeout": 0.1,
    "max_lifetime": 0.1,
    "pool_acquire_timeout": 0.001,
    "heartbeat_interval": 0.05,
    "ping_timeout": 0.01,
    "suspect_interval": 0.05,
    "reconnect_initial": 0.01,
    "reconnect_max": 0.01,
    "node_selection_timeout": 0.001,
    "retry_initial_backoff": 0.001,
    "retry_max_backoff": 0.001,
    "min_attempt_time": 0.001,
    "retry_budget_window": 1.0,
    "breaker_open_timeout": 0.01,
    "attempt_timeout_min": 0.001,
    "hedge_delay": 0.001,
    "forget_members_after": 0.01,
}
#: Floor of a time option not listed in FLOORS.
DEFAULT_FLOOR = 0.001


def seconds_option(name: str) -> Any:
    """Validator of the time option ``name``: FLOORS[name] .. MAX_SECONDS."""
    return seconds_at_least(FLOORS.get(name, DEFAULT_FLOOR))


#: Names accepted by ``retry_jitter``.
JITTER_MODES = frozenset({"none", "proportional", "full", "decorrelated"})


def check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number within {low}..{high}, not {_show(value)}")


#: Names accepted by ``load_balancing``.
LOAD_BALANCING = frozenset({"round_robin", "latency_aware"})


def to_hosts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        if is_uri(value):
            raise ConfigError(
                "hosts is a URI: pass it to open_client() or ClientConfig.from_uri(),"
                " which read its options and credentials too"
            )
        # "h1:7000,h2:7001" is several hosts; whitespace around each is ignored.
        return split_hosts(value, what="hosts")
    if not isinstance(value, Iterable):
        raise ConfigError(f"hosts must be 'host:port' strings, not {_show(value)}")
    hosts = tuple(value)
    if not hosts:
        raise ConfigError("hosts must name at least one 'host:port'")
    for number, host in enumerate(hosts, 1):
        if isinstance(host, str) and "@" in host:  # never echoed: it may hold a password
            raise ConfigError(
                f"host {number} of hosts holds an '@': user:password@ belongs in a qdb:// URI"
            )
        parse_address(host)
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"hosts lists an address twice: {_show(list(hosts), 400)}")
    return hosts


def to_secret(value: Any) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


@attrs.frozen(kw_only=True)
class Credentials:
    """User name and password sent in the handshake.

    ``Credentials(user="ada", password="...")``. The password is kept as a
    :class:`~qdb_client.uri.Secret`: it never shows in ``repr``, and
    ``attrs.asdict`` of a config holds the ``Secret``, not the text.
    ``credentials.password`` returns the text.
    """

    user: str = attrs.field(validator=text)
    _password: Secret = attrs.field(alias="password", converter=to_secret, repr=False)

    @property
    def password(self) -> str:
        """The password itself (to send in HELLO; never log it)."""
        return self._password.reveal()


def check_tls(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, (bool, ssl.SSLContext)):
        raise ConfigError(
            "tls must be False, True (the system's trusted certificate authorities)"
            f" or an ssl.SSLContext, not {_show(value)}"
        )


def check_optional_hostname(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 253
        or any(c.isspace() or not c.isprintable() for c in value)
    ):
        raise ConfigError(
            f"tls_server_hostname must be a host name or address (text), not {_show(value)}"
        )


def to_listeners(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if callable(value) or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError("listeners must be a list of callables (each taking one event)")
    listeners = tuple(value)
    for listener in listeners:
        if not callable(listener):
            raise ConfigError(
                f"listeners must be callables taking one event, not {_show(listener)}"
            )
    return listeners


def to_credentials(value: Any) -> Credentials | None:
    if value is None or isinstance(value, Credentials):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return Credentials(user=value[0], password=value[1])
    raise ConfigError("credentials must be a Credentials or a (user, password) tuple")
