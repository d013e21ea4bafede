"""Validators for attrs configuration classes: the client's and the test node's.

Public so that configurations built on the driver (the test node's, an
application's own) validate values the same way. Pure helpers, no driver
logic: each raises :class:`~qdb_client.errors.ConfigError` naming the field
and what it accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs

from .errors import ConfigError

__all__ = ["boolean", "int_in", "parse_address", "positive_seconds", "text"]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


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


def positive_seconds(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A positive, finite number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{attribute.name} must be a number of seconds, not {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(
            f"{attribute.name} must be a positive finite number of seconds, not {value!r}"
        )


def int_in(low: int, high: int) -> Validator:
    """An integer within ``low..high`` (booleans refused)."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{attribute.name} must be an integer, not {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"{attribute.name} must be within {low}..{high}, not {value}")

    return check


def text(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{attribute.name} must be a non-empty string, not {value!r}")


def boolean(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """True or False (not merely truthy)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be True or False, not {value!r}")
