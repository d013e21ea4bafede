"""Errors of protocol v1: bytes from a peer that break the protocol, and
values that have no wire form.

Defined here, beside the code that raises them, on the common root
:class:`~qdb_client.QdbError`; :mod:`qdb_client.errors` re-exports them.
"""

from __future__ import annotations

from .._error_base import InvalidArgument, QdbError

__all__ = [
    "FrameError",
    "FrameTooLarge",
    "MessageError",
    "ProtocolError",
    "ProtocolViolation",
    "ValueNotEncodable",
]


class ProtocolError(QdbError):
    """Bytes received from a peer do not follow protocol v1."""


class FrameError(ProtocolError):
    """A frame header is broken; the byte stream can no longer be trusted.

    The connection that produced it must be closed.
    """


class FrameTooLarge(FrameError):
    """A frame header announces more bytes than the negotiated maximum.

    Raised from the header alone, before any buffer for the body exists.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum of {limit} bytes")
        self.size = size
        self.limit = limit


class ProtocolViolation(ProtocolError):
    """A peer sent a message that its role or the connection state forbids.

    For example a REQUEST before the handshake finished. Connection-level.
    """


class MessageError(ProtocolError):
    """One frame arrived whole but its content is unusable.

    A checksum mismatch, undecodable CBOR or a body that does not match its
    message kind. The connection stays usable; ``request_id`` names the
    request the frame claimed to belong to (0 when unknown).
    """

    def __init__(self, message: str, *, request_id: int = 0, kind: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.kind = kind


class ValueNotEncodable(InvalidArgument):
    """A value given to the driver has no representation in protocol v1."""
