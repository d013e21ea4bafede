"""Frame layer of protocol v1: a fixed 20-byte header, then a CBOR body.

::

    offset  size  field
    0       2     magic        b"QD"
    2       1     flags        v1 defines none; any set bit is refused per message
    3       1     kind         message kind (see messages.Kind)
    4       4     length       u32 big-endian, whole frame including this header
    8       8     request_id   u64 big-endian
    16      4     crc32        u32 big-endian, CRC-32 of bytes 0..15 then the body
    20      ...   body         one CBOR data item, exactly ``length - 20`` bytes

The header is validated as soon as its 20 bytes are in: a wrong magic, a
length below 20 or above the maximum frame size is a :class:`FrameError`
and the byte stream is abandoned. Nothing is reserved for the body before
the header passed. A checksum mismatch is a :class:`MessageError`: the frame
is skipped and the stream stays in sync.
"""

from __future__ import annotations

import struct
import zlib

import attrs

from .._error_base import InvalidArgument
from .errors import FrameError, FrameTooLarge, MessageError, ValueNotEncodable

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_REQUEST_ID",
    "Frame",
    "FrameDecoder",
    "checked_frame",
    "encode_frame",
]

MAGIC = b"QD"
HEADER_SIZE = 20
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
MAX_REQUEST_ID = 2**64 - 1
#: The length field is a u32: no frame can be longer, whatever the peers announce.
MAX_FRAME_LENGTH = 2**32 - 1
#: Flag bits v1 understands. None yet: bit 0 is reserved for compression.
KNOWN_FLAGS = 0x00

_HEADER = struct.Struct(">2sBBIQ")  # magic, flags, kind, length, request_id
_CRC = struct.Struct(">I")


@attrs.frozen
class Frame:
    """One whole, checksum-verified frame; ``body`` is still CBOR bytes."""

    kind: int
    request_id: int
    body: bytes
    flags: int = 0


def encode_frame(kind: int, request_id: int, body: bytes, flags: int = 0) -> bytes:
    """Return the bytes of one frame carrying ``body``.

    Raises ValueNotEncodable for a kind or flags outside 0..255 or a request
    id outside 0..2**64-1, and FrameTooLarge for a body the u32 length field
    can't describe.
    """
    for name, value, high in (("kind", kind, 255), ("flags", flags, 255)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ValueNotEncodable(f"frame {name} must be an integer within 0..{high}")
    if (
        isinstance(request_id, bool)
        or not isinstance(request_id, int)
        or not 0 <= request_id <= MAX_REQUEST_ID
    ):
        raise ValueNotEncodable("frame request id must be an integer within 0..2**64-1")
    if HEADER_SIZE + len(body) > MAX_FRAME_LENGTH:
        raise FrameTooLarge(HEADER_SIZE + len(body), MAX_FRAME_LENGTH)
    return checked_frame(kind, request_id, body, flags)


def checked_frame(kind: int, request_id: int, body: bytes, flags: int = 0) -> bytes:
    """:func:`encode_frame` for a caller that has checked ``kind``, ``flags`` and
    ``request_id`` itself (the request path); only the length is checked here."""
    length = HEADER_SIZE + len(body)
    if length > MAX_FRAME_LENGTH:
        raise FrameTooLarge(length, MAX_FRAME_LENGTH)
    head = _HEADER.pack(MAGIC, flags, kind, length, request_id)
    return b"".join((head, _CRC.pack(zlib.crc32(body, zlib.crc32(head))), body))


class FrameDecoder:
    """Incremental frame parser: feed bytes in any chunking, take frames out.

    ``next_frame()`` returns a :class:`Frame`, or None when more bytes are
    needed. It raises :class:`MessageError` for a whole frame whose checksum
    or flags are wrong (the frame is consumed; call again for the next one)
    and :class:`FrameError` for a broken header, after which the decoder
    stays broken. Memory is bounded by one frame plus the last chunk fed.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if (
            isinstance(max_frame_size, bool)
            or not isinstance(max_frame_size, int)
            or max_frame_size < HEADER_SIZE
        ):
            raise InvalidArgument(f"max_frame_size must be an integer of at least {HEADER_SIZE}")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._broken: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes."""
        if self._broken is None:
            self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next whole frame, or None if more bytes are needed."""
        taken = self.take()
        if taken is None:
            return None
        kind, request_id, body, flags = taken
        return Frame(kind=kind, request_id=request_id, body=body, flags=flags)

    def take(self) -> tuple[int, int, bytes, int] | None:
        """:meth:`next_frame` as a tuple ``(kind, request_id, body, flags)``,
        without building the Frame (for a reader that only needs its parts)."""
        if self._broken is not None:
            raise self._broken
        buf = self._buffer
        if len(buf) < HEADER_SIZE:
            # Reject a wrong magic as soon as it is visible, not 20 bytes later.
            if buf and not MAGIC.startswith(bytes(buf[:2])):
                self._fail(FrameError(f"bad frame magic {bytes(buf[:2])!r}"))
            return None
        magic, flags, kind, length, request_id = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            self._fail(FrameError(f"bad frame magic {magic!r}"))
        if length < HEADER_SIZE:
            self._fail(FrameError(f"frame length {length} is shorter than the header"))
        if length > self.max_frame_size:
            self._fail(FrameTooLarge(length, self.max_frame_size))
        if len(buf) < length:
            return None
        (crc,) = _CRC.unpack_from(buf, 16)
        body = bytes(buf[HEADER_SIZE:length])
        actual = zlib.crc32(body, zlib.crc32(buf[:16]))
        del buf[:length]
        if crc != actual:
            raise MessageError(
                f"frame checksum mismatch (kind {kind:#04x}, {length} bytes)",
                request_id=request_id,
                kind=kind,
            )
        if flags & ~KNOWN_FLAGS:
            raise MessageError(
                f"frame uses unsupported flags {flags:#04x}", request_id=request_id, kind=kind
            )
        return kind, request_id, body, flags

    def check_eof(self) -> None:
        """Raise FrameError if the peer closed in the middle of a frame."""
        if self._broken is None and self._buffer:
            self._fail(
                FrameError(f"connection closed inside a frame ({len(self._buffer)} bytes pending)")
            )

    def _fail(self, error: FrameError) -> None:
        self._broken = error
        self._buffer.clear()
        raise error
