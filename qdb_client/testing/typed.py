"""Typed SQL values on the test node (docs/protocol.md section 10.1): parameters in, rows out.

**Parameters.** The node reads REQUEST arguments with its own tag handling
(:mod:`.wire`): every CBOR tag but the bignums arrives as a :class:`Tagged`
value, not yet interpreted. :func:`bind_value` checks one parameter and turns
a typed one into a :class:`TypedParam`: the text SQLite stores (ISO 8601 for
date-times, dates and times, exact decimal text, the canonical UUID, the JSON
text as sent), which the ``sqlite3`` module binds as text. A value the
protocol does not carry (an untagged array or map, an unknown tag, a
date-time without an offset, a JSON text that does not parse, an integer
outside 64 bits) raises :class:`BadValue` with the reason; the caller answers
INVALID_REQUEST with ``details.parameter``. For a request's identity
(idempotency keys) a typed parameter counts as its tag and text, so
``Decimal("1.5")`` and the text ``"1.5"`` are different requests.

**Rows.** :func:`converters` maps each result column's declared type (its
first word, upper-cased: :func:`type_name`) to a conversion of the stored
value, applied while rows are fetched: ``TIMESTAMP``/``TIMESTAMPTZ``/
``DATETIME`` text to a date-time (tag 0), ``DATE`` to a date (tag 1004),
``TIME`` to a time of day (tag 1008), ``DECIMAL``/``NUMERIC`` to a decimal
(tag 4), ``UUID`` to a UUID (tag 37), ``JSON`` text to embedded JSON (tag
262). A stored value that does not parse as its column's type comes back as
stored. SQLite gives these declared types NUMERIC affinity, which stores a
decimal's text that reads as a number as INTEGER or REAL (15 significant
digits): such a value comes back as the decimal of that number, padded with
zeros to the declared scale (``DECIMAL(10,2)``) when that is exact.
"""

from __future__ import annotations

import datetime
import decimal
import json
import re
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import cbor2

__all__ = [
    "DATETIME_TAG",
    "DATE_TAG",
    "DECIMAL_TAG",
    "JSON_TAG",
    "TIME_TAG",
    "UUID_TAG",
    "BadValue",
    "Tagged",
    "TypedParam",
    "bind_value",
    "converters",
    "encoded_at_least",
    "identity_default",
    "type_name",
]

DATETIME_TAG = 0
DECIMAL_TAG = 4
UUID_TAG = 37
JSON_TAG = 262
DATE_TAG = 1004
TIME_TAG = 1008

_MIN_INT, _MAX_INT = -(2**63), 2**63 - 1
#: Largest decimal mantissa accepted (digits) and exponent (either sign).
_MAX_DIGITS = 1000
_MAX_MANTISSA = 10**_MAX_DIGITS
_MAX_EXPONENT = 1_000_000
#: Exponents within this range are stored in positional notation ("12.50").
_POSITIONAL = 100
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_DECIMAL_TEXT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,7})?")
_UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_SCALE = re.compile(r"\(\s*\d+\s*,\s*(\d+)\s*\)")
_TYPE_WORD = re.compile(r"\s*([^\s(]+)")
#: Longest type name reported in ``types`` (the driver accepts 64 characters).
_MAX_TYPE_NAME = 64
_EXACT = decimal.Context(prec=_MAX_DIGITS + 100, traps=[decimal.Inexact, decimal.InvalidOperation])


class BadValue(ValueError):
    """A parameter the protocol does not carry; ``str()`` says why."""


@attrs.frozen
class Tagged:
    """A tagged CBOR value as a REQUEST carried it, not interpreted yet (see :mod:`.wire`)."""

    tag: int
    value: Any


@attrs.frozen
class TypedParam:
    """A typed parameter in the form SQLite stores: ``text``, from a value of CBOR ``tag``."""

    tag: int
    text: str


# sqlite3 binds a TypedParam as its text (this class only: no other type is affected).
sqlite3.register_adapter(TypedParam, lambda param: param.text)


