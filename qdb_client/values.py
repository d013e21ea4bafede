"""The values a statement can bind, checked at the call site and put on the wire.

=====================  ==========================  ==============================
Python value           on the wire (CBOR)          comes back (by declared type)
=====================  ==========================  ==============================
None, bool, float,     as is                       as is
str, bytes
int                    integer (signed 64-bit)     int
bytearray, memoryview  bytes                       bytes
datetime (aware)       tag 0, RFC 3339 text        datetime (``TIMESTAMP``)
date                   tag 1004, full-date text    date (``DATE``)
time                   tag 1008, ``HH:MM:SS.ffff``  time (``TIME``)
Decimal (finite)       tag 4, decimal fraction     Decimal (``DECIMAL``/``NUMERIC``)
UUID                   tag 37, 16 bytes            UUID (``UUID``)
Json(value)            tag 262, UTF-8 JSON text    the parsed value (``JSON``)
=====================  ==========================  ==============================

Anything else (a naive datetime, an int outside 64 bits, a NaN Decimal,
sets, complex numbers, arbitrary objects, and lists or dicts not wrapped in
:class:`Json`) is :class:`~qdb_client.errors.InvalidArgument` at the call
site, and nothing is sent. docs/types.md has the table with the SQLite
storage of each.
"""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import cbor2

from .errors import InvalidArgument
from .protocol.codec import JSON_TAG, TIME_TAG

__all__ = ["JSON_TAG", "TIME_TAG", "Json", "check_value", "prepare_params"]

_INT64 = (-(2**63), 2**63 - 1)
_PLAIN = frozenset({type(None), bool, float, str, bytes})
_LISTS = frozenset({list, tuple})


@attrs.frozen
class Json:
    """A JSON value (dict, list, text, number, bool, None) to bind as JSON text.

    ``await client.execute("INSERT INTO docs (body) VALUES (?)", [Json({"a": 1})])``;
    a column declared ``JSON`` gives the parsed value back.
    """

    value: Any

    def encode(self, where: str = "value") -> cbor2.CBORTag:
        """The value as the tagged JSON text the node stores (InvalidArgument
        naming ``where`` if it has no JSON form)."""
        try:
            text = json.dumps(self.value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidArgument(f"{where}: the Json value has no JSON form: {exc}") from exc
        return cbor2.CBORTag(JSON_TAG, text.encode("utf-8"))


def check_value(value: Any, where: str) -> Any:
    """``value`` in its wire form, or InvalidArgument naming ``where``."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is int:
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidArgument(f"{where}: integer does not fit in 64 bits (signed)")
        return value
    return _check_other(value, where)


def _check_other(value: Any, where: str) -> Any:
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):  # an int subclass (an IntEnum, say)
        return check_value(int(value), where)
    if isinstance(value, (float, str, bytes)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidArgument(
                f"{where}: a datetime needs a time zone (naive datetimes are ambiguous);"
                " use datetime.now(timezone.utc) or .replace(tzinfo=...)"
            )
        return value
    if isinstance(value, datetime.date):
        return value
    if isinstance(value, datetime.time):
        if value.tzinfo is not None:
            raise InvalidArgument(f"{where}: a time of day with a time zone can't be bound")
        return cbor2.CBORTag(TIME_TAG, value.isoformat())
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise InvalidArgument(f"{where}: a Decimal must be finite, not {value}")
        return value
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, Json):
        return value.encode(where)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        raise InvalidArgument(
            f"{where}: a {type(value).__name__} can't be bound as a value;"
            " wrap JSON in qdb_client.Json(...)"
        )
    raise InvalidArgument(
        f"{where}: a {type(value).__name__} can't be bound (use None, bool, int, float, str,"
        " bytes, datetime, date, time, Decimal, UUID or Json)"
    )


def prepare_params(params: Any) -> list[Any] | dict[str, Any] | None:
    """Statement parameters in their wire form: a list (positional) or a dict
    (named), each value checked; InvalidArgument before anything is sent."""
    if params is None:
        return None
    low, high = _INT64
    if type(params) not in _LISTS and isinstance(params, Mapping):  # (an ABC check is slow)
        out: dict[str, Any] = {}
        for name, value in params.items():
            if not isinstance(name, str):
                raise InvalidArgument("named parameters must have str names")
            kind = type(value)
            if kind in _PLAIN or (kind is int and low <= value <= high):
                out[name] = value  # the common case, without building the error's text
            else:
                out[name] = check_value(value, f"parameter {name!r}")
        return out
    if type(params) in _LISTS or (
        isinstance(params, Sequence) and not isinstance(params, (str, bytes, bytearray))
    ):
        values: list[Any] = []
        for i, value in enumerate(params):
            kind = type(value)
            if kind in _PLAIN or (kind is int and low <= value <= high):
                values.append(value)
            else:
                values.append(check_value(value, f"parameter {i}"))
        return values
    raise InvalidArgument(f"params must be a sequence or a mapping, not {type(params).__name__}")
