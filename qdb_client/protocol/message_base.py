"""What every protocol v1 message is built on: the message kinds, the
:class:`Message` base, and :class:`Body`, the reader of a decoded body that
turns every mistake in it into a :class:`MessageError`.

The message classes are in :mod:`.messages` (handshake, requests, liveness)
and :mod:`.stream_messages` (streams and subscriptions).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from .errors import MessageError
from .frames import Frame

__all__ = [
    "MAX_ERROR_CODE",
    "MAX_UINT",
    "MAX_VERSION",
    "MIN_ERROR_CODE",
    "MIN_FRAME_LIMIT",
    "MIN_VERSION",
    "PROTOCOL_VERSIONS",
    "Body",
    "Kind",
    "Message",
    "int_text",
    "kind_name",
    "omit_none",
    "redacted",
    "redacted_auth",
]

#: Smallest max-frame size a peer may announce (room for any ERROR or GOAWAY).
MIN_FRAME_LIMIT = 1024
#: Largest value of a ``uint`` field (counts, ids, sizes, milliseconds): u64.
MAX_UINT = 2**64 - 1
#: ERROR ``code`` is a 3-digit numeric class, as in HTTP.
MIN_ERROR_CODE, MAX_ERROR_CODE = 100, 999
#: A protocol version is one byte's worth, 1..255 (HELLO ``versions``, WELCOME ``version``).
MIN_VERSION, MAX_VERSION = 1, 255

#: Protocol versions this package speaks, newest last.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)


class Kind(enum.IntEnum):
    """The message-kind byte of a frame header."""

    HELLO = 0x01
    WELCOME = 0x02
    REQUEST = 0x10
    RESPONSE = 0x11
    ERROR = 0x12
    CANCEL = 0x13
    PING = 0x20
    PONG = 0x21
    GOAWAY = 0x22
    STREAM_PAGE = 0x30
    STREAM_END = 0x31
    STREAM_CREDIT = 0x32
    EVENT = 0x40


class Body:
    """Typed access to a decoded body; every mistake is a MessageError."""

    def __init__(self, raw: Any, frame: Frame) -> None:
        self._frame = frame
        if not isinstance(raw, dict):
            self.fail(f"body must be a map, not {type(raw).__name__}")
        self._raw: dict[str, Any] = raw

    def fail(self, why: str) -> None:
        name = kind_name(self._frame.kind)
        raise MessageError(
            f"invalid {name} body: {why}",
            request_id=self._frame.request_id,
            kind=self._frame.kind,
        )

    def get(self, key: str, types: type | tuple[type, ...], default: Any = attrs.NOTHING) -> Any:
        if key not in self._raw:
            if default is attrs.NOTHING:
                self.fail(f"missing {key!r}")
            return default
        value = self._raw[key]
        # bool is an int in Python; an int field must not accept True.
        allowed = _tuple(types)
        if not isinstance(value, allowed) or (
            isinstance(value, bool) and int in allowed and bool not in allowed
        ):
            self.fail(f"{key!r} must be {_type_names(types)}, not {type(value).__name__}")
        return value

    def frame_limit(self, key: str, default: Any = attrs.NOTHING) -> Any:
        """A max-frame announcement: at least MIN_FRAME_LIMIT bytes, at most u64."""
        return self.int_in(key, MIN_FRAME_LIMIT, MAX_UINT, default, unit=" bytes")

    def count(self, key: str, default: Any = attrs.NOTHING) -> Any:
        """A ``uint`` field: an integer within 0..2**64-1."""
        return self.int_in(key, 0, MAX_UINT, default)

    def int_in(
        self, key: str, low: int, high: int, default: Any = attrs.NOTHING, *, unit: str = ""
    ) -> Any:
        """An integer field within ``low..high`` (booleans refused); absent: ``default``."""
        present = key in self._raw
        value = self.get(key, int, default)
        if not present:
            return value
        if value < low:
            if low == 0:
                self.fail(f"{key!r} must not be negative, not {int_text(value)}")
            self.fail(f"{key!r} must be at least {low}{unit}, not {int_text(value)}")
        if value > high:
            self.fail(f"{key!r} must be at most {int_text(high)}{unit}, not {int_text(value)}")
        return value


def int_text(value: int) -> str:
    """An integer for an error message, short whatever its size.

    ``str()`` of an integer above 4300 digits raises ValueError, and one of a
    few hundred digits helps nobody: past 20 digits only the size is shown.
    """
    if value == MAX_UINT:
        return "2**64-1"
    if -(10**20) < value < 10**20:
        return str(value)
    return f"{'-' if value < 0 else ''}an integer of {value.bit_length()} bits"


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _tuple(types))


def kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind {kind:#04x}"


def omit_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def redacted(value: Any) -> str:
    """``repr`` of a secret field: ``'***'`` (None shows as None)."""
    return "None" if value is None else "'***'"


def redacted_auth(value: Any) -> str:
    """``repr`` of HELLO ``auth``: the user shows, the password is ``'***'``."""
    if value is None:
        return "None"
    if not isinstance(value, Mapping):
        return "'***'"
    return repr({k: ("***" if k != "user" else v) for k, v in value.items()})


class Message:
    """Base of all message classes."""

    kind: ClassVar[Kind]
    request_id: int
    #: Integer fields and their bounds (low, high), checked before encoding so
    #: that what this side sends is what a receiver accepts (None: absent).
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {}

    def body(self) -> dict[str, Any]:
        """The CBOR map this message travels as."""
        raise NotImplementedError

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Message:
        raise NotImplementedError
