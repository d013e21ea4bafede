"""One client connection of a test node: handshake, reader, concurrent requests, closing.

A :class:`ServerConnection` owns one ``trio.abc.Stream``. A single reader
feeds the sans-IO :class:`~qdb_client.protocol.ProtocolConnection`; each
REQUEST runs in its own task and its reply is written when it completes, so
replies leave in completion order. Writes are serialised by a
``trio.StrictFIFOLock``. Nothing a client sends raises out of
:meth:`ServerConnection.run`: a bad frame is answered with PARSE_ERROR, a
broken byte stream with PARSE_ERROR (or FRAME_TOO_LARGE) plus GOAWAY
``protocol_error`` and a close.
"""

from __future__ import annotations

import hmac
import logging
import math
import uuid
from typing import TYPE_CHECKING

import trio

from ..errors import FrameError, FrameTooLarge, ProtocolViolation, ValueNotEncodable
from ..protocol import (
    PROTOCOL_VERSIONS,
    BadMessage,
    Cancel,
    Error,
    ErrorCode,
    GoAway,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolConnection,
    Request,
    Response,
    Role,
    State,
    Welcome,
    choose_version,
    error_message,
)
from ._failure import RequestFailed
from .methods import is_control_method, run_method
from .stats import CONTROL_CLIENT_NAME

if TYPE_CHECKING:
    from .server import QdbNode

__all__ = ["LINGER_SECONDS", "ServerConnection", "close_stream"]

logger = logging.getLogger("qdb_client.testing")

#: Bytes asked of the stream per read.
RECEIVE_SIZE = 65536
#: After a graceful close, how long to wait for the client's EOF before closing.
LINGER_SECONDS = 1.0
#: Upper bound on writing a courtesy message (GOAWAY, fatal ERROR) to a stuck client.
COURTESY_SECONDS = 2.0

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


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


