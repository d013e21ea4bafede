"""Synchronous, non-blocking writes to a TCP stream's socket.

When a connection's writer task is idle, a caller can hand its frame to the
kernel itself: one non-blocking ``send`` that either takes bytes or says it
would block. This skips the wake-up of the writer task, and since it is
synchronous no cancellation can interrupt it half-way. Only plain
``trio.SocketStream`` qualifies (TLS or in-memory streams go through the
writer task as usual).

The writer sends on a duplicate of the socket's descriptor, so closing it
never closes the connection's own socket.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["DirectWriter"]


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

    def close(self) -> None:
        """Close the duplicate descriptor (the connection's socket stays open)."""
        self._sock.close()
