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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import (
    BadMessage,
    Cancel,
    Error,
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
    Response,
    State,
    StreamCredit,
    ValueNotEncodable,
    Welcome,
    error_message,
    receive_event,
)
from ._failure import RequestFailed
from .context import SessionState
from .feeds import FEED_METHODS, ConnectionFeeds
from .ledger import RequestLedger, Slot
from .methods import DATA_METHODS, MethodContext, Outcome, is_control_method, run_method
from .outgoing import (
    COURTESY_SECONDS,
    LINGER_SECONDS,
    RECEIVE_SIZE,
    WatchedStream,
    bounded_error,
    close_stream,
    fewer_members,
    minimal_error,
)
from .wire import NodeProtocol

if TYPE_CHECKING:
    from .server import QdbNode

__all__ = ["COURTESY_SECONDS", "LINGER_SECONDS", "ServerConnection", "close_stream"]

logger = logging.getLogger("qdb_client.testing")

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: Method names counted under their own name in ``requests_by_method``.
_KNOWN_METHODS = frozenset({*DATA_METHODS, *FEED_METHODS})
#: What the control tool may call without a user, on a node that requires credentials.
_USERLESS_METHODS = frozenset({"ping"})


class ServerConnection:
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

    def _stop_writing(self) -> None:
        """No more bytes on this connection: the write in progress is cut short (the
        connection is closing without its frames), later ones write nothing."""
        self._writes_stopped = True
        if self._writing is not None:
            self._writing.cancel()

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

    # -------------------------------------------------------------- writing

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
            except _TRANSPORT_ERRORS as exc:
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
            except _TRANSPORT_ERRORS as exc:
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

    def _not_allowed(self, method: str, control: bool) -> tuple[ErrorCode, str] | None:
        """PERMISSION_DENIED for a ``control.*`` call that is not the control tool's (in
        test mode; elsewhere there are none), and for data methods of the control tool
        that logged in without a user on a node that requires credentials."""
        if control:
            if self.config.test_mode and not self.is_control_client:
                self.node.stats.control_refused += 1
                return (
                    ErrorCode.PERMISSION_DENIED,
                    f"{method} is for the control tool: its HELLO must carry the node's"
                    " control token (auth control_token; see docs/testing.md)",
                )
            return None
        if (
            self.is_control_client
            and self.user is None
            and self.config.credentials is not None
            and method not in _USERLESS_METHODS
        ):
            return (
                ErrorCode.PERMISSION_DENIED,
                f"the control tool logged in without a user; {method} needs credentials",
            )
        return None

    async def _on_request(self, request: Request) -> None:
        control = is_control_method(request.method)
        count = not (control or self.is_control_client)
        if count:
            self.node.stats.count_request(request.method, known=request.method in _KNOWN_METHODS)
        rid = request.request_id
        rejection: tuple[ErrorCode, str] | None = None
        if rid == 0:
            rejection = ErrorCode.INVALID_REQUEST, "request id 0 is reserved for the connection"
        elif (denied := self._not_allowed(request.method, control)) is not None:
            rejection = denied
        elif self._draining:
            rejection = ErrorCode.SHUTTING_DOWN, "the connection is closing (GOAWAY sent)"
        else:
            rejection = self._requests.refusal(rid)
        if rejection is not None:
            await self._send(error_message(rid, *rejection), count=count)
            return
        now = trio.current_time()
        budget = self.config.request_timeout
        if request.deadline_ms is not None:
            budget = min(budget, request.deadline_ms / 1000)
        self.last_request_id = max(self.last_request_id, rid)
        slot = self._requests.accept(rid)
        self.state.arrived(request.method, request.args, rid)  # a transaction's order
        self._idle_scope.deadline = math.inf
        assert self._nursery is not None
        if request.method in FEED_METHODS:  # a result stream or a subscription (.feeds)
            self._nursery.start_soon(self._run_feed, request, slot, now + budget)
            return
        self._nursery.start_soon(self._run_request, request, slot, now + budget, count)

    async def _run_feed(self, request: Request, slot: Slot, deadline: float) -> None:
        """A stream or subscription: it writes its own frames; its slot is freed at
        its end (a subscription's once its RESPONSE is out), the request answered then."""
        rid = request.request_id
        try:
            await self.feeds.serve(request, slot, deadline, lambda: self._requests.free(rid, slot))
        finally:
            self._requests.free(rid, slot)
            if self._requests.answered():
                self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout
                if self._client_goaway:
                    self._close_gracefully()

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

    async def _run_request(
        self, request: Request, slot: Slot, deadline: float, count: bool
    ) -> None:
        rid = request.request_id
        try:
            reply, outcome = await self._decide(request, slot, deadline)
            # The transaction's next request may run (or the transaction ends).
            self.state.finished(rid, reply.name if isinstance(reply, Error) else None)
            self._requests.free(rid, slot)  # before the write (see .ledger)
            if reply is None:
                return
            if isinstance(reply, Error) and reply.name == ErrorCode.CANCELLED.value and count:
                self.node.stats.requests_cancelled += 1
            applied = outcome is not None and outcome.applied
            sent = await self._send_reply(reply, count=count, applied=applied)
            if applied:
                self.feeds.node.committed()  # subscriptions look at the change log now
            if sent and outcome is not None and outcome.after_reply is not None:
                outcome.after_reply()
        finally:
            self.state.finished(rid)
            self._requests.free(rid, slot)
            if self._requests.answered():
                self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout
                if self._client_goaway:
                    self._close_gracefully()

    async def _decide(
        self, request: Request, slot: Slot, deadline: float
    ) -> tuple[Response | Error | None, Outcome | None]:
        """Run the request; its reply (None: send nothing) and its outcome if it succeeded.

        A request that completed keeps its reply even if a CANCEL came too
        late to stop it; one stopped by CANCEL (an interrupted statement
        included) is CANCELLED: nothing of it was applied or stored.
        """
        rid = request.request_id
        outcome: Outcome | None = None
        reply: Error | None = None
        hung = False
        with slot.scope:
            try:
                outcome = await run_method(self._method_context(), request, deadline)
                if outcome is None:  # pings stopped: hold the slot, never answer
                    hung = True
                    await trio.sleep_until(deadline)
            except RequestFailed as exc:
                reply = exc.to_message(rid)
            except Exception as exc:
                logger.exception("%s: method %r failed", self.node.node_id, request.method)
                reply = error_message(
                    rid, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
                )
        if hung:
            return None, None
        if outcome is not None:
            if outcome.drop_connection:  # drop_after_commit: the reply is lost
                logger.info(
                    "%s: dropping the connection from %s after %s (request %d) committed",
                    self.node.node_id,
                    self.peer,
                    request.method,
                    rid,
                )
                self.abort()
                return None, None
            return Response(rid, outcome.result, replayed=outcome.replayed), outcome
        if slot.cancel_requested:
            logger.debug("%s: request %d from %s cancelled", self.node.node_id, rid, self.peer)
            text = f"request {rid} was cancelled by the client and stopped; nothing was applied"
            return error_message(rid, ErrorCode.CANCELLED, text, details={"executed": False}), None
        assert reply is not None
        return reply, None
