"""Validators for attrs configuration classes: the client's and the test node's.

Public so that configurations built on the driver (the test node's, an
application's own) validate values the same way. Pure helpers, no driver
logic: each raises :class:`~qdb_client.errors.ConfigError` naming the field
and what it accepts (or, for :func:`seconds_or_error`, the error class the
caller chooses, e.g. InvalidArgument for a call's ``timeout=``). No value,
however large or strange, makes them raise anything else.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Any

import attrs

from .errors import ConfigError, QdbError

__all__ = [
    "MAX_SECONDS",
    "boolean",
    "int_in",
    "parse_address",
    "positive_seconds",
    "seconds_at_least",
    "seconds_or_error",
    "text",
]

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]

#: Longest duration any option or call accepts, in seconds (about 11.6 days).
#: Far above any sane timeout or interval, and low enough that every
#: computation on it (milliseconds for the wire, deadlines, backoff) stays
#: exact and finite.
MAX_SECONDS = 10**6

#: A port: 1 to 5 ASCII digits (``str.isdigit`` also accepts superscripts and Arabic-Indic digits).
_PORT = re.compile(r"[0-9]{1,5}")
#: Longest host name (RFC 1035: 253 characters in text form).
_MAX_HOST_LENGTH = 253
#: Characters that never appear in a host name or IPv4 address.
_NOT_IN_HOST = frozenset("[]/\\@?#%,;\"'<>`{}|^")


def parse_address(address: str) -> tuple[str, int]:
    """Split ``"host:port"`` (or ``"[v6]:port"``) into host and port, or raise ConfigError.

    The port is 1 to 5 ASCII digits within 1..65535. An IPv6 host must be
    bracketed (``"[::1]:7000"``) and is returned without the brackets. A
    host is not empty, at most 253 characters, and holds no whitespace,
    control character or URL punctuation.
    """
    if not isinstance(address, str):
        raise ConfigError(f"address must be a 'host:port' string, not {_show(address)}")
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ConfigError(f"address {_show(address)} has an unbalanced '['")
        host, rest = address[1:close], address[close + 1 :]
        if not rest.startswith(":"):
            raise ConfigError(
                f"address {_show(address)} must be '[ipv6]:port': ':port' must follow the ']'"
            )
        port_text = rest[1:]
        _check_ipv6(address, host)
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ConfigError(f"address {_show(address)} is not of the form 'host:port'")
        if ":" in host:
            raise ConfigError(
                f"address {_show(address)}: an IPv6 host must be bracketed, as in '[::1]:7000'"
            )
        _check_host(address, host)
    if not _PORT.fullmatch(port_text):
        raise ConfigError(
            f"address {_show(address)} must end in ':port', the port 1 to 5 digits 0-9"
        )
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"address {_show(address)} has port {port}, outside 1..65535")
    return host, port


def _check_host(address: str, host: str) -> None:
    if not host:
        raise ConfigError(f"address {_show(address)} has an empty host")
    if len(host) > _MAX_HOST_LENGTH:
        raise ConfigError(
            f"address {_show(address)} has a host longer than {_MAX_HOST_LENGTH} characters"
        )
    for char in host:
        if char.isspace() or not char.isprintable() or char in _NOT_IN_HOST:
            raise ConfigError(
                f"address {_show(address)} has a host with the character {char!r},"
                " which no host name contains"
            )


def _check_ipv6(address: str, host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ConfigError(
            f"address {_show(address)}: {_show(host)} between brackets is not an IPv6 address"
        ) from None


# ----------------------------------------------------------------- seconds


def seconds_or_error(
    value: Any,
    *,
    name: str,
    error: type[QdbError] = ConfigError,
    minimum: float = 0.0,
    maximum: float = MAX_SECONDS,
) -> float:
    """``value`` as a float number of seconds, or raise ``error`` saying why.

    Accepts an int or float (not a bool) that is finite, positive, at least
    ``minimum`` and at most ``maximum`` (default :data:`MAX_SECONDS`). The
    message names ``name`` and the accepted range. Use it for call-site
    timeouts too: ``seconds_or_error(timeout, name="timeout",
    error=InvalidArgument)``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number of seconds, not {_show(value)}")
    # Compared before any conversion: float() of a huge int overflows, and
    # NaN fails every comparison, so it is refused here too.
    if not (value > 0 and value >= minimum and value <= maximum):
        if minimum > 0:
            wanted = f"from {_number(minimum)} to {_number(maximum)} seconds"
        else:
            wanted = f"a positive number of seconds, at most {_number(maximum)}"
        raise error(f"{name} must be {wanted}, not {_show(value)}")
    return float(value)


def seconds_at_least(minimum: float, maximum: float = MAX_SECONDS) -> Validator:
    """A number of seconds within ``minimum..maximum`` (a floor against busy loops)."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        seconds_or_error(value, name=attribute.name, minimum=minimum, maximum=maximum)

    return check


def positive_seconds(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A positive, finite number of seconds, at most :data:`MAX_SECONDS`."""
    seconds_or_error(value, name=attribute.name)


# ------------------------------------------------------------------- other


def int_in(low: int, high: int) -> Validator:
    """An integer within ``low..high`` (booleans refused)."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{attribute.name} must be an integer, not {_show(value)}")
        if not low <= value <= high:
            raise ConfigError(f"{attribute.name} must be within {low}..{high}, not {_show(value)}")

    return check


def text(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{attribute.name} must be a non-empty string, not {_show(value)}")


def boolean(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """True or False (not merely truthy)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{attribute.name} must be True or False, not {_show(value)}")


def _number(value: float) -> str:
    """0.05 as "0.05", 10**6 as "1000000" (not "1e+06")."""
    return f"{float(value):.15g}"


def _show(value: Any, limit: int = 80) -> str:
    """A value for an error message: short, and never raising.

    ``repr`` of an integer above 4300 digits raises ValueError, and a
    hostile object's ``repr`` may raise anything.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 132:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, float) and not math.isfinite(value):
        return float.__repr__(value)
    try:
        shown = repr(value)
    except Exception:
        return f"a {type(value).__name__}"
    if not isinstance(shown, str):
        return f"a {type(value).__name__}"
    return shown if len(shown) <= limit else shown[:limit] + "..."
