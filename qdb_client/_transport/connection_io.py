"""The I/O half of a :class:`~.connection.Connection`: the handshake, the
writer and reader tasks, what each frame from the node does (a reply to its
waiter, a PING answered, a GOAWAY's withdrawals, a feed's page), and the one
failure that ends every waiter.

``Connection`` (``connection.py``) keeps the requests' side: reserving slots,
queueing frames, cancellation, orphans and feeds. Both work on the state set
up in ``Connection.__init__``; this mixin only declares what it uses.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..errors import (
    ClientClosed,
    ConnectError,
    ConnectionDraining,
    ConnectionLost,
    FrameError,
    HandshakeError,
    MessageError,
    ProtocolError,
    ProtocolViolation,
    QdbError,
    VersionMismatch,
)
from ..protocol import (
    BadMessage,
    Error,
    GoAway,
    Hello,
    Message,
    Ping,
    Pong,
    ProtocolConnection,
    Response,
    StreamEnd,
    Welcome,
    error_from_message,
    receive_event,
    receive_events,
)
from ..protocol.reader import ByteSource
from .direct import DirectWriter
from .feeds import FEED_KINDS, Feed
from .pending import PendingRequest

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["NO_DATA", "ConnectionIO", "ConnectionListener", "copy_error"]

_MAX_WRITE_BATCH = 256 * 1024
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: What a request's frame bytes become once written (they are not kept).
NO_DATA = b""


class ConnectionListener(Protocol):
    """What a connection tells its owner (the pool), synchronously."""

    def connection_unusable(self, connection: Connection) -> None:
        """It stopped taking new requests: once on the first GOAWAY, once when it
        fails or closes."""

    def slot_freed(self, connection: Connection) -> None:
        """One or more request slots became free (a reply, a batch of replies, a
        confirmed orphan, a withdrawal)."""

    def orphaned(self, connection: Connection, forget_at: float) -> None:
        """A request became an orphan, forgotten at ``forget_at`` if never confirmed
        (the owner calls :meth:`Connection.expire_orphans` by then)."""


class ConnectionIO:
    """The handshake, the I/O loops and the failure path of a connection (the
    state is :class:`~.connection.Connection`'s, set in its ``__init__``)."""

    address: str
    serial: int
    error: QdbError | None
    draining_reason: str | None
    welcome: Welcome | None
    last_activity: float
    last_received: float
    bad_messages: int
    unknown_replies: int
    late_replies_dropped: int
    _listener: ConnectionListener | None
    _stream: trio.abc.Stream
    _protocol: ProtocolConnection
    _direct: DirectWriter | None
    _waiting: dict[int, PendingRequest]
    _orphans: dict[int, PendingRequest]
    _feeds: dict[int, Feed]
    _outbox: deque[PendingRequest | bytes]
    _outbox_lot: trio.lowlevel.ParkingLot
    _slot_lot: trio.lowlevel.ParkingLot
    _queued_bytes: int
    _in_flight: int
    _pins: int
    _scope: trio.CancelScope
    _writing: bool
    _coalesce: bool
    #: Tell the listener, if any (they pass it the Connection itself).
    _slot_freed: Callable[..., None]
    _notify_unusable: Callable[[], None]

    def _queue_bytes(self, data: bytes) -> None:
        """Queue raw frame bytes (CANCEL, PONG, a partly written frame)."""
        self._queued_bytes += len(data)
        self._outbox.append(data)
        if self._outbox_lot:  # (the writer may be awake already)
            self._outbox_lot.unpark()

    def _release_slot(self, pending: PendingRequest) -> None:
        if pending.holds_slot:  # at most once per request
            pending.holds_slot = False
            self._in_flight -= 1
            self._slot_freed()

    def _fail(self, error: QdbError) -> None:
        """Record the first failure, fail every waiter, stop the tasks."""
        if self.error is not None:
            return
        self.error = error
        waiting, self._waiting = self._waiting, {}
        self._orphans.clear()
        for pending in waiting.values():
            pending.holds_slot = False
            pending._finish(error=copy_error(error, request_sent=pending.sent))
        feeds, self._feeds = self._feeds, {}
        for feed in feeds.values():
            feed.failed(copy_error(error, request_sent=True))
        self._outbox.clear()
        self._queued_bytes = 0
        self._in_flight = 0
        self._pins = 0
        self._slot_lot.unpark_all()
        self._scope.cancel()
        self._notify_unusable()

    async def _guard(self, loop: Any) -> None:
        try:
            await loop()
        except _TRANSPORT_ERRORS as exc:
            self._fail(self._lost(f"transport failed: {exc!r}", exc))
        except (FrameError, ProtocolViolation) as exc:
            self._fail(self._lost(f"protocol error from node: {exc}", exc))
        except QdbError as exc:
            self._fail(exc)
        except Exception as exc:  # a bug must not crash the owner's nursery
            self._fail(self._lost(f"internal error: {exc!r}", exc))

    def _lost(self, message: str, cause: BaseException) -> ConnectionLost:
        error = ConnectionLost(
            f"connection to {self.address} lost: {message}",
            node=self.address,
            failure_id=self.serial,
        )
        error.__cause__ = cause
        return error

    async def _handshake(self, hello: Hello) -> Welcome:
        try:
            await self._stream.send_all(self._protocol.send(hello))
            event = await receive_event(self._protocol, self._stream)
            if event is None:
                raise ConnectError(
                    f"{self.address} closed the connection during the handshake",
                    node=self.address,
                )
            return self._handshake_reply(event)
        except _TRANSPORT_ERRORS as exc:
            raise ConnectError(
                f"handshake with {self.address} failed: {exc!r}", node=self.address
            ) from exc
        except ProtocolError as exc:
            raise HandshakeError(
                f"invalid handshake reply from {self.address}: {exc}", node=self.address
            ) from exc

    def _handshake_reply(self, event: Message | BadMessage) -> Welcome:
        if isinstance(event, Welcome):
            self.welcome = event
            self.last_activity = trio.current_time()
            return event
        if isinstance(event, Error):
            if event.name == "VERSION_MISMATCH":
                offered = event.details.get("supported_versions")
                if not isinstance(offered, list):
                    offered = []
                raise VersionMismatch(
                    f"{self.address} speaks none of our protocol versions: {event.message}",
                    supported_versions=[v for v in offered if isinstance(v, int) and 0 < v < 256],
                    node=self.address,
                )
            raise error_from_message(event, node=self.address)
        raise HandshakeError(
            f"unexpected handshake reply from {self.address}: {event!r:.300}", node=self.address
        )

    # ----------------------------------------------------------- I/O loops

    async def _write_loop(self) -> None:
        outbox = self._outbox
        while True:
            if not outbox:
                await self._outbox_lot.park()
                continue
            chunks = []
            size = 0
            while outbox and size < _MAX_WRITE_BATCH:
                item = outbox.popleft()
                if isinstance(item, PendingRequest):
                    data = item.data
                    self._queued_bytes -= len(data)
                    if item.withdrawn:
                        self._release_slot(item)
                        continue
                    item.sent = True
                    item.data = NO_DATA  # the frame's bytes are not kept past their write
                else:
                    data = item
                    self._queued_bytes -= len(data)
                chunks.append(data)
                size += len(data)
            self._coalesce = False
            if chunks:
                self._writing = True
                await self._stream.send_all(b"".join(chunks))
                self._writing = False
                self.last_activity = trio.current_time()
            if self._slot_lot:
                self._slot_lot.unpark_all()  # room in the outbox again

    async def _read_loop(self) -> None:
        protocol = self._protocol
        stream: ByteSource = self._stream
        if self._direct is not None:
            stream = self._direct.reader(self._stream)
        while True:
            events = await receive_events(protocol, stream)
            if events is None:
                reason = self.draining_reason or "without GOAWAY"
                raise ConnectionLost(
                    f"{self.address} closed the connection ({reason})",
                    node=self.address,
                    failure_id=self.serial,
                )
            self.last_activity = self.last_received = trio.current_time()
            # Many replies at once wake many callers, whose next requests
            # then go out together through the writer (one send for all)
            # instead of one direct send each.
            self._coalesce = len(events) > 1
            freed = 0
            for event in events:
                if type(event) is Response and not self._feeds:
                    pending = self._waiting.pop(event.request_id, None)
                    if pending is not None:
                        # The common reply, inline (what _deliver does); the slots
                        # it frees are announced once for the whole batch, below.
                        if event.replayed:
                            pending.replayed = True
                        if pending.holds_slot:
                            pending.holds_slot = False
                            self._in_flight -= 1
                            freed += 1
                        pending._finish(event.result)
                        continue
                try:
                    self._dispatch(event)
                except Exception as exc:  # a bad reply fails its own request only
                    self.bad_messages += 1
                    self._deliver(
                        getattr(event, "request_id", 0),
                        error=MessageError(f"unusable reply from {self.address}: {exc!r:.300}"),
                    )
            if freed:
                self._slot_freed(freed)

    def _dispatch(self, event: Message | BadMessage) -> None:
        if self._feeds and isinstance(event, FEED_KINDS):
            feed = self._feeds.get(event.request_id)
            if feed is not None and feed.frame(event):
                return  # a page or an event, now in its feed's bounded buffer
        if isinstance(event, Response):
            if event.replayed:
                pending = self._waiting.get(event.request_id)
                if pending is not None:
                    pending.replayed = True
            self._deliver(event.request_id, result=event.result)
        elif isinstance(event, Error):
            if event.request_id == 0:
                self.bad_messages += 1  # connection-level complaint; a GOAWAY or EOF follows
            elif event.request_id in self._waiting:
                self._deliver(event.request_id, error=error_from_message(event, node=self.address))
            else:
                self._deliver(event.request_id)  # an orphan's confirmation, or unknown
        elif isinstance(event, Pong):
            self._deliver(event.request_id, result=None)
        elif isinstance(event, Ping):
            self._queue_bytes(self._protocol.send(Pong(event.request_id)))
        elif isinstance(event, GoAway):
            self._on_goaway(event)
        elif isinstance(event, BadMessage):
            self.bad_messages += 1
            if event.request_id in self._waiting:
                # The reply was corrupted in transit: the request ran, its
                # result is lost. The MessageError says so.
                self._deliver(event.request_id, error=event.error)
            elif event.request_id in self._orphans:
                self._deliver(event.request_id)
        elif isinstance(event, StreamEnd):
            self._deliver(event.request_id, result=event)  # the stream's request is over
        # Other STREAM_PAGE and EVENT frames have no feed (a stream or subscription
        # that ended, or unsolicited EVENTs): they are dropped.

    def _deliver(
        self, request_id: int, *, result: Any = None, error: QdbError | None = None
    ) -> None:
        pending = self._waiting.pop(request_id, None)
        if pending is None:
            orphan = self._orphans.pop(request_id, None)
            if orphan is None:
                self.unknown_replies += 1
            else:
                self.late_replies_dropped += 1
                self._release_slot(orphan)
            return
        self._release_slot(pending)
        pending._finish(result, error)

    def _on_goaway(self, goaway: GoAway) -> None:
        first = self.draining_reason is None
        self.draining_reason = goaway.reason
        if first:
            self._notify_unusable()
        doomed = [
            rid
            for rid, pending in self._waiting.items()
            if rid > goaway.last_request_id and pending.holds_slot
        ]  # pings hold no slot and are still answered (protocol section 11)
        for request_id in doomed:
            pending = self._waiting.pop(request_id)
            pending.withdrawn = True
            self._release_slot(pending)
            error = ConnectionDraining(
                f"{self.address} is draining ({goaway.reason}); "
                f"request {request_id} was not processed",
                reason=goaway.reason,
                node=self.address,
            )
            pending._finish(error=error)
            feed = self._feeds.pop(request_id, None)
            if feed is not None:
                feed.failed(error)
        for request_id in [rid for rid in self._orphans if rid > goaway.last_request_id]:
            self._release_slot(
                self._orphans.pop(request_id)
            )  # never processed: nothing to wait for
        self._slot_lot.unpark_all()


def copy_error(error: QdbError, *, request_sent: bool) -> QdbError:
    """A fresh exception per waiter, so tracebacks don't pile up on one object."""
    if isinstance(error, ConnectionLost):
        copy: QdbError = ConnectionLost(
            str(error), node=error.node, request_sent=request_sent, failure_id=error.failure_id
        )
    elif isinstance(error, ClientClosed):
        copy = ClientClosed(str(error))
    else:
        return error
    copy.__cause__ = error.__cause__
    return copy
