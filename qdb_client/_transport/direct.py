"""Synchronous, non-blocking writes to a TCP stream's socket, and reads that
wait for the socket first.

When a connection's writer task is idle, a caller can hand its frame to the
kernel itself: one non-blocking ``send`` that either takes bytes or says it
would block. This skips the wake-up of the writer task, and since it is
synchronous no cancellation can interrupt it half-way. Only plain
``trio.SocketStream`` qualifies (TLS or in-memory streams go through the
writer task as usual).

The reader task's reads go the other way round from ``SocketStream``'s: a
``SocketStream`` tries ``recv`` first and waits for readability only when it
would block, but a reader that has just handed out every reply it had almost
always finds the socket empty (the callers it woke have not run yet, so
nothing new was asked), and that failed ``recv`` is a system call per read.
:class:`DirectReader` waits first, unless its last read filled the buffer.

Both use a duplicate of the socket's descriptor, so closing it never closes
the connection's own socket.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["DirectReader", "DirectWriter"]


class DirectWriter:
    """Non-blocking ``send`` on a duplicate descriptor of a TCP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    @classmethod
    def for_stream(cls, stream: trio.abc.Stream) -> DirectWriter | None:
        """A writer for ``stream`` if it is a plain TCP stream, else None."""
        if not isinstance(stream, trio.SocketStream) or not hasattr(socket, "fromfd"):
            return None
        trio_socket = stream.socket
        try:
            duplicate = socket.fromfd(trio_socket.fileno(), trio_socket.family, trio_socket.type)
        except OSError:
            return None
        duplicate.setblocking(False)
        return cls(duplicate)

    def write(self, data: bytes) -> int:
        """Bytes the kernel took right now (0 if it would block or failed).

        Errors are left for the writer task to meet and report.
        """
        try:
            return self._sock.send(data)
        except OSError:  # BlockingIOError included
            return 0

    def reader(self, stream: trio.abc.Stream) -> DirectReader:
        """A :class:`DirectReader` of ``stream``, which this writer was made for."""
        assert isinstance(stream, trio.SocketStream)
        return DirectReader(stream.socket, self._sock)

    def close(self) -> None:
        """Close the duplicate descriptor (the connection's socket stays open)."""
        self._sock.close()


class DirectReader:
    """``receive_some`` that waits for readability before it reads (see above).

    Cancellation is safe at its one await: nothing has been read then. Errors
    are ``OSError`` (from ``recv``) and ``trio.ClosedResourceError`` (the
    stream was closed while waiting), as from the stream itself.
    """

    def __init__(self, watched: trio.socket.SocketType, sock: socket.socket) -> None:
        self._watched = watched
        self._sock = sock
        self._full = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next bytes from the peer (empty at end of input)."""
        size = max_bytes or 65536
        if self._full:
            await trio.lowlevel.checkpoint()  # more is likely waiting: read it now
        else:
            await trio.lowlevel.wait_readable(self._watched)
        while True:
            try:
                data = self._sock.recv(size)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._watched)
                continue
            self._full = len(data) == size
            return data
