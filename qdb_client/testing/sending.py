"""How a test node's connection writes: every frame it sends goes through here.

:class:`ConnectionSender` is the write path of
:class:`~.session.ServerConnection` (which inherits it and sets its state):
encoding a message for this peer (an ERROR cut down to fit, :mod:`.outgoing`),
the count of reply bytes waiting to be written (``max_queued_reply_bytes``),
the one write at a time under the connection's ``trio.StrictFIFOLock``, bounded
by ``write_timeout`` and shielded so that a frame goes out whole or the
connection is aborted, and a request's reply that can't be encoded turned into
an ERROR for that request (FRAME_TOO_LARGE, INTERNAL).

It is apart from the connection's reading, handshake and requests because it
is the one place that decides when a client that does not read its replies is
disconnected (a slow reader), and the only code that touches the stream's
sending side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import (
    Error,
    ErrorCode,
    FrameTooLarge,
    Message,
    Pong,
    ProtocolViolation,
    Response,
    ValueNotEncodable,
    error_message,
)
from .config import ServerConfig
from .outgoing import bounded_error, minimal_error
from .wire import NodeProtocol

if TYPE_CHECKING:
    from .server import QdbNode

__all__ = ["TRANSPORT_ERRORS", "ConnectionSender"]

logger = logging.getLogger("qdb_client.testing")

TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ConnectionSender:
    """The write path of :class:`~.session.ServerConnection` (its state is set there)."""

    node: QdbNode
    stream: trio.abc.Stream
    peer: str
    config: ServerConfig
    proto: NodeProtocol
    is_control_client: bool
    _scope: trio.CancelScope
    _write_lock: trio.StrictFIFOLock
    _queued: int
    _writing: trio.CancelScope | None
    _writes_stopped: bool
    #: Closes the connection abruptly (:meth:`~.session.ServerConnection.abort`).
    abort: Callable[[], None]

    # -------------------------------------------------------------- writing

    def _stop_writing(self) -> None:
        """No more bytes on this connection: the write in progress is cut short (the
        connection is closing without its frames), later ones write nothing."""
        self._writes_stopped = True
        if self._writing is not None:
            self._writing.cancel()

    async def _send(self, message: Message, *, count: bool = True) -> bool:
        """Write one message; False if the connection can no longer carry it.

        An ERROR always goes out, cut down to fit the client's maximum frame
        (:mod:`.outgoing`). Anything else raises FrameTooLarge /
        ValueNotEncodable (before anything is written) when it can't be
        encoded for this peer.

        A request's reply (RESPONSE, its ERROR) and a PONG change no protocol
        state: they are encoded before waiting for the write lock, and their
        bytes count as queued (:meth:`_queue`) until written, so a client
        that does not read is disconnected before its replies pile up.
        """
        data: bytes | None = None
        if isinstance(message, (Response, Pong)) or (
            isinstance(message, Error) and message.request_id != 0
        ):
            data = self._encode_or_none(message)
            if data is None or not self._queue(len(data)):
                return False
        queued = 0 if data is None else len(data)
        try:
            async with self._write_lock:
                if data is None:
                    data = self._encode_or_none(message)
                    if data is None:
                        return False
                    queued = len(data)
                    self._queued += queued
                # Counted before writing: the peer may act on the bytes before send_all returns.
                if isinstance(message, Error) and count and not self.is_control_client:
                    self.node.stats.errors_sent[message.name] += 1
                return await self._write(data)
        finally:
            self._queued -= queued

    def _encode_or_none(self, message: Message) -> bytes | None:
        try:
            return self._encode(message)
        except ProtocolViolation as exc:
            logger.debug("%s: not sending %s: %s", self.node.node_id, message.kind.name, exc)
            return None

    def _queue(self, size: int) -> bool:
        """Count ``size`` more bytes waiting to be written; False (and the connection
        aborted) if that passes ``max_queued_reply_bytes``: the client does not read.
        One reply always fits an empty queue."""
        limit = self.config.max_queued_reply_bytes
        if self._queued and self._queued + size > limit:
            logger.warning(
                "%s: closing the connection from %s: %d bytes of replies wait to be"
                " written (max_queued_reply_bytes %d); it does not read them",
                self.node.node_id,
                self.peer,
                self._queued + size,
                limit,
            )
            self._close_slow_reader()
            return False
        self._queued += size
        return True

    async def _write(self, data: bytes) -> bool:
        """``send_all`` under the write lock, within ``write_timeout``; False (and the
        connection aborted) if it failed or blocked that long (the client does not read).

        A frame goes out whole or the connection is aborted. The write is shielded
        from a cancel of the task that sends it (a CANCEL of the stream whose page
        it is, a stream stopped), which would leave half a frame on the wire and
        lose every later one; the deadlines around it still hold: one that passes
        mid-write aborts the connection, as the connection's own end does.
        """
        await trio.lowlevel.checkpoint_if_cancelled()  # cancelled already: nothing written
        if self._writes_stopped:
            return False
        timeout = self.config.write_timeout
        bound = trio.current_effective_deadline()
        with trio.CancelScope(deadline=trio.current_time() + timeout, shield=True) as scope:
            scope.deadline = min(scope.deadline, bound)
            self._writing = scope
            try:
                await self.stream.send_all(data)
            except TRANSPORT_ERRORS as exc:
                logger.debug("%s: write to %s failed: %r", self.node.node_id, self.peer, exc)
                self.abort()
                return False
            finally:
                self._writing = None
            return True
        if self._writes_stopped:  # the connection is closing abruptly
            return False
        if scope.deadline == bound:
            logger.info(
                "%s: closing the connection from %s: a deadline passed mid-frame",
                self.node.node_id,
                self.peer,
            )
            self.abort()
            return False
        logger.warning(
            "%s: closing the connection from %s: a write blocked for %g s (write_timeout);"
            " it does not read",
            self.node.node_id,
            self.peer,
            timeout,
        )
        self._close_slow_reader()
        return False

    def _close_slow_reader(self) -> None:
        # Counted once: the replies still waiting meet the same closed connection.
        if not self._scope.cancel_called and not self.is_control_client:
            self.node.stats.slow_readers_closed += 1
        self.abort()

    async def send_frame(self, frame: Message | bytes) -> bool:
        """Write a message, or a frame already encoded (a stream's page, .feeds);
        False if the connection can no longer carry it."""
        if not isinstance(frame, bytes):
            return await self._send(frame)
        if not self._queue(len(frame)):
            return False
        try:
            async with self._write_lock:
                return await self._write(frame)
        finally:
            self._queued -= len(frame)

    def _encode(self, message: Message) -> bytes:
        if not isinstance(message, Error):
            return self.proto.send(message)
        message = bounded_error(message)
        try:
            return self.proto.send(message)
        except FrameTooLarge:
            return self.proto.send(minimal_error(message))

    async def _send_reply(
        self, reply: Response | Error, *, count: bool, applied: bool = False
    ) -> bool:
        """Write a request's reply; one that can't go out becomes an ERROR for that request.

        A RESPONSE above the client's HELLO ``max_frame`` (the encoder refuses
        it before writing a byte) is answered FRAME_TOO_LARGE; the connection
        stays open for the next request. ``applied``: the request was a write
        that took effect, which the ERROR says (``details.executed``).
        """
        details: dict[str, Any] = {}
        try:
            return await self._send(reply, count=count)
        except FrameTooLarge as exc:
            code = ErrorCode.FRAME_TOO_LARGE
            text = (
                f"result of {exc.size} bytes exceeds the client's maximum frame of"
                f" {exc.limit} bytes; use a LIMIT or a result stream"
            )
            details = {"frame_size": exc.size, "max_frame": exc.limit}
            if applied:
                text += "; the write was applied"
                details["executed"] = True
            logger.info("%s: reply to %s too large: %s", self.node.node_id, self.peer, text)
        except ValueNotEncodable as exc:
            code, text = ErrorCode.INTERNAL, f"the reply can't be encoded: {exc}"
        error = error_message(reply.request_id, code, text, details=details)
        return await self._send(error, count=count)
