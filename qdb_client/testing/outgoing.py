"""Writing to a client: messages small enough for it to take, and closing politely.

A client announces the largest frame it accepts (HELLO ``max_frame``, at
least 1024 bytes), and the protocol layer refuses to encode anything
larger. A node must still be able to answer, and some of its answers echo
what the client sent: VERSION_MISMATCH lists the versions offered, a
PARSE_ERROR quotes the decoder, METHOD_NOT_FOUND names the method. So:

- every ERROR goes through :func:`bounded_error` (its text cut to
  :data:`MAX_ERROR_TEXT` bytes, long text details cut too), and, should that
  still not fit, :func:`minimal_error`: a short text and only the details
  that are plain facts (numbers, flags, short names). 1024 bytes always hold it;
- a WELCOME that does not fit lists fewer members (:func:`fewer_members`):
  this node first, so the client can still work with it.

:func:`close_stream` closes a connection after its last message: it
half-closes and drains until the client's EOF (bounded by
:data:`LINGER_SECONDS`), so that the client reads that message instead of
a reset. :class:`WatchedStream` is the reading side: it remembers the end
of input.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

from ..protocol import Error, Welcome

__all__ = [
    "COURTESY_SECONDS",
    "LINGER_SECONDS",
    "MAX_ERROR_TEXT",
    "RECEIVE_SIZE",
    "SHORT_ERROR_TEXT",
    "WatchedStream",
    "bounded_error",
    "close_stream",
    "fewer_members",
    "minimal_error",
]

#: Longest ERROR message text the node sends, in UTF-8 bytes; longer ones are cut.
MAX_ERROR_TEXT = 2048
#: Text length of the last-resort ERROR (:func:`minimal_error`), in UTF-8 bytes.
SHORT_ERROR_TEXT = 200
#: Longest text value of an ERROR's details (in characters) before it is cut.
_MAX_DETAIL_TEXT = 256
#: Longest text value :func:`minimal_error` keeps.
_SHORT_DETAIL_TEXT = 64
_CUT = " [...]"


def _cut(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` UTF-8 bytes, else its start and a mark."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    return data[: limit - len(_CUT)].decode("utf-8", "ignore") + _CUT


def bounded_error(error: Error) -> Error:
    """``error`` with its message cut to :data:`MAX_ERROR_TEXT` bytes and long text
    details cut as well (unchanged when nothing is too long)."""
    message = _cut(error.message, MAX_ERROR_TEXT)
    details = error.details
    if any(isinstance(v, str) and len(v) > _MAX_DETAIL_TEXT for v in details.values()):
        details = {
            k: _cut(v, _MAX_DETAIL_TEXT) if isinstance(v, str) else v for k, v in details.items()
        }
    if message is error.message and details is error.details:
        return error
    return attrs.evolve(error, message=message, details=details)


def _fact(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= _SHORT_DETAIL_TEXT
    return value is None or isinstance(value, (bool, int, float))


def minimal_error(error: Error) -> Error:
    """The smallest form of ``error``: same request id, name, code and retryable flag,
    its message cut to :data:`SHORT_ERROR_TEXT` bytes, and only the details that
    are scalars (``executed``, ``statement_index``, ``frame_size``...)."""
    details = {k: v for k, v in error.details.items() if _fact(v)}
    return attrs.evolve(error, message=_cut(error.message, SHORT_ERROR_TEXT), details=details)


def fewer_members(welcome: Welcome) -> Welcome | None:
    """``welcome`` with half its members (the first ones: this node first); None if it
    lists only one."""
    members = welcome.members
    if len(members) <= 1:
        return None
    return attrs.evolve(welcome, members=members[: len(members) // 2])


# ------------------------------------------------------------------- streams

#: Bytes asked of the stream per read.
RECEIVE_SIZE = 65536
#: After a graceful close, how long to wait for the client's EOF before closing.
LINGER_SECONDS = 1.0
#: Upper bound on writing a courtesy message (GOAWAY, fatal ERROR) to a stuck client.
COURTESY_SECONDS = 2.0

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class WatchedStream:
    """The stream as :func:`receive_event` reads it, remembering end of input.

    A frame cut short by the end of input is a broken stream, but there is
    no one left to tell; a broken frame before it is answered.
    """

    __slots__ = ("at_eof", "stream")

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.at_eof = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The next bytes of the stream (empty at its end, which is remembered)."""
        data = await self.stream.receive_some(max_bytes)
        if not data:
            self.at_eof = True
        return data


async def close_stream(stream: trio.abc.Stream, *, linger: bool) -> None:
    """Close ``stream``; with ``linger``, first half-close and drain until EOF (bounded).

    Lingering lets the peer read what was written last: closing a TCP socket
    with unread input sends RST, which may destroy data still in flight.
    """
    with trio.CancelScope(shield=True):
        if linger:
            with trio.move_on_after(LINGER_SECONDS):
                try:
                    if isinstance(stream, trio.abc.HalfCloseableStream):
                        await stream.send_eof()
                    while await stream.receive_some(RECEIVE_SIZE):
                        pass
                except (*_TRANSPORT_ERRORS, trio.BusyResourceError):
                    pass
        await trio.aclose_forcefully(stream)
