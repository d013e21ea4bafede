"""CBOR bodies: encoding, and decoding with limits and exact consumption.

cbor2's ``loads`` ignores trailing bytes and accepts indefinite-length items
and deep nesting; a body must instead be exactly one definite-length item of
bounded depth. Shared-value tags 28/29 are refused: they let a few hundred
bytes decode into a graph with billions of paths (or a cycle), which the
depth bound does not see. Every failure inside cbor2 (including errors
raised by its tag decoders) becomes a :class:`MessageError`.
"""

from __future__ import annotations

import datetime
import io
import json
from itertools import chain
from typing import Any

import cbor2

from .errors import MessageError, ValueNotEncodable

__all__ = [
    "JSON_TAG",
    "MAX_DEPTH",
    "TIME_TAG",
    "BodyDecoder",
    "decode_body",
    "encode_body",
    "encode_flat_body",
]

#: Deepest container nesting accepted in a body.
MAX_DEPTH = 32
#: CBOR tags for shared values (28 "shareable", 29 "sharedref"); never valid in a body.
_SHARED_VALUE_TAGS = (28, 29)


def _refuse_shared_value(*_args: Any) -> Any:
    raise cbor2.CBORDecodeError("shared-value tags (28/29) are not allowed")


#: CBOR tag of a time of day, ``HH:MM:SS[.ffffff]`` text (this protocol's own:
#: RFC 8943 defines dates only). docs/protocol.md section 10.1.
TIME_TAG = 1008
#: CBOR tag of embedded JSON: UTF-8 JSON text in a byte string (IANA tag 262).
JSON_TAG = 262


def _decode_time(value: Any, immutable: bool = False) -> datetime.time:
    if type(value) is not str or len(value) > 32:
        raise cbor2.CBORDecodeError("a time of day (tag 1008) must be short text")
    result = datetime.time.fromisoformat(value)
    if result.tzinfo is not None:
        raise cbor2.CBORDecodeError("a time of day (tag 1008) has no time zone")
    return result


def _decode_json(value: Any, immutable: bool = False) -> Any:
    if type(value) is not bytes:
        raise cbor2.CBORDecodeError("embedded JSON (tag 262) must be a byte string")
    return json.loads(value.decode("utf-8"))


_SEMANTIC_DECODERS: dict[int, Any] = {
    **dict.fromkeys(_SHARED_VALUE_TAGS, _refuse_shared_value),
    TIME_TAG: _decode_time,
    JSON_TAG: _decode_json,
}