class ServerConnection:
    """The server side of one client connection."""

    def __init__(self, node: QdbNode, stream: trio.abc.Stream, peer: str) -> None:
        self.node = node
        self.stream = stream
        #: Who is at the other end (``host:port`` or a description).
        self.peer = peer
        self.config = node.config
        self.proto = ProtocolConnection(Role.SERVER, max_frame_size=node.config.max_frame_size)
        #: True once HELLO named the control tool; its traffic is not counted.
        self.is_control_client = False
        #: The user HELLO authenticated as (None on a node without credentials).
        self.user: str | None = None
        #: Highest request id accepted for processing (GOAWAY ``last_request_id``).
        self.last_request_id = 0
        #: Set once the stream has been closed.
        self.closed = trio.Event()
        self._write_lock = trio.StrictFIFOLock()
        self._in_flight: dict[int, trio.CancelScope] = {}
        self._drained = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()
        self._idle_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._linger = False
        self._draining = False
        self._client_goaway = False

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered."""
        return len(self._in_flight)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it closes; never raises (other than Cancelled)."""
        self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._idle_watchdog)
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
        except Exception:
            logger.exception("%s: connection from %s failed", self.node.node_id, self.peer)
        finally:
            await close_stream(self.stream, linger=self._linger)
            self.closed.set()
            logger.debug("%s: connection from %s closed", self.node.node_id, self.peer)

    def abort(self) -> None:
        """Close abruptly: no GOAWAY, in-flight requests are abandoned."""
        self._linger = False
        self._scope.cancel()

    def _close_gracefully(self) -> None:
        if self._scope.cancel_called:  # closing already (maybe abruptly): keep that choice
            return
        self._linger = True
        self._scope.cancel()

    async def drain(self, reason: str, message: str, deadline: float) -> None:
        """Send GOAWAY ``reason``, let in-flight requests finish until ``deadline``, close.

        Requests arriving after the GOAWAY get SHUTTING_DOWN without running.
        """
        if not self._draining:
            self._draining = True
            with trio.move_on_at(deadline + COURTESY_SECONDS):
                if self.proto.state is State.OPEN:
                    await self._send(GoAway(reason, self.last_request_id, message))
                elif self.proto.state is State.HANDSHAKE:
                    await self._send(error_message(0, ErrorCode.SHUTTING_DOWN, message))
            with trio.move_on_at(deadline):
                while self._in_flight:
                    await self._drained.park()
            self._close_gracefully()
        await self.closed.wait()

    async def _idle_watchdog(self) -> None:
        with self._idle_scope:
            await trio.sleep_forever()
        idle = self.config.client_idle_timeout
        logger.info("%s: closing idle connection from %s", self.node.node_id, self.peer)
        with trio.move_on_after(COURTESY_SECONDS):
            if self._draining:  # a GOAWAY (shutdown) went out already
                pass
            elif self.proto.state is State.OPEN:
                self._draining = True
                why = f"no frames received and no requests in flight for {idle:g} s"
                await self._send(GoAway("idle_timeout", self.last_request_id, why))
            else:
                await self._send(
                    error_message(0, ErrorCode.TIMEOUT, f"no HELLO received within {idle:g} s")
                )
        self._close_gracefully()

    def _touch(self) -> None:
        """A frame arrived: restart the idle countdown unless requests are in flight."""
        if not self._in_flight:
            self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout

    # -------------------------------------------------------------- writing

    async def _send(self, message: Message, *, count: bool = True) -> bool:
        """Write one message; False if the connection can no longer carry it.

        Raises FrameTooLarge / ValueNotEncodable (before anything is written)
        when the message can't be encoded for this peer.
        """
        async with self._write_lock:
            try:
                data = self.proto.send(message)
            except ProtocolViolation as exc:
                logger.debug("%s: not sending %s: %s", self.node.node_id, message.kind.name, exc)
                return False
            # Counted before writing: the peer may act on the bytes before send_all returns.
            if isinstance(message, Error) and count and not self.is_control_client:
                self.node.stats.errors_sent[message.name] += 1
            try:
                await self.stream.send_all(data)
            except _TRANSPORT_ERRORS as exc:
                logger.debug("%s: write to %s failed: %r", self.node.node_id, self.peer, exc)
                self.abort()
                return False
        return True

    async def _send_reply(self, reply: Response | Error, *, count: bool) -> bool:
        """Write a request's reply; one that can't go out becomes an ERROR for that request.

        A reply above the client's HELLO ``max_frame`` (the encoder refuses it
        before writing a byte) is answered FRAME_TOO_LARGE; the connection
        stays open for the next request.
        """
        details: dict[str, int] = {}
        try:
            return await self._send(reply, count=count)
        except FrameTooLarge as exc:
            what = "result" if isinstance(reply, Response) else f"{reply.name} reply"
            code = ErrorCode.FRAME_TOO_LARGE
            text = (
                f"{what} of {exc.size} bytes exceeds the client's maximum frame of"
                f" {exc.limit} bytes; use a LIMIT or a result stream"
            )
            details = {"frame_size": exc.size, "max_frame": exc.limit}
            logger.info("%s: reply to %s too large: %s", self.node.node_id, self.peer, text)
        except ValueNotEncodable as exc:
            code, text = ErrorCode.INTERNAL, f"the reply can't be encoded: {exc}"
        error = error_message(reply.request_id, code, text, details=details)
        return await self._send(error, count=count)

    async def _fatal(self, code: ErrorCode, text: str) -> None:
        """The byte stream is broken: best-effort ERROR (+ GOAWAY), then close."""
        if not self.is_control_client:
            self.node.stats.bad_frames += 1
        logger.warning("%s: protocol error from %s: %s", self.node.node_id, self.peer, text)
        self._linger = True
        with trio.move_on_after(COURTESY_SECONDS):
            await self._send(error_message(0, code, text))
            if self.proto.state is State.OPEN:
                self._draining = True
                await self._send(GoAway("protocol_error", self.last_request_id, text))

    # -------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except _TRANSPORT_ERRORS as exc:
                logger.debug("%s: read from %s failed: %r", self.node.node_id, self.peer, exc)
                return
            if not data:
                try:
                    self.proto.receive_eof()
                except FrameError as exc:
                    logger.debug("%s: %s: %s", self.node.node_id, self.peer, exc)
                return
            self.proto.receive_data(data)
            if not await self._process_events():
                return

    async def _process_events(self) -> bool:
        """Handle every complete frame buffered; False when the connection must close."""
        while True:
            try:
                event = self.proto.next_event()
            except FrameTooLarge as exc:
                await self._fatal(ErrorCode.FRAME_TOO_LARGE, str(exc))
                return False
            except (FrameError, ProtocolViolation) as exc:
                await self._fatal(ErrorCode.PARSE_ERROR, str(exc))
                return False
            if event is None:
                return True
            self._touch()
            if not await self._handle(event):
                return False

    async def _handle(self, event: Message | BadMessage) -> bool:
        if isinstance(event, BadMessage):
            if not self.is_control_client:
                self.node.stats.bad_frames += 1
            logger.info("%s: bad frame from %s: %s", self.node.node_id, self.peer, event.error)
            await self._send(
                error_message(event.request_id, ErrorCode.PARSE_ERROR, str(event.error))
            )
            if self.proto.state is not State.OPEN:  # a bad first frame ends the handshake
                self._linger = True
                return False
            return True
        if isinstance(event, Hello):
            return await self._handshake(event)
        if isinstance(event, Request):
            await self._on_request(event)
        elif isinstance(event, Cancel):
            scope = self._in_flight.get(event.request_id)
            if scope is not None:
                scope.cancel()
        elif isinstance(event, Ping):
            if self.is_control_client or not self.node.faults.pings_stopped:
                if not self.is_control_client:
                    self.node.stats.pings_answered += 1
                await self._send(Pong(event.request_id))
        elif isinstance(event, GoAway):
            self._client_goaway = True
            if not self._in_flight:
                self._linger = True
                return False
        else:  # PONG, STREAM_CREDIT: nothing to do for this server
            logger.debug("%s: ignoring %s from %s", self.node.node_id, event.kind.name, self.peer)
        return True

    # ------------------------------------------------------------ handshake

    async def _handshake(self, hello: Hello) -> bool:
        node = self.node
        version = choose_version(hello.versions)
        if version is None:
            supported = list(PROTOCOL_VERSIONS)
            text = (
                f"no common protocol version: client offers {list(hello.versions)},"
                f" node speaks {supported}"
            )
            await self._send(
                error_message(
                    0, ErrorCode.VERSION_MISMATCH, text, details={"supported_versions": supported}
                )
            )
            self._linger = True
            return False
        if not self._authenticated(hello):
            await self._send(
                error_message(0, ErrorCode.UNAUTHENTICATED, "bad or missing credentials")
            )
            self._linger = True
            return False
        if self.config.credentials is not None and hello.credentials:
            self.user = hello.credentials.get("user")
        if hello.client_name == CONTROL_CLIENT_NAME:
            node.mark_control_client(self)
        welcome = Welcome(
            version=version,
            node_id=node.node_id,
            session_id=uuid.uuid4().hex,
            max_frame_size=self.config.max_frame_size,
            max_in_flight=self.config.max_in_flight,
            idle_timeout_ms=round(self.config.client_idle_timeout * 1000),
            members=node.members(),
            server_name=self.config.server_name,
        )
        try:
            return await self._send(welcome)
        except (FrameTooLarge, ValueNotEncodable) as exc:
            logger.warning("%s: cannot send WELCOME to %s: %s", node.node_id, self.peer, exc)
            return False

    def _authenticated(self, hello: Hello) -> bool:
        expected = self.config.credentials
        if expected is None:
            return True
        auth = hello.credentials or {}
        user, password = auth.get("user"), auth.get("password")
        if user is None or password is None or user not in expected:
            return False
        return hmac.compare_digest(expected[user].encode(), password.encode())

    # ------------------------------------------------------------- requests

    async def _on_request(self, request: Request) -> None:
        control = is_control_method(request.method)
        count = not (control or self.is_control_client)
        if count:
            self.node.stats.requests_by_method[request.method] += 1
        rid = request.request_id
        rejection: tuple[ErrorCode, str] | None = None
        if rid == 0:
            rejection = ErrorCode.INVALID_REQUEST, "request id 0 is reserved for the connection"
        elif self._draining:
            rejection = ErrorCode.SHUTTING_DOWN, "the connection is closing (GOAWAY sent)"
        elif rid in self._in_flight:
            rejection = ErrorCode.INVALID_REQUEST, f"request id {rid} is already in flight"
        elif len(self._in_flight) >= self.config.max_in_flight:
            rejection = (
                ErrorCode.CAPACITY_EXCEEDED,
                f"{len(self._in_flight)} requests in flight, the maximum per connection",
            )
        if rejection is not None:
            await self._send(error_message(rid, *rejection), count=count)
            return
        now = trio.current_time()
        budget = self.config.request_timeout
        if request.deadline_ms is not None:
            budget = min(budget, request.deadline_ms / 1000)
        self.last_request_id = max(self.last_request_id, rid)
        scope = trio.CancelScope()
        self._in_flight[rid] = scope
        self._idle_scope.deadline = math.inf
        assert self._nursery is not None
        self._nursery.start_soon(self._run_request, request, scope, now + budget, count)

    async def _run_request(
        self, request: Request, scope: trio.CancelScope, deadline: float, count: bool
    ) -> None:
        rid = request.request_id
        try:
            outcome = None
            reply: Response | Error | None = None
            with scope:
                try:
                    outcome = await run_method(self.node, self, request, deadline)
                except RequestFailed as exc:
                    reply = exc.to_message(rid)
                except Exception as exc:
                    logger.exception("%s: method %r failed", self.node.node_id, request.method)
                    reply = error_message(
                        rid, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
                    )
            if scope.cancelled_caught:  # CANCEL from the client: send nothing
                return
            if reply is None:
                if outcome is None:  # deliberately unanswered (pings stopped)
                    return
                if outcome.drop_connection:  # drop_after_commit: the reply is lost
                    logger.info(
                        "%s: dropping the connection from %s after %s (request %d) committed",
                        self.node.node_id,
                        self.peer,
                        request.method,
                        rid,
                    )
                    self.abort()
                    return
                reply = Response(rid, outcome.result)
            sent = await self._send_reply(reply, count=count)
            if sent and outcome is not None and outcome.after_reply is not None:
                outcome.after_reply()
        finally:
            del self._in_flight[rid]
            if not self._in_flight:
                self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout
                self._drained.unpark_all()
                if self._client_goaway:
                    self._close_gracefully()
