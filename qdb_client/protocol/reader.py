"""The one read loop of protocol v1, shared by every peer in this package.

The driver's connection, the test node's sessions, the node control client
and the tests' raw clients all read the same way: take the next event the
state machine already holds, else read more bytes, feed them, repeat; at
end of input tell the state machine (which refuses a frame cut short).

Written against any object with ``async receive_some(max_bytes)`` (a
``trio.abc.ReceiveStream``), so this module imports no I/O library: the
stream's own exceptions pass through untouched for the caller to translate.
"""

from __future__ import annotations

from typing import Protocol

from .connection import BadMessage, ProtocolConnection
from .errors import FrameError
from .messages import Message

__all__ = ["READ_SIZE", "ByteSource", "receive_event", "receive_events"]

#: Bytes asked of the stream per read.
READ_SIZE = 65536


class ByteSource(Protocol):
    """What :func:`receive_event` reads from (``trio.abc.ReceiveStream`` fits)."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Bytes from the peer; empty at end of input."""
        ...


async def receive_event(
    protocol: ProtocolConnection, stream: ByteSource, *, read_size: int = READ_SIZE
) -> Message | BadMessage | None:
    """The next message (or bad message) from the peer; None at end of input.

    Frames already buffered are returned without reading. Raises what the
    state machine raises for a broken byte stream (FrameError,
    ProtocolViolation), including at end of input inside a frame, and what
    the stream raises.
    """
    while True:
        event = protocol.next_event()
        if event is not None:
            return event
        data = await stream.receive_some(read_size)
        if not data:
            protocol.receive_eof()
            return None
        protocol.receive_data(data)


async def receive_events(
    protocol: ProtocolConnection, stream: ByteSource, *, read_size: int = READ_SIZE
) -> list[Message | BadMessage] | None:
    """Every event the next read completes (at least one); None at end of input.

    The batch form of :func:`receive_event`, for a reader that dispatches
    many replies at once and wants to know how many came together.
    """
    events: list[Message | BadMessage] = []
    while True:
        try:
            while (event := protocol.next_event()) is not None:
                events.append(event)
        except FrameError:
            if events:
                # The replies in front of a broken frame arrived whole: hand them
                # out. A broken stream stays broken, so the next call raises again.
                return events
            raise
        if events:
            return events
        data = await stream.receive_some(read_size)
        if not data:
            protocol.receive_eof()
            return None
        protocol.receive_data(data)
