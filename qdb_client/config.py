"""Configuration of the driver: attrs classes validated at construction.

A bad value raises :class:`~qdb_client.errors.ConfigError` naming the option
and what it accepts, before any connection is attempted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs

from .errors import ConfigError
from .protocol.frames import HEADER_SIZE

__all__ = ["ClientConfig", "Credentials", "parse_address"]


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into host and port, or raise ConfigError."""
    if not isinstance(address, str):
        raise ConfigError(f"address must be a 'host:port' string, not {type(address).__name__}")
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"address {address!r} is not of the form 'host:port'")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"address {address!r} has port {port}, outside 1..65535")
    return host, port


def _positive_seconds(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{attribute.name} must be a number of seconds, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(
            f"{attribute.name} must be a positive finite number of seconds, not {value!r}"
        )


def _int_in(low: int, high: int) -> Any:
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{attribute.name} must be an integer, not {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"{attribute.name} must be within {low}..{high}, not {value}")

    return check


def _text(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{attribute.name} must be a non-empty string, not {value!r}")


def _hosts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable):
        raise ConfigError(f"hosts must be 'host:port' strings, not {value!r}")
    hosts = tuple(value)
    if not hosts:
        raise ConfigError("hosts must name at least one 'host:port'")
    for host in hosts:
        parse_address(host)
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"hosts lists an address twice: {list(hosts)}")
    return hosts


@attrs.frozen(kw_only=True)
class Credentials:
    """User name and password sent in the handshake."""

    user: str = attrs.field(validator=_text)
    password: str = attrs.field(repr=False, validator=attrs.validators.instance_of(str))


def _credentials(value: Any) -> Credentials | None:
    if value is None or isinstance(value, Credentials):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return Credentials(user=value[0], password=value[1])
    raise ConfigError("credentials must be a Credentials or a (user, password) tuple")


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Everything :func:`qdb_client.open_client` can be told.

    Defaults, and the reference each follows:

    ========================  ===========  ==========================================
    option                    default      why
    ========================  ===========  ==========================================
    connect_timeout           5.0 s        TCP connect plus handshake; Rust SDK seed
                                           acquire timeout (5000 ms)
    request_timeout           5.0 s        backend request timeout of seed 000
    max_frame_size            1 MiB        seed 001 repository default
    max_in_flight             256          requests multiplexed on one connection;
                                           lowered to the node's WELCOME limit
    close_timeout             2.0 s        grace for closing connections on exit
    ========================  ===========  ==========================================
    """

    hosts: tuple[str, ...] = attrs.field(converter=_hosts)
    connect_timeout: float = attrs.field(default=5.0, validator=_positive_seconds)
    request_timeout: float = attrs.field(default=5.0, validator=_positive_seconds)
    max_frame_size: int = attrs.field(default=1024 * 1024, validator=_int_in(4096, 2**31 - 1))
    max_in_flight: int = attrs.field(default=256, validator=_int_in(1, 65536))
    close_timeout: float = attrs.field(default=2.0, validator=_positive_seconds)
    credentials: Credentials | None = attrs.field(default=None, converter=_credentials)
    client_name: str = attrs.field(default="qdb_client", validator=_text)

    @classmethod
    def from_options(cls, hosts: Any, **options: Any) -> ClientConfig:
        """Build a config from keyword options; an unknown option is a ConfigError."""
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown}; known options: {sorted(known - {'hosts'})}"
            )
        return cls(hosts=hosts, **options)


assert HEADER_SIZE < 4096  # max_frame_size's lower bound leaves room for any header