def identity_default(encoder: Any, value: Any) -> None:
    """cbor2 ``default`` hook for request hashes: a TypedParam counts as its tag and text."""
    if isinstance(value, TypedParam):
        encoder.encode(cbor2.CBORTag(value.tag, value.text))
        return
    raise cbor2.CBOREncodeError(f"cannot hash a {type(value).__name__}")


# ------------------------------------------------------------------ parameters


def _datetime(value: Any) -> str:
    if type(value) is not str or len(value) > 64:
        raise BadValue("a date-time (tag 0) must be RFC 3339 text")
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise BadValue(f"{value!r} is not an RFC 3339 date-time (tag 0)") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise BadValue(f"the date-time {value!r} has no offset (a naive date-time is ambiguous)")
    return parsed.isoformat()


def _date(value: Any) -> str:
    if type(value) is not str or not _DATE.fullmatch(value):
        raise BadValue("a date (tag 1004) must be YYYY-MM-DD text")
    try:
        return datetime.date.fromisoformat(value).isoformat()
    except ValueError:
        raise BadValue(f"{value!r} is not a date (tag 1004)") from None


def _time(value: Any) -> str:
    if type(value) is not str or len(value) > 32:
        raise BadValue("a time of day (tag 1008) must be HH:MM:SS[.ffffff] text")
    try:
        parsed = datetime.time.fromisoformat(value)
    except ValueError:
        raise BadValue(f"{value!r} is not a time of day (tag 1008)") from None
    if parsed.tzinfo is not None:
        raise BadValue("a time of day (tag 1008) has no time zone")
    return parsed.isoformat()


def _decimal(value: Any) -> str:
    if not (
        type(value) is list
        and len(value) == 2
        and all(type(part) is int for part in value)
        and abs(value[0]) <= _MAX_EXPONENT
    ):
        raise BadValue("a decimal (tag 4) must be [exponent, mantissa], two integers")
    exponent, mantissa = value
    if abs(mantissa) >= _MAX_MANTISSA:
        raise BadValue(f"a decimal (tag 4) may have at most {_MAX_DIGITS} digits")
    digits = tuple(int(d) for d in str(abs(mantissa)))
    number = decimal.Decimal((1 if mantissa < 0 else 0, digits, exponent))
    if -_POSITIONAL <= exponent <= _POSITIONAL:
        return format(number, "f")
    return str(number)


def _uuid(value: Any) -> str:
    if type(value) is not bytes or len(value) != 16:
        raise BadValue("a UUID (tag 37) must be 16 bytes")
    return str(uuid.UUID(bytes=value))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(value: Any) -> str:
    if type(value) is not bytes:
        raise BadValue("embedded JSON (tag 262) must be a byte string")
    try:
        text = value.decode("utf-8")
        json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise BadValue(f"the JSON text (tag 262) does not parse: {exc}") from None
    return text


_BINDERS: dict[int, Callable[[Any], str]] = {
    DATETIME_TAG: _datetime,
    DECIMAL_TAG: _decimal,
    UUID_TAG: _uuid,
    JSON_TAG: _json,
    DATE_TAG: _date,
    TIME_TAG: _time,
}


def bind_value(value: Any) -> Any:
    """``value`` as the node binds it: plain values as they are, a :class:`Tagged`
    value of section 10.1 as a :class:`TypedParam`. :class:`BadValue` otherwise."""
    if value is None or type(value) in (bool, float, str, bytes):
        return value
    if type(value) is int:
        if not _MIN_INT <= value <= _MAX_INT:
            # Never str() of the value: above 4300 digits that raises ValueError.
            shown = str(value) if -(10**20) < value < 10**20 else f"of {value.bit_length()} bits"
            raise BadValue(f"integer {shown} does not fit in 64 bits")
        return value
    if isinstance(value, Tagged):
        binder = _BINDERS.get(value.tag)
        if binder is None:
            raise BadValue(f"CBOR tag {value.tag} is not a SQL value of this protocol")
        return TypedParam(value.tag, binder(value.value))
    if isinstance(value, (list, dict)):
        raise BadValue(
            f"an untagged {'array' if isinstance(value, list) else 'map'} can't be bound"
            " (embedded JSON is tag 262)"
        )
    raise BadValue(
        f"a {type(value).__name__} can't be bound (use null, bool, int, float, text, bytes"
        " or a typed value of section 10.1)"
    )


