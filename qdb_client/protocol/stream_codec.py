"""STREAM_PAGE bodies with their rows as bytes: what the stream digest is computed over.

A stream's digest (docs/protocol.md section 12.4) is SHA-256 over the CBOR
encoding of every row, in the deterministic form of section 5.4. Decoding a
row and encoding it again is not an identity for typed values (a JSON
column decodes to a dict and would come back as a CBOR map, not tag 262; a
time of day has no encoder at all), so a receiver must hash the rows *as
they travelled*. :func:`decode_page_body` decodes a STREAM_PAGE body in one
pass and also returns the bytes of its ``rows`` array's elements; the
driver feeds those to the digest.

The sending side works the other way round: a node encodes each row once,
hashes and stores those bytes, and :func:`encode_stream_page` splices them
into a frame without encoding them again, so the bytes hashed are the bytes
sent. :func:`encode_stream_page` gives exactly the bytes of
``encode_message(StreamPage(...))`` for the same page.

Pure: no I/O. The checks are those of :func:`~.codec.decode_body` (one
definite-length map filling the body, text or byte-string keys, no
duplicate key, depth at most 32, no shared-value tags).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from typing import Any

import cbor2

from .codec import _SEMANTIC_DECODERS, MAX_DEPTH, decode_body, encode_body
from .errors import MessageError, ValueNotEncodable
from .frames import MAX_REQUEST_ID, encode_frame

__all__ = [
    "DIGEST_SIZE",
    "MAX_TOKEN_SIZE",
    "STREAM_PAGE_KIND",
    "array_head",
    "decode_page_body",
    "encode_row",
    "encode_stream_page",
    "stream_digest",
]

#: The message kind byte of STREAM_PAGE (``Kind.STREAM_PAGE``; a test checks they agree).
STREAM_PAGE_KIND = 0x30
#: Size of a STREAM_END ``digest``: SHA-256.
DIGEST_SIZE = 32
#: Largest resume token a node may issue (section 12.2).
MAX_TOKEN_SIZE = 1024
_MAX_UINT = 2**64 - 1

_KEY_SEQ = cbor2.dumps("seq")
_KEY_ROWS = cbor2.dumps("rows")
_KEY_TOKEN = cbor2.dumps("token")
_KEY_COLUMNS = cbor2.dumps("columns")
_KEY_TYPES = cbor2.dumps("types")


def _head(major: int, value: int) -> bytes:
    """A CBOR head (major type and argument) in its shortest form."""
    first = major << 5
    if value < 24:
        return bytes((first | value,))
    if value < 1 << 8:
        return bytes((first | 24, value))
    if value < 1 << 16:
        return bytes((first | 25,)) + value.to_bytes(2, "big")
    if value < 1 << 32:
        return bytes((first | 26,)) + value.to_bytes(4, "big")
    return bytes((first | 27,)) + value.to_bytes(8, "big")


def array_head(count: int) -> bytes:
    """The head of a CBOR array of ``count`` elements (shortest form)."""
    return _head(4, count)


def encode_row(row: Sequence[Any]) -> bytes:
    """One row (a list of values) in the encoding of section 5.4; ValueNotEncodable if
    it has none. The bytes the digest and a page are made of."""
    return encode_body(list(row))


def stream_digest(encoded_rows: Iterable[bytes]) -> bytes:
    """SHA-256 over row encodings, in order (section 12.4)."""
    digest = hashlib.sha256()
    for data in encoded_rows:
        digest.update(data)
    return digest.digest()


def encode_stream_page(
    request_id: int,
    seq: int,
    rows_encoding: bytes,
    row_count: int,
    token: bytes,
    columns: Sequence[str] | None = None,
    types: Sequence[str | None] | None = None,
) -> bytes:
    """The STREAM_PAGE frame for ``row_count`` rows already encoded (``rows_encoding``
    is their concatenation, each from :func:`encode_row`).

    The same bytes as ``encode_message(StreamPage(...))`` of the decoded rows.
    Raises ValueNotEncodable for an id, seq or count out of range, or a token
    that is not bytes of at most :data:`MAX_TOKEN_SIZE`.
    """
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueNotEncodable(f"STREAM_PAGE request id out of range: {request_id!r:.40}")
    for name, value in (("seq", seq), ("row count", row_count)):
        if type(value) is not int or not 0 <= value <= _MAX_UINT:
            raise ValueNotEncodable(f"STREAM_PAGE {name} must be a u64, not {value!r:.40}")
    if type(token) is not bytes or len(token) > MAX_TOKEN_SIZE:
        raise ValueNotEncodable("a resume token is bytes of at most 1024")
    entries = 3 + (columns is not None) + (types is not None)
    parts = [
        _head(5, entries),
        _KEY_SEQ,
        _head(0, seq),
        _KEY_ROWS,
        array_head(row_count),
        rows_encoding,
        _KEY_TOKEN,
        _head(2, len(token)),
        token,
    ]
    if columns is not None:
        parts += [_KEY_COLUMNS, encode_body(list(columns))]
    if types is not None:
        parts += [_KEY_TYPES, encode_body(list(types))]
    return encode_frame(STREAM_PAGE_KIND, request_id, b"".join(parts))


# --------------------------------------------------------------------- decoding


def _fail(why: str, request_id: int, kind: int | None) -> MessageError:
    return MessageError(f"undecodable CBOR body: {why}", request_id=request_id, kind=kind)


def _read_head(data: bytes, request_id: int, kind: int | None) -> tuple[int, int, int]:
    """(major type, argument, bytes used) of the head at the start of ``data``."""
    if not data:
        raise MessageError("empty message body", request_id=request_id, kind=kind)
    first = data[0]
    major, info = first >> 5, first & 0x1F
    if info < 24:
        return major, info, 1
    if info == 31:
        raise _fail("indefinite-length items are not allowed", request_id, kind)
    if info > 27:
        raise _fail(f"reserved additional information {info}", request_id, kind)
    size = 1 << (info - 24)
    if len(data) < 1 + size:
        raise _fail("truncated item head", request_id, kind)
    return major, int.from_bytes(data[1 : 1 + size], "big"), 1 + size


def decode_page_body(
    data: bytes, *, request_id: int = 0, kind: int | None = STREAM_PAGE_KIND
) -> tuple[Any, bytes]:
    """Decode a STREAM_PAGE body: ``(value, rows_encoding)``.

    ``value`` is what :func:`~.codec.decode_body` returns for ``data`` (the
    same checks, the same MessageError). ``rows_encoding`` is the bytes of the
    elements of the ``rows`` array, concatenated as they came: the digest's
    input for this page (``b""`` when there is no ``rows`` array; the
    message's schema check refuses that body anyway).
    """
    major, count, used = _read_head(data, request_id, kind)
    if major != 5:
        return decode_body(data, request_id=request_id, kind=kind), b""
    fp = io.BytesIO(data)
    fp.seek(used)
    try:
        decoder = cbor2.CBORDecoder(
            fp,
            # One level is the body map itself, read by hand above.
            max_depth=MAX_DEPTH - 1,
            allow_indefinite=False,
            strict_hashable_types=True,
            allow_duplicate_keys=False,
            semantic_decoders=_SEMANTIC_DECODERS,
        )
        body: dict[Any, Any] = {}
        rows_encoding = b""
        for _ in range(count):
            key = decoder.decode()
            if type(key) not in (str, bytes):
                raise _fail(
                    f"map key must be a text or byte string, not {type(key).__name__}",
                    request_id,
                    kind,
                )
            if key in body:
                raise _fail(f"duplicate map key {key!r:.40}", request_id, kind)
            start = fp.tell()
            body[key] = decoder.decode()
            if key == "rows" and isinstance(body[key], list):
                value = data[start : fp.tell()]
                _, _, head = _read_head(value, request_id, kind)
                rows_encoding = value[head:]
    except MessageError:
        raise
    except RecursionError as exc:
        raise MessageError("CBOR body nested too deeply", request_id=request_id, kind=kind) from exc
    except Exception as exc:  # cbor2 and its tag decoders raise many types
        raise _fail(str(exc), request_id, kind) from exc
    if fp.tell() != len(data):
        raise MessageError(
            f"{len(data) - fp.tell()} trailing bytes after the CBOR body",
            request_id=request_id,
            kind=kind,
        )
    return body, rows_encoding
