"""One multiplexed connection to a node, and the ledger of its requests.

Layout: a caller encodes its REQUEST and puts it in the outbox (no await
between the protocol state change and the enqueue); a writer task drains the
outbox, coalescing frames into one ``send_all``; a reader task decodes
replies and hands each to the waiter registered under its request id.
That I/O side (the handshake, both tasks, what each frame from the node
does, the failure that ends every waiter) is :class:`.connection_io.ConnectionIO`,
which :class:`Connection` inherits; this module keeps the requests' side.

Why a writer task rather than callers writing under a lock: a caller
cancelled in the middle of ``send_all`` would leave half a frame on the
wire and poison a connection that other callers' requests share. Here a
caller's cancellation only ever withdraws a frame not yet written (it was
not sent) or abandons one already written (a CANCEL goes out and the late
reply is dropped: ids are never reused, so it can't reach another caller).
Only the connection's own failure can interrupt a write, and that fails
every waiter with a typed error.

The connection is the in-flight ledger of its node's work: ``in_flight``
counts requests reserved, queued, sent and *orphaned*. A request whose
caller gave up after it was written stays orphaned, still holding its slot,
until the node confirms it stopped (its reply, or the ERROR ``CANCELLED``
the node answers a CANCEL with; docs/protocol.md section 8.3), so a storm
of cancellations can never push more requests at the node than its
``max_in_flight``. An orphan the node never confirms is forgotten once its
deadline plus :data:`ORPHAN_GRACE` has passed. The pool reads its counts
from here and hears when a slot frees.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from typing import Any

import trio

from ..errors import (
    ClientClosed,
    ConnectionDraining,
    ConnectionLost,
    QdbError,
)
from ..protocol import (
    Cancel,
    Hello,
    Ping,
    ProtocolConnection,
    Role,
    StreamCredit,
    Welcome,
)
from .connection_io import NO_DATA, ConnectionIO, ConnectionListener, copy_error
from .direct import DirectWriter
from .feeds import Feed
from .pending import PendingRequest

__all__ = ["ORPHAN_GRACE", "Connection", "ConnectionListener", "PendingRequest"]

#: Bytes queued for the writer beyond which new requests wait (a stalled peer).
_MAX_QUEUED_BYTES = 8 * 1024 * 1024
#: Seconds past its deadline after which an unconfirmed orphan is forgotten.
ORPHAN_GRACE = 2.0
#: Connection serial numbers: the ``failure_id`` of every error one connection's death causes.
_SERIALS = itertools.count(1)


class Connection(ConnectionIO):
    """A handshaken protocol v1 connection carrying many requests at once.

    Create it over any trio stream, then ``welcome = await
    nursery.start(connection.run, hello)``: ``run`` performs the handshake,
    reports readiness, then runs the reader and writer until the connection
    closes. ``run`` never raises after readiness; failures are recorded in
    ``error`` and raised to waiters and later callers.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        address: str,
        max_frame_size: int,
        max_in_flight: int,
        listener: ConnectionListener | None = None,
    ) -> None:
        self.address = address
        self._listener = listener
        #: Identifies this connection in ``failure_id`` of the errors its death causes.
        self.serial = next(_SERIALS)
        #: Free for the owner's bookkeeping (the pool stores its id here).
        self.tag: object = None
        self._stream = stream
        self._protocol = ProtocolConnection(Role.CLIENT, max_frame_size=max_frame_size)
        self._limit = max_in_flight
        self._ids = itertools.count(1)
        #: Live requests by id, oldest first (ids increase).
        self._waiting: dict[int, PendingRequest] = {}
        #: Abandoned after their write, still holding a slot until confirmed.
        self._orphans: dict[int, PendingRequest] = {}
        #: Receivers of the frames of streams and subscriptions, by request id (.feeds).
        self._feeds: dict[int, Feed] = {}
        self._outbox: deque[PendingRequest | bytes] = deque()
        self._outbox_lot = trio.lowlevel.ParkingLot()
        self._slot_lot = trio.lowlevel.ParkingLot()
        self._in_flight = 0
        #: Feeds that live on without a request slot (established subscriptions).
        self._pins = 0
        self._queued_bytes = 0
        self._scope = trio.CancelScope()
        self._finished = trio.Event()
        #: Synchronous writes to the socket when nothing else is writing
        #: (set up after the handshake, so a failed one leaves nothing open).
        self._direct: DirectWriter | None = None
        self._writing = False
        #: Set while a burst of replies is waking callers: their requests are
        #: queued for the writer, which sends them in one go.
        self._coalesce = False
        #: Why the connection stopped working (None while usable).
        self.error: QdbError | None = None
        #: The GOAWAY reason once the node asked to drain, else None.
        self.draining_reason: str | None = None
        #: WELCOME from the node, after the handshake.
        self.welcome: Welcome | None = None
        #: trio time of the last frame sent or received.
        self.last_activity = trio.current_time()
        #: trio time of the last frame received (proof the node is alive).
        self.last_received = self.last_activity
        self.requests_sent = 0
        #: Replies that found no caller (their caller had gone: late replies).
        self.late_replies_dropped = 0
        #: Replies for ids this connection never had in flight.
        self.unknown_replies = 0
        #: Orphans forgotten because the node never confirmed them.
        self.orphans_expired = 0
        self.bad_messages = 0

    # ---------------------------------------------------------------- status

    @property
    def node_id(self) -> str | None:
        """The node's id from WELCOME."""
        return self.welcome.node_id if self.welcome else None

    @property
    def in_flight(self) -> int:
        """Request slots taken: reserved, queued, sent, or orphaned."""
        return self._in_flight

    @property
    def orphaned(self) -> int:
        """Requests abandoned after their write that the node has not confirmed."""
        return len(self._orphans)

    @property
    def pinned(self) -> int:
        """Feeds living on it without a request slot (see :meth:`pin`)."""
        return self._pins

    @property
    def max_in_flight(self) -> int:
        """The effective in-flight cap (ours, lowered to the node's)."""
        return self._limit

    @property
    def usable(self) -> bool:
        """True while new requests may be sent."""
        return self.error is None and self.draining_reason is None and self.welcome is not None

    def has_room(self) -> bool:
        """Whether one more request may be reserved now."""
        if self._in_flight >= self._limit and self._orphans:
            self.expire_orphans(trio.current_time())
        return self._in_flight < self._limit and self._queued_bytes < _MAX_QUEUED_BYTES

    def oldest_started(self) -> float | None:
        """trio time the oldest live request was queued (None when none is).

        Streams and subscriptions (requests with a feed) are left out: they
        stay open as long as their consumer wants, so their age says nothing
        about the node's speed (their silence has its own timeouts).
        """
        feeds = self._feeds
        for request_id, pending in self._waiting.items():
            if request_id not in feeds:
                return pending.started
        return None

    def oldest_orphan(self) -> float | None:
        """trio time the oldest orphan (abandoned after its write, neither answered
        late nor confirmed CANCELLED yet) was queued; None when there is none."""
        return min((orphan.started for orphan in self._orphans.values()), default=None)

    def feed_slots(self) -> int:
        """Request slots held by streams (and subscriptions not answered yet): part
        of ``in_flight``, but not load on the node in the balancer's sense."""
        waiting = self._waiting
        return sum(1 for request_id in self._feeds if request_id in waiting)

    def _check_usable(self) -> None:
        if self.error is not None:
            raise copy_error(self.error, request_sent=False)
        if self.draining_reason is not None:
            raise ConnectionDraining(
                f"{self.address} is draining ({self.draining_reason}); request not sent",
                reason=self.draining_reason,
                node=self.address,
            )

    # -------------------------------------------------------------- requests

    def reserve(self) -> None:
        """Take one request slot for a request about to be sent (``has_room()`` first).

        Pair with :meth:`send_reserved` or :meth:`unreserve`. On a failed
        connection it takes nothing (the send then raises its error).
        """
        if self.error is None:
            if self._in_flight >= self._limit:
                # A caller that skipped has_room() would overrun the node's limit.
                raise AssertionError(f"no request slot left on {self.address} to reserve")
            self._in_flight += 1

    def unreserve(self) -> None:
        """Give back a slot taken with :meth:`reserve` and not used."""
        if self._in_flight > 0 and self.error is None:
            self._in_flight -= 1
            self._slot_freed()

    def pin(self) -> None:
        """Keep the connection open for a feed that holds no request slot: an
        established subscription (docs/protocol.md section 13.1). The pool does
        not close or lease a pinned connection as idle; ``has_room`` ignores
        pins. Pair with :meth:`unpin`."""
        if self.error is None:
            self._pins += 1

    def unpin(self) -> None:
        """Give back a :meth:`pin`; the pool then looks at the connection again
        as when a slot frees (it may have become idle)."""
        if self._pins > 0 and self.error is None:
            self._pins -= 1
            if self._listener is not None:
                self._listener.slot_freed(self)

    def move_pinned_feeds(self, reason: str) -> None:
        """Tell the feeds that live here on a pin (established subscriptions) to go
        elsewhere: the connection is retiring and only they keep it open. Each
        fails with :class:`ConnectionDraining`, which a subscription follows by
        subscribing again from its position, on any node, as for a GOAWAY."""
        waiting = self._waiting
        for request_id in [r for r in self._feeds if r not in waiting]:
            feed = self._feeds.pop(request_id)
            feed.failed(
                ConnectionDraining(
                    f"{self.address}: the connection is retiring ({reason})",
                    reason=reason,
                    node=self.address,
                )
            )

    def send_reserved(
        self,
        method: str,
        args: dict[str, Any],
        *,
        deadline_ms: int | None = None,
        idempotency_key: str | None = None,
        now: float | None = None,
    ) -> PendingRequest:
        """Queue a REQUEST on a reserved slot, synchronously (``now``: the trio
        time, if the caller has just read it).

        Raises at once (nothing sent, the slot given back) if the connection is
        unusable, the arguments can't be encoded, or the frame exceeds the
        node's limit.
        """
        try:
            self._check_usable()
            request_id = next(self._ids)
            data = self._protocol.send_request(
                request_id, method, args, deadline_ms, idempotency_key
            )
        except BaseException:
            self.unreserve()
            raise
        self.requests_sent += 1
        if now is None:
            now = trio.current_time()
        budget = deadline_ms / 1000 if deadline_ms is not None else 3600.0
        return self._enqueue(request_id, data, holds_slot=True, now=now, expires=now + budget)

    async def send_request(
        self,
        method: str,
        args: dict[str, Any],
        *,
        deadline_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> PendingRequest:
        """Queue a REQUEST, waiting for an in-flight slot if the cap is reached.

        Raises at once (nothing sent) if the connection is unusable, the
        arguments can't be encoded, or the frame exceeds the node's limit.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_usable()
            if self.has_room():
                break
            await self._slot_lot.park()
        self.reserve()
        return self.send_reserved(
            method, args, deadline_ms=deadline_ms, idempotency_key=idempotency_key
        )

    async def request(self, method: str, args: dict[str, Any], **options: Any) -> Any:
        """Send a request and wait for its result (``send_request`` + ``wait``)."""
        pending = await self.send_request(method, args, **options)
        return await pending.wait()

    async def ping(self) -> float:
        """Send a PING frame and return the round trip in seconds.

        Pings don't take an in-flight slot, so a busy connection can still
        be checked.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_usable()
        request_id = next(self._ids)
        started = trio.current_time()
        data = self._protocol.send(Ping(request_id))
        pending = self._enqueue(request_id, data, holds_slot=False, now=started, expires=started)
        await pending.wait()
        return trio.current_time() - started

    def _enqueue(
        self, request_id: int, data: bytes, *, holds_slot: bool, now: float, expires: float
    ) -> PendingRequest:
        pending = PendingRequest(
            self, request_id, data, holds_slot=holds_slot, started=now, expires=expires
        )
        self._waiting[request_id] = pending
        if (
            self._direct is not None
            and not self._outbox
            and not self._writing
            and not self._coalesce
        ):
            # Fast path: the socket is ours right now, so try to hand the
            # frame to the kernel synchronously, sparing two task switches.
            # Being synchronous it can't be cancelled half-way.
            written = self._direct.write(data)
            if written:
                pending.sent = True
                pending.data = NO_DATA
                self.last_activity = now
                if written < len(data):
                    self._queue_bytes(data[written:])  # the rest goes through the writer
                return pending
        self._queued_bytes += len(data)
        self._outbox.append(pending)
        if self._outbox_lot:  # (the writer may be awake already)
            self._outbox_lot.unpark()
        return pending

    def _abandon(self, pending: PendingRequest) -> None:
        """The caller stopped waiting (cancelled)."""
        if pending.done or self._waiting.pop(pending.request_id, None) is None:
            return
        if not pending.sent:
            # Still queued: the writer will skip it, and only then give its
            # slot back, so abandoned frames can't pile up in the outbox.
            pending.withdrawn = True
            return
        if not pending.holds_slot:
            return  # a ping: nothing to account for
        if self.error is not None:
            self._release_slot(pending)
            return
        # Written already: ask the node to stop, and keep the slot until it
        # confirms (its reply or CANCELLED), so we never overrun its limit.
        self._orphans[pending.request_id] = pending
        self._queue_bytes(self._protocol.send(Cancel(pending.request_id)))
        if self._listener is not None:
            self._listener.orphaned(self, pending.expires + ORPHAN_GRACE)

    def abandon(self, pending: PendingRequest) -> None:
        """Stop waiting for ``pending`` (not cancelled by trio: a stream's owner
        that ends it): withdraw it if unsent, else CANCEL it and keep it orphaned."""
        self._abandon(pending)

    def attach_feed(self, request_id: int, feed: Feed) -> None:
        """Route the STREAM_PAGE, STREAM_END, EVENT, ERROR and RESPONSE frames of
        ``request_id`` to ``feed`` (attach it before any checkpoint after the send)."""
        self._feeds[request_id] = feed

    def detach_feed(self, request_id: int) -> None:
        """Stop routing ``request_id``'s frames to its feed; late ones are dropped."""
        self._feeds.pop(request_id, None)

    def send_control(self, message: Cancel | StreamCredit) -> bool:
        """Queue a CANCEL or STREAM_CREDIT, which take no slot and get no reply of
        their own; False (nothing queued) once the connection has failed."""
        if self.error is not None:
            return False
        self._queue_bytes(self._protocol.send(message))
        return True

    def expire_orphans(self, now: float) -> float:
        """Forget the orphans the node never confirmed within their deadline and
        grace; return when the next one is due (inf: none left)."""
        due = math.inf
        for request_id, orphan in list(self._orphans.items()):
            forget_at = orphan.expires + ORPHAN_GRACE
            if now >= forget_at:
                self.orphans_expired += 1
                del self._orphans[request_id]
                self._release_slot(orphan)
            else:
                due = min(due, forget_at)
        return due

    def abort(self, message: str) -> None:
        """Stop the connection now; waiters get ConnectionLost (their requests may be
        retried elsewhere), unlike :meth:`close`, which is the client's own end."""
        self._fail(ConnectionLost(message, node=self.address, failure_id=self.serial))

    def _slot_freed(self, count: int = 1) -> None:
        if self._slot_lot:
            self._slot_lot.unpark(count=count)
        if self._listener is not None:
            self._listener.slot_freed(self)

    def _notify_unusable(self) -> None:
        if self._listener is not None:
            self._listener.connection_unusable(self)

    # ------------------------------------------------------------- lifecycle

    async def run(self, hello: Hello, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Handshake, report the WELCOME via ``task_status``, then serve until closed."""
        try:
            welcome = await self._handshake(hello)
        except BaseException:
            self.error = self.error or ConnectionLost(
                "handshake did not complete", node=self.address, failure_id=self.serial
            )
            await trio.aclose_forcefully(self._stream)
            self._finished.set()
            raise
        self._limit = min(self._limit, max(1, welcome.max_in_flight))
        self._direct = DirectWriter.for_stream(self._stream)
        task_status.started(welcome)
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._read_loop)
                    nursery.start_soon(self._guard, self._write_loop)
        finally:
            self._fail(
                ConnectionLost(
                    f"connection to {self.address} closed",
                    node=self.address,
                    failure_id=self.serial,
                )
            )
            if self._direct is not None:
                self._direct.close()
                self._direct = None
            await trio.aclose_forcefully(self._stream)
            self._finished.set()

    def close(self) -> None:
        """Stop the connection now; waiters get ClientClosed."""
        self._fail(ClientClosed(f"connection to {self.address} was closed by the client"))

    async def aclose(self) -> None:
        """Close and wait until the reader, writer and socket are gone."""
        self.close()
        await self._finished.wait()