def _check_depth(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH (or a cycle) before cbor2 sees it.

    cbor2 recurses in C: a few thousand levels overflow the C stack and kill
    the process, and no receiver would accept more than MAX_DEPTH anyway.
    Walks level by level with C-level iteration, so many flat rows or a
    small request cost little; each level holds each container once, so a
    cycle costs at most MAX_DEPTH passes over the distinct containers.
    """
    level: list[Any] = [value]
    for depth in range(MAX_DEPTH + 1):
        kinds = set(map(type, level))
        if kinds <= _SCALARS:
            return
        nested = [item for item in level if isinstance(item, _NESTING)]
        if not nested:
            return
        if depth == MAX_DEPTH:
            raise ValueNotEncodable(f"value nested deeper than {MAX_DEPTH} levels")
        unique = list({id(item): item for item in nested}.values())
        level = list(chain.from_iterable(map(_children, unique)))


def _children(item: Any) -> Any:
    # The base classes' own iterators, as cbor2 reads containers through the
    # C API and would not see a subclass's overridden methods either.
    if isinstance(item, dict):
        return chain(dict.keys(item), dict.values(item))
    if isinstance(item, list):
        return list.__iter__(item)
    if isinstance(item, tuple):
        return tuple.__iter__(item)
    if isinstance(item, cbor2.CBORTag):
        return (item.value,)
    return item


#: What cbor2 encodes by recursing into it.
_NESTING = (dict, list, tuple, set, frozenset, cbor2.CBORTag)
_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})


def encode_body(value: Any) -> bytes:
    """Encode one value as CBOR, or raise ValueNotEncodable."""
    _check_depth(value)
    try:
        return cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError) as exc:
        raise ValueNotEncodable(f"cannot encode {type(value).__name__} as CBOR: {exc}") from exc


#: Exact types whose values nest nothing, and containers whose elements are checked.
_FLAT = frozenset({int, float, str, bytes, bool, type(None)})
_SEQUENCES = (list, tuple)


def _shallow(value: Any) -> bool:
    """True when ``value`` is a scalar, or a list/tuple/dict of scalars (exact types)."""
    kind = type(value)
    if kind in _FLAT:
        return True
    if kind is list or kind is tuple:
        return _FLAT.issuperset(map(type, value))
    if kind is dict:
        return _FLAT.issuperset(map(type, value.values()))
    return False


def encode_flat_body(body: dict[str, Any], nested: dict[str, Any]) -> bytes:
    """Encode a protocol body whose own fields are flat, with ``nested`` (the
    application's part, e.g. a REQUEST's ``args``) under ``body["args"]``.

    The same bytes as :func:`encode_body`; the depth walk runs only when an
    argument holds containers within containers (a driver's own bodies and
    flat parameters can't nest deeper than 3 levels).
    """
    for value in nested.values():
        if not _shallow(value):
            _check_depth(body)
            break
    try:
        return cbor2.dumps(body)
    except (cbor2.CBOREncodeError, TypeError, ValueError, OverflowError) as exc:
        raise ValueNotEncodable(f"cannot encode the request as CBOR: {exc}") from exc


def decode_body(data: bytes, *, request_id: int = 0, kind: int | None = None) -> Any:
    """Decode exactly one CBOR item from ``data`` or raise MessageError."""
    return BodyDecoder().decode(data, request_id=request_id, kind=kind)


#: Bodies up to this size may stay referenced by a kept decoder's buffer
#: until the next one (bigger ones are let go at once).
_KEPT_BODY_LIMIT = 64 * 1024


class BodyDecoder:
    """:func:`decode_body` keeping one CBOR decoder, and the buffer it reads,
    from one body to the next.

    For one reader (a connection's replies): building a decoder costs more
    than decoding a small reply, and so does handing it a new buffer (the
    decoder asks the new one what it can do); the kept buffer is refilled
    instead. Nothing carries over between bodies: the tags that keep state
    across items (28/29, shared values) are refused, and after any failure
    the decoder is dropped and the next body gets a new one.
    """

    __slots__ = ("_buffer", "_decoder")

    def __init__(self) -> None:
        self._decoder: cbor2.CBORDecoder | None = None
        self._buffer = io.BytesIO()

    def decode(self, data: bytes, *, request_id: int = 0, kind: int | None = None) -> Any:
        """Decode exactly one CBOR item from ``data`` or raise MessageError."""
        if not data:
            raise MessageError("empty message body", request_id=request_id, kind=kind)
        buffer = self._buffer
        buffer.__init__(data)  # type: ignore[misc]  # refill: the decoder keeps reading it
        try:
            decoder = self._decoder
            if decoder is None:
                decoder = self._decoder = cbor2.CBORDecoder(
                    buffer,
                    max_depth=MAX_DEPTH,
                    allow_indefinite=False,
                    strict_hashable_types=True,
                    allow_duplicate_keys=False,
                    semantic_decoders=_SEMANTIC_DECODERS,
                )
            value = decoder.decode()
        except RecursionError as exc:
            self._drop()
            raise MessageError(
                "CBOR body nested too deeply", request_id=request_id, kind=kind
            ) from exc
        except Exception as exc:  # cbor2 and its tag decoders raise many types
            self._drop()
            raise MessageError(
                f"undecodable CBOR body: {exc}", request_id=request_id, kind=kind
            ) from exc
        consumed = buffer.tell()
        if len(data) > _KEPT_BODY_LIMIT:
            buffer.__init__(b"")  # type: ignore[misc]  # keep no large reply alive
        if consumed != len(data):
            raise MessageError(
                f"{len(data) - consumed} trailing bytes after the CBOR body",
                request_id=request_id,
                kind=kind,
            )
        return value

    def _drop(self) -> None:
        """Forget the decoder and its buffer after a failure (a new pair next time)."""
        self._decoder = None
        self._buffer = io.BytesIO()