# ------------------------------------------------------------------------ rows


def type_name(decltype: str | None) -> str | None:
    """The declared type's first word in upper case (None without a declared type)."""
    if not decltype:
        return None
    match = _TYPE_WORD.match(decltype)
    if match is None:
        return None
    return match.group(1).upper()[:_MAX_TYPE_NAME]


def _to_datetime(value: Any) -> Any:
    if type(value) is str and len(value) <= 64:
        try:
            parsed = datetime.datetime.fromisoformat(value)
        except ValueError:
            return value
        if parsed.tzinfo is not None and parsed.utcoffset() is not None:
            return parsed
    return value


def _to_date(value: Any) -> Any:
    if type(value) is str and _DATE.fullmatch(value):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError:
            pass
    return value


def _to_time(value: Any) -> Any:
    if type(value) is str and len(value) <= 32:
        try:
            parsed = datetime.time.fromisoformat(value)
        except ValueError:
            return value
        if parsed.tzinfo is None:
            return cbor2.CBORTag(TIME_TAG, parsed.isoformat())
    return value


def _decimal_reader(decltype: str) -> Callable[[Any], Any]:
    match = _SCALE.search(decltype)
    scale = int(match.group(1)) if match is not None and len(match.group(1)) <= 3 else None

    def to_decimal(value: Any) -> Any:
        if type(value) is str:
            if len(value) > 2 * _MAX_DIGITS or not _DECIMAL_TEXT.fullmatch(value):
                return value
            return decimal.Decimal(value)  # stored as text: exact, as it is
        if type(value) is int:
            number = decimal.Decimal(value)
        elif type(value) is float and value == value and abs(value) != float("inf"):
            number = decimal.Decimal(repr(value))
        else:
            return value
        # SQLite's NUMERIC affinity kept a number, not the text: give back the declared scale.
        exponent = number.as_tuple().exponent
        if scale is not None and isinstance(exponent, int) and -exponent < scale:
            try:
                return number.quantize(decimal.Decimal(1).scaleb(-scale), context=_EXACT)
            except decimal.DecimalException:
                return number
        return number

    return to_decimal


def _to_uuid(value: Any) -> Any:
    if type(value) is str and _UUID_TEXT.fullmatch(value):
        return uuid.UUID(value)
    return value


def _to_json(value: Any) -> Any:
    if type(value) is str:
        try:
            json.loads(value, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            return value
        return cbor2.CBORTag(JSON_TAG, value.encode("utf-8"))
    return value  # a JSON number SQLite's affinity stored as one, null, or bytes


_READERS: dict[str, Callable[[Any], Any]] = {
    "TIMESTAMP": _to_datetime,
    "TIMESTAMPTZ": _to_datetime,
    "DATETIME": _to_datetime,
    "DATE": _to_date,
    "TIME": _to_time,
    "UUID": _to_uuid,
    "JSON": _to_json,
}


def converters(decltypes: Sequence[str | None]) -> list[Callable[[Any], Any] | None] | None:
    """One conversion per column (None: as stored), or None when no column has one."""
    out: list[Callable[[Any], Any] | None] = []
    for decltype in decltypes:
        name = type_name(decltype)
        if name in ("DECIMAL", "NUMERIC"):
            assert decltype is not None
            out.append(_decimal_reader(decltype))
        else:
            out.append(_READERS.get(name) if name is not None else None)
    return out if any(c is not None for c in out) else None


def encoded_at_least(value: Any) -> int:
    """A lower bound of the size of a row value in CBOR (text counts a byte a character)."""
    if isinstance(value, (bytes, str)):
        return len(value) + 1
    if isinstance(value, cbor2.CBORTag) and isinstance(value.value, (bytes, str)):
        return len(value.value) + 2
    return 1
