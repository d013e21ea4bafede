"""One client connection of a test node: handshake, reader, concurrent requests, closing.

A :class:`ServerConnection` owns one ``trio.abc.Stream``. A single reader
(:func:`~qdb_client.protocol.receive_event`) feeds the sans-IO
:class:`~qdb_client.protocol.ProtocolConnection`; each REQUEST runs in its
own task and its reply is written when it completes, so replies leave in
completion order. Writes are serialised by a ``trio.StrictFIFOLock``.
Nothing a client sends raises out of :meth:`ServerConnection.run`: a bad
frame is answered with PARSE_ERROR, a broken byte stream with PARSE_ERROR
(or FRAME_TOO_LARGE) plus GOAWAY ``protocol_error`` and a close.

Every accepted request gets exactly one reply (docs/protocol.md 8.1, 8.3),
except under the faults that lose it on purpose (``stop_pings``,
``drop_after_commit``). A CANCEL stops a request that is still running and
is answered CANCELLED; one that finished already has had its reply. The
:class:`~.ledger.RequestLedger` frees a request's slot before its reply is
written, and counts it unanswered until the reply was written; once
``max_in_flight`` + 1 requests are unanswered the reader waits (TCP
backpressure on a client that does not read its replies).

Everything sent fits the client's HELLO ``max_frame`` or is not sent: an
ERROR is cut down to fit (:mod:`.outgoing`), a WELCOME lists fewer
members, and a RESPONSE too large is answered FRAME_TOO_LARGE.

:class:`ServerConnection` holds the connection's state, its lifecycle (idle
watchdog, drain, close), the reader and the handshake. It inherits its write
path from :class:`~.sending.ConnectionSender` and the admission and running of
its requests from :class:`~.dispatch.RequestRunner`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import (
    BadMessage,
    Cancel,
    ErrorCode,
    FrameError,
    FrameTooLarge,
    GoAway,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolViolation,
    Request,
    State,
    StreamCredit,
    ValueNotEncodable,
    Welcome,
    error_message,
    receive_event,
)
from .context import SessionState
from .dispatch import RequestRunner
from .feeds import ConnectionFeeds
from .ledger import RequestLedger
from .methods import MethodContext
from .outgoing import (
    COURTESY_SECONDS,
    LINGER_SECONDS,
    RECEIVE_SIZE,
    WatchedStream,
    close_stream,
    fewer_members,
)
from .sending import TRANSPORT_ERRORS
from .wire import NodeProtocol

if TYPE_CHECKING:
    from .server import QdbNode

__all__ = ["COURTESY_SECONDS", "LINGER_SECONDS", "ServerConnection", "close_stream"]

logger = logging.getLogger("qdb_client.testing")


class ServerConnection(RequestRunner):
    """The server side of one client connection."""

    def __init__(
        self,
        node: QdbNode,
        stream: trio.abc.Stream,
        peer: str,
        *,
        handshake_deadline: float | None = None,
        on_handshake: Callable[[], None] | None = None,
    ) -> None:
        self.node = node
        self.stream = stream
        #: Who is at the other end (``host:port`` or a description).
        self.peer = peer
        self.config = node.config
        self.proto = NodeProtocol(max_frame_size=node.config.max_frame_size)
        #: The session's transactions and prepared statements (docs/protocol.md 10.2, 10.3).
        self.state = SessionState(
            node_transactions=node.transactions,
            close_connection=node.storage.close_connection,
            max_prepared=node.config.max_prepared,
            transaction_idle_timeout=node.config.transaction_idle_timeout,
            spawn=self._spawn,
        )
        #: True once HELLO named the control tool; its traffic is not counted.
        self.is_control_client = False
        #: The user HELLO authenticated as (None on a node without credentials).
        self.user: str | None = None
        #: Highest request id accepted for processing (GOAWAY ``last_request_id``).
        self.last_request_id = 0
        #: Set once the stream has been closed.
        self.closed = trio.Event()
        self._write_lock = trio.StrictFIFOLock()
        self._requests = RequestLedger(node.config.max_in_flight)
        self._context: MethodContext | None = None
        self._scope = trio.CancelScope()
        self._idle_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._linger = False
        self._draining = False
        self._client_goaway = False
        #: When the handshake must be done (None: ``handshake_timeout`` from :meth:`run`).
        self._handshake_deadline = handshake_deadline
        self._on_handshake = on_handshake
        #: Bytes of encoded replies waiting for (or in) their write.
        self._queued = 0
        #: The scope of the write in progress (:meth:`_write`), and whether the
        #: connection stopped writing for good (aborted).
        self._writing: trio.CancelScope | None = None
        self._writes_stopped = False
        #: Its result streams and subscriptions (.feeds).
        self.feeds = ConnectionFeeds(self)

    @property
    def in_flight(self) -> int:
        """Requests holding a slot: accepted, and their reply not decided yet."""
        return self._requests.in_flight

    @property
    def queued_reply_bytes(self) -> int:
        """Bytes of replies encoded and waiting to be written (bounded by
        ``max_queued_reply_bytes``)."""
        return self._queued

    @property
    def reply_limit(self) -> int:
        """The largest reply for this client: its HELLO ``max_frame``, at most the
        node's ``max_result_size``."""
        return min(self.proto.peer_max_frame_size, self.config.max_result_size)

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it closes; never raises (other than Cancelled)."""
        now = trio.current_time()
        if self._handshake_deadline is None:
            self._handshake_deadline = now + self.config.handshake_timeout
        self._idle_scope.deadline = min(
            now + self.config.client_idle_timeout, self._handshake_deadline
        )
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
            # Every request is over (the nursery waited): roll back what is still open.
            self.state.close()
            if self._on_handshake is not None:  # no handshake: its place is free now
                self._on_handshake()
                self._on_handshake = None
            await close_stream(self.stream, linger=self._linger)
            self.closed.set()
            logger.debug("%s: connection from %s closed", self.node.node_id, self.peer)

    def _spawn(self, fn: Any) -> None:
        """Start ``fn()`` in the connection's nursery (a transaction's idle timer)."""
        if self._nursery is not None:
            self._nursery.start_soon(fn)

    def abort(self) -> None:
        """Close abruptly: no GOAWAY, in-flight requests are abandoned."""
        self._linger = False
        self._stop_writing()
        self._scope.cancel()

    def _close_gracefully(self) -> None:
        if self._scope.cancel_called:  # closing already (maybe abruptly): keep that choice
            return
        self._linger = True
        self._scope.cancel()

    async def drain(self, reason: str, message: str, deadline: float) -> None:
        """Send GOAWAY ``reason``, let in-flight requests finish until ``deadline``, close.

        Requests arriving after the GOAWAY get SHUTTING_DOWN without running.
        Closes once every accepted request has been answered (reply written).
        """
        if not self._draining:
            self._draining = True
            with trio.move_on_at(deadline + COURTESY_SECONDS):
                if self.proto.state is State.OPEN:
                    await self._send(GoAway(reason, self.last_request_id, message))
                elif self.proto.state is State.HANDSHAKE:
                    await self._send(error_message(0, ErrorCode.SHUTTING_DOWN, message))
            self.feeds.drain(reason)  # streams and subscriptions go on elsewhere
            with trio.move_on_at(deadline):
                await self._requests.wait_answered()
            self._close_gracefully()
        await self.closed.wait()

    async def _idle_watchdog(self) -> None:
        try:
            await self._watch_idle()
        finally:
            # It ends only with the connection: a closing that is not graceful (the
            # node cancelled, the peer gone) need not wait for a write to finish.
            if not self._linger:
                self._stop_writing()

    async def _watch_idle(self) -> None:
        while True:
            with self._idle_scope:
                await trio.sleep_forever()
            # The reader may have run in the same batch as the expiry: a request it
            # accepted, or a frame that restarted the countdown, means not idle.
            deadline = self._idle_scope.deadline
            if not self._requests.unanswered and deadline <= trio.current_time():
                break
            self._idle_scope = trio.CancelScope(deadline=deadline)
        idle = self.config.client_idle_timeout
        if self.proto.state is State.OPEN:
            logger.info("%s: closing idle connection from %s", self.node.node_id, self.peer)
        else:
            logger.info(
                "%s: closing connection from %s: no handshake in time", self.node.node_id, self.peer
            )
            self.node.stats.handshake_timeouts += 1
        with trio.move_on_after(COURTESY_SECONDS):
            if self._draining:  # a GOAWAY (shutdown) went out already
                pass
            elif self.proto.state is State.OPEN:
                self._draining = True
                why = f"no frames received and no requests in flight for {idle:g} s"
                await self._send(GoAway("idle_timeout", self.last_request_id, why))
            else:
                within = min(idle, self.config.handshake_timeout)
                await self._send(
                    error_message(0, ErrorCode.TIMEOUT, f"no HELLO received within {within:g} s")
                )
        self._close_gracefully()

    def _touch(self) -> None:
        """A frame arrived: restart the idle countdown unless requests are unanswered
        (before the handshake is done, never beyond its deadline)."""
        if not self._requests.unanswered:
            deadline = trio.current_time() + self.config.client_idle_timeout
            if self.proto.state is not State.OPEN and self._handshake_deadline is not None:
                deadline = min(deadline, self._handshake_deadline)
            self._idle_scope.deadline = deadline

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
        source = WatchedStream(self.stream)
        while True:
            # A client that does not read its replies stops being read (TCP backpressure):
            # beyond its max_in_flight running requests, one reply at most waits to be written.
            await self._requests.wait_backlog_below(self.config.max_in_flight + 1)
            try:
                event = await receive_event(self.proto, source, read_size=RECEIVE_SIZE)
            except TRANSPORT_ERRORS as exc:
                logger.debug("%s: read from %s failed: %r", self.node.node_id, self.peer, exc)
                return
            except FrameTooLarge as exc:
                await self._fatal(ErrorCode.FRAME_TOO_LARGE, str(exc))
                return
            except (FrameError, ProtocolViolation) as exc:
                if source.at_eof:  # a frame cut short by the close: nobody left to tell
                    logger.debug("%s: %s: %s", self.node.node_id, self.peer, exc)
                else:
                    await self._fatal(ErrorCode.PARSE_ERROR, str(exc))
                return
            if event is None:
                return
            self._touch()
            if not await self._handle(event):
                return

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
            # A finished stream's or a subscription's first (.feeds), else a running request's.
            if not (await self.feeds.cancel(event.request_id)) and not self._requests.cancel(
                event.request_id
            ):  # answered, or never accepted
                logger.debug(
                    "%s: ignoring CANCEL of %d from %s: not in flight",
                    self.node.node_id,
                    event.request_id,
                    self.peer,
                )
        elif isinstance(event, Ping):
            if self.is_control_client or not self.node.faults.pings_stopped:
                if not self.is_control_client:
                    self.node.stats.pings_answered += 1
                await self._send(Pong(event.request_id))
        elif isinstance(event, StreamCredit):
            self.feeds.credit(event)
        elif isinstance(event, GoAway):
            self._client_goaway = True
            if not self._requests.unanswered:
                self._linger = True
                return False
        else:  # PONG, STREAM_CREDIT: nothing to do for this server
            logger.debug("%s: ignoring %s from %s", self.node.node_id, event.kind.name, self.peer)
        return True

    # ------------------------------------------------------------ handshake

    async def _handshake(self, hello: Hello) -> bool:
        node = self.node
        answer = await node.answer_hello(hello)  # version, credentials, session (.sessions)
        if not answer.accepted:
            await self._send(answer.reply)
            self._linger = True
            return False
        self.user = answer.user
        if answer.control_client:
            node.mark_control_client(self)
        welcome: Welcome | None = answer.reply if isinstance(answer.reply, Welcome) else None
        while welcome is not None:
            # Past eviction from here: a WELCOME being written must not be followed
            # by a closed connection (the client would count a lost connection).
            self._leave_handshake_places()
            try:
                sent = await self._send(welcome)
                if sent:
                    self._handshake_done()
                return sent
            except FrameTooLarge:
                welcome = fewer_members(welcome)
                if welcome is not None:
                    logger.warning(
                        "%s: WELCOME to %s too large for its maximum frame; trying %d members",
                        node.node_id,
                        self.peer,
                        len(welcome.members),
                    )
            except ValueNotEncodable as exc:
                logger.warning("%s: cannot send WELCOME to %s: %s", node.node_id, self.peer, exc)
                return False
        logger.warning("%s: cannot send WELCOME to %s: too large", node.node_id, self.peer)
        return False

    def _leave_handshake_places(self) -> None:
        if self._on_handshake is not None:
            self._on_handshake()
            self._on_handshake = None
            # The HELLO came in time: the WELCOME's write is bounded by write_timeout,
            # no longer by the handshake deadline the idle watchdog was holding.
            self._idle_scope.deadline = max(
                self._idle_scope.deadline, trio.current_time() + self.config.write_timeout
            )

    def _handshake_done(self) -> None:
        """The WELCOME went out: the handshake's place is free, the idle countdown runs."""
        self._leave_handshake_places()
        if not self._requests.unanswered:
            self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout

    # ------------------------------------------------------------- requests

    def _method_context(self) -> MethodContext:
        """What this connection's method handlers see (built once, after the handshake)."""
        if self._context is None:
            node = self.node
            self._context = MethodContext(
                node_id=node.node_id,
                storage=node.storage,
                faults=node.faults,
                stats=node.stats,
                test_mode=self.config.test_mode,
                scope=self.user or "",
                is_control_client=self.is_control_client,
                peer=self.peer,
                drop_other_connections=lambda: node.drop_connections(keep=self),
                count_other_connections=lambda: node.count_connections(exclude=self),
                start_shutdown=node.start_shutdown,
                statistics=node.statistics,
                max_frame=self.reply_limit,
                session=self.state,
            )
        return self._context
