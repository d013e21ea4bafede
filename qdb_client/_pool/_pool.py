"""One node's connection pool: the trio side of ``_state.PoolState``.

Callers ``acquire_slot()`` a connection with one request slot reserved on
it (then send on it, or give the slot back), or ``lease()`` a whole
connection. When nothing has room the pool opens a connection in the
background (never in the caller's task, so a caller giving up doesn't
abort a half-made connection) and the caller waits in a bounded queue for
at most ``acquire_timeout``. A failed open wakes the waiters with its error
rather than letting them wait out the timeout; after it, no new open starts
for ``OPEN_RETRY_DELAY``, and the waiters are woken again when that delay
ends (as MongoDB's CMAP wakes waiters after every connect attempt).

Request counts live in each connection (the in-flight ledger, orphans of
cancelled callers included); the pool is the connection's listener and
hears when a slot frees or the connection stops taking work.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._transport import Connection, ConnectionListener
from ..errors import ClientClosed, ConnectError, PoolQueueFull, PoolTimeout, QdbError
from ..events import (
    ConnectionClosed,
    ConnectionCreated,
    ConnectionOpenFailed,
    ConnectionReady,
    EventBus,
    PoolCleared,
)
from ._state import PoolLimits, PoolState

__all__ = ["NodePool", "PoolListener", "Reservation"]

#: Seconds after a failed open before waiters may try another one.
OPEN_RETRY_DELAY = 1.0

Connector = Callable[[ConnectionListener], Awaitable[Connection]]


class _Waiter:
    """A caller queued for room; ``granted`` is filled in by ``_grant``."""

    __slots__ = ("event", "exclusive", "granted", "queued")

    def __init__(self, exclusive: bool) -> None:
        self.exclusive = exclusive
        self.event = trio.Event()
        self.granted: tuple[int, Connection] | None = None
        #: Still in the pool's queue (a flag, so leaving needs no O(queue) scan).
        self.queued = False


class Reservation:
    """A request slot reserved on ``connection`` by :meth:`NodePool.reserve`."""

    __slots__ = ("connection", "used")

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.used = False

    async def request(self, method: str, args: dict[str, Any], **options: Any) -> Any:
        """Send one request on the slot and wait for its result."""
        if self.used:
            raise RuntimeError("a reserved slot carries one request")
        await trio.lowlevel.checkpoint_if_cancelled()
        self.used = True  # after the checkpoint: cancelled there, the slot is still ours
        return await self.connection.send_reserved(method, args, **options).wait()


class PoolListener:
    """What a pool tells its owner (the node's health tracking)."""

    def opened(self, pool: NodePool, connection: Connection) -> None:
        """A connection was opened and handshaken."""

    def open_failed(self, pool: NodePool, error: QdbError) -> None:
        """Opening a connection failed."""

    def connection_failed(self, pool: NodePool, connection: Connection) -> None:
        """An open connection died (not a GOAWAY drain, not our own close)."""


class NodePool:
    """Connections to one node, shared by multiplexing or leased whole."""

    def __init__(
        self,
        address: str,
        limits: PoolLimits,
        *,
        connect: Connector,
        nursery: trio.Nursery,
        acquire_timeout: float,
        max_waiters: int,
        listener: PoolListener | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.address = address
        self._events = events or EventBus()
        self.state = PoolState(limits)
        self._connect = connect
        self._nursery = nursery
        self._acquire_timeout = acquire_timeout
        self._max_waiters = max_waiters
        self._listener = listener or PoolListener()
        self._connections: dict[int, Connection] = {}
        #: The cancel scope of each connection attempt in progress, and when it began.
        self._opening: dict[trio.CancelScope, float] = {}
        #: Seconds the last connection that opened took (connect and handshake).
        self.last_connect_seconds: float | None = None
        self._ids = itertools.count(1)
        #: Callers waiting for room, served first come, first served.
        self._queue: deque[_Waiter] = deque()
        self._maintenance = trio.Event()
        #: When maintenance will look next (inf: not scheduled).
        self._maintenance_at = math.inf
        self._open_failures = 0
        self._last_open_failure = -math.inf
        #: When waiters held back by a failed open may try again (inf: none held).
        self._reopen_at = math.inf
        self._warm_after_failure = False
        #: The last error from opening a connection, if the last open failed.
        self.last_open_error: QdbError | None = None
        self._disabled: str | None = None
        self._disabled_id = 0
        self._closed = False
        #: Exceptions the listener raised (recorded, not propagated), and the last one.
        self.listener_errors = 0
        self.last_listener_error: Exception | None = None

    # ---------------------------------------------------------------- public

    @asynccontextmanager
    async def reserve(self) -> AsyncIterator[Reservation]:
        """One request slot on a connection, held for the block.

        Send on it once with ``slot.request(...)``; a slot the block did not
        use is given back when it exits.
        """
        slot = Reservation(await self.acquire_slot())
        try:
            yield slot
        finally:
            if not slot.used:
                slot.connection.unreserve()

    async def acquire_slot(self, bounded_by: float = math.inf) -> Connection:
        """A connection with one request slot reserved on it.

        Send on it at once with ``connection.send_reserved(...)`` (which gives
        the slot back if it raises), or give the slot back with
        ``connection.unreserve()``; the connection frees it when the reply
        comes. ``bounded_by``: a trio time the caller's own scope is sure to
        cancel the wait by, whatever else changes (the request pipeline's);
        before the pool's timeout, the pool then needs no scope of its own.
        """
        return (await self._acquire(exclusive=False, bounded_by=bounded_by))[1]

    def try_acquire_slot(self, now: float) -> Connection | None:
        """:meth:`acquire_slot` at trio time ``now`` when it would not wait (room
        now, nobody queued), else None. No checkpoint."""
        if self._disabled is None and not self._closed and not self._queue:
            picked = self._pick(False, now)
            if picked is not None:
                return picked[1]
        return None

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Connection]:
        """A connection for this block alone (transactions, streams).

        If the block fails or is cancelled, the connection may hold state
        the next owner must not inherit, so it is retired, not reused.
        """
        connection_id, connection = await self._acquire(exclusive=True)
        clean = False
        try:
            yield connection
            clean = True
        finally:
            reusable = clean and connection.usable
            self.state.return_lease(connection_id, trio.current_time(), reusable=reusable)
            self._after_release(connection_id)

    async def connection_for_ping(self) -> Connection:
        """A usable connection for a PING (which takes no request slot), opening
        one if none is open."""
        connection = self.any_connection()
        if connection is not None:
            await trio.lowlevel.checkpoint()
            return connection
        connection = await self.acquire_slot()
        connection.unreserve()
        return connection

    async def abandon(self, reason: str) -> None:
        """Stop for good (the node is forgotten): requests still on its
        connections fail with ConnectionLost (retryable elsewhere), then close."""
        self.disable(reason)
        for connection in list(self._connections.values()):
            connection.abort(f"{self.address} was dropped from the cluster: {reason}")
        await self.aclose()

    def set_listener(self, listener: PoolListener) -> None:
        """Send this pool's events to ``listener`` from now on."""
        self._listener = listener

    def disable(self, reason: str) -> None:
        """Stop serving (node DOWN): waiters fail, connections close as they drain."""
        if self._disabled is None:
            self._disabled_id = next(_OPEN_FAILURES)
            self._events.emit(PoolCleared(trio.current_time(), self.address, reason))
        self._disabled = reason
        for connection_id in list(self._connections):
            self.state.retire(connection_id)
            self._close_if_drained(connection_id)
        # Whatever they opened would be closed unused; one that hangs (a
        # handshake whose reply was lost) would also hold its place in the
        # pool for all of connect_timeout after the node is back.
        self.abandon_connects()
        self._wake_waiters()

    def abandon_connects(self, started_before: float = math.inf) -> None:
        """Give up the connection attempts under way that began before trio time
        ``started_before`` (all by default): e.g. a health probe's connection,
        begun after them, opened while they still hang, so they are stuck
        (their handshake reply lost), and would hold their places in the pool."""
        for attempt, began in self._opening.items():
            if began < started_before:
                attempt.cancel()

    def enable(self) -> None:
        """Serve again and re-warm ``min_connections``."""
        self._disabled = None
        self._warm_after_failure = True
        self._wake_maintenance()

    def warm(self) -> None:
        """Ask the maintenance task to top up to ``min_connections`` now."""
        self._warm_after_failure = True
        self._wake_maintenance()

    def any_connection(self) -> Connection | None:
        """An open, usable connection that still takes work (for pings), or None."""
        for connection_id, connection in self._connections.items():
            if connection.usable and not self.state.connections[connection_id].retiring:
                return connection
        return None

    def connections(self) -> list[Connection]:
        """Open connections that still take work."""
        return [
            connection
            for connection_id, connection in self._connections.items()
            if not self.state.connections[connection_id].retiring
        ]

    def retire(self, connection: Connection) -> None:
        """Take a connection out of service (e.g. it missed a PONG)."""
        connection_id = connection.tag
        if isinstance(connection_id, int) and connection_id in self._connections:
            self.state.retire(connection_id)
            self._close_if_drained(connection_id)

    def ensure_connection(self) -> None:
        """Start opening a connection unless one is open or opening."""
        if not self.state.connections and not self.state.opening and self.state.can_open():
            self._start_open()

    def statistics(self) -> dict[str, int]:
        """Connection and request counts of this pool."""
        state = self.state
        return {
            "open": len(state.connections),
            "idle": state.idle,
            "leased": state.leased,
            "opening": state.opening,
            "retiring": len(state.connections) - state.active,
            "in_flight": state.reserved,
            "orphaned": sum(c.orphaned for c in self._connections.values()),
            "waiting": len(self._queue),
        }

    async def maintain(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Background task: expire idle/old connections, keep the minimum warm."""
        task_status.started()
        while not self._closed:
            now = trio.current_time()
            for connection_id in self.state.expired(now):
                self._close(connection_id, "expired")
            for connection_id, record in list(self.state.connections.items()):
                if record.retiring:
                    self._close_if_drained(connection_id)  # pinned by subscriptions
            if self._disabled is None and self._warm_after_failure:
                for _ in range(self.state.deficit()):
                    if self.state.can_open():
                        self._start_open()
            if now >= self._reopen_at:
                self._reopen_at = math.inf
                if self._queue:
                    self._wake_waiters()  # the delay after a failed open is over: try again
            orphans_due = math.inf
            for connection in list(self._connections.values()):
                orphans_due = min(orphans_due, connection.expire_orphans(now))
            wake_at = self.state.next_expiry(now)
            self._maintenance_at = min(
                math.inf if wake_at is None else wake_at, self._reopen_at, orphans_due
            )
            with trio.move_on_at(self._maintenance_at):
                await self._maintenance.wait()
            self._maintenance = trio.Event()

    async def aclose(self) -> None:
        """Close every connection; waiters get ClientClosed."""
        self._closed = True
        self._wake_waiters()
        self._wake_maintenance()
        connections = list(self._connections.values())
        self._connections.clear()
        for connection_id in list(self.state.connections):
            self.state.closed(connection_id)
        for connection in connections:
            await connection.aclose()

    # -------------------------------------------------------------- internals

    def _describe(self) -> str:
        s = self.statistics()
        limits = self.state.limits
        return (
            f"{s['open']}/{limits.max_connections} connections open, {s['opening']} opening, "
            f"{s['in_flight']} requests in flight, {s['leased']} leased, "
            f"{s['waiting']} callers waiting"
        )

    def _check_serving(self) -> None:
        if self._closed:
            raise ClientClosed("the client is closed")
        if self._disabled is not None:
            # One event (the refused open, or the health verdict, that disabled
            # the pool) however many callers meet it: one failure id.
            last = self.last_open_error
            if last is not None and not last.retryable:
                # Refused for good (credentials, a TLS certificate, the version):
                # that, not "not in service", is what the caller must hear.
                raise _copy(last)
            failure_id = getattr(last, "failure_id", None) or self._disabled_id
            raise ConnectError(
                f"{self.address} is not in service: {self._disabled}",
                node=self.address,
                failure_id=failure_id,
            )

    async def _acquire(
        self, *, exclusive: bool, bounded_by: float = math.inf
    ) -> tuple[int, Connection]:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._disabled is None and not self._closed and not self._queue:
            picked = self._pick(exclusive)  # fast path: room now, nobody queued
            if picked is not None:
                return picked
        self._check_serving()
        if len(self._queue) >= self._max_waiters:
            raise PoolQueueFull(
                f"{self._max_waiters} callers already wait for {self.address}",
                node=self.address,
                in_use=self._describe(),
            )
        waiter = _Waiter(exclusive)
        self._queue.append(waiter)
        waiter.queued = True
        try:
            if bounded_by < trio.current_time() + self._acquire_timeout:
                # The caller's own scope ends the wait first, and nothing can
                # move it (a deadline read from the scopes now could be raised
                # or shielded later): the pool's timeout could never fire.
                return await self._wait_granted(waiter)
            with trio.move_on_after(self._acquire_timeout):
                return await self._wait_granted(waiter)
        finally:
            if waiter.queued:  # gave up (cancelled, timed out, failed) still queued
                waiter.queued = False
                self._queue.remove(waiter)
                self._grant()  # those queued behind us may be servable now
            elif waiter.granted is not None:
                # Granted while we were being cancelled or failing: hand the
                # slot on rather than leak it.
                self._give_back(waiter)
        raise PoolTimeout(
            f"no connection to {self.address} within {self._acquire_timeout:g} s",
            node=self.address,
            in_use=self._describe(),
        )

    async def _wait_granted(self, waiter: _Waiter) -> tuple[int, Connection]:
        """Wait in the queue until ``waiter`` is granted a connection (or fail)."""
        failures_before = self._open_failures
        while True:
            if waiter.granted is not None:
                granted, waiter.granted = waiter.granted, None
                return granted
            self._check_serving()
            if (
                self._open_failures != failures_before
                and self.last_open_error is not None
                and not self.state.connections
            ):
                # The node refused since we began waiting and nothing is open:
                # fail now, not at the timeout (attempts still under way would
                # most likely fail the same way).
                raise _copy(self.last_open_error)
            if self.state.opening < len(self._queue) and self._may_open():
                self._start_open()  # no more opens under way than callers waiting
            waiter.event = trio.Event()
            await waiter.event.wait()

    def _grant(self) -> None:
        """Serve queued callers strictly in arrival order while there is room."""
        while self._queue and self._disabled is None and not self._closed:
            head = self._queue[0]
            picked = self._pick(head.exclusive)
            if picked is None:
                if not self.state.opening and self._may_open():
                    # Room went away under the queue (a drained connection
                    # closed, say) and nobody is opening a new one.
                    self._start_open()
                return
            self._queue.popleft()
            head.queued = False
            head.granted = picked
            head.event.set()

    def _may_open(self) -> bool:
        """Room for one more connection, and no refusal just now.

        After a failed open, waiters don't retry at once: a node that
        refuses an extra connection (CAPACITY_EXCEEDED) while others work
        would otherwise be asked again in a tight loop.
        """
        if not self.state.can_open():
            return False
        return (
            self.last_open_error is None
            or trio.current_time() - self._last_open_failure >= OPEN_RETRY_DELAY
        )

    def _give_back(self, waiter: _Waiter) -> None:
        assert waiter.granted is not None
        connection_id, connection = waiter.granted
        waiter.granted = None
        if waiter.exclusive:
            self.state.return_lease(connection_id, trio.current_time(), reusable=True)
            self._after_release(connection_id)
        else:
            connection.unreserve()  # frees the slot; slot_freed() does the rest

    def _wake_waiters(self) -> None:
        """Let every queued caller re-check (failures, closing, new capacity)."""
        self._grant()
        for waiter in self._queue:
            waiter.event.set()

    def _pick(self, exclusive: bool, now: float | None = None) -> tuple[int, Connection] | None:
        if now is None:
            now = trio.current_time()
        while True:
            record = self.state.pick_exclusive() if exclusive else self.state.pick_shared()
            if record is None:
                return None
            connection = self._connections[record.id]
            if not connection.usable:
                self.state.retire(record.id)
                self._close_if_drained(record.id)
                continue
            if exclusive:
                self.state.lease(record.id, now)
            else:
                connection.reserve()
                record.last_used = now
            return record.id, connection

    def _after_release(self, connection_id: int) -> None:
        self._close_if_drained(connection_id)
        if self._queue:
            self._grant()
        connections = self.state.connections
        record = connections.get(connection_id)
        limits = self.state.limits
        if (
            record is not None
            and len(connections) > limits.min_connections  # (active counts no more)
            and record.idle
            and record.last_used + limits.idle_timeout < self._maintenance_at
            and self.state.active > limits.min_connections
        ):
            # It just went idle and may expire before maintenance would look
            # again. (Most releases skip this: a busy connection's expiry is
            # already scheduled or later.)
            self._wake_maintenance()

    def _close_if_drained(self, connection_id: int) -> None:
        record = self.state.connections.get(connection_id)
        if record is None or not record.retiring:
            return
        if record.idle:
            self._close(connection_id)
            return
        connection = self._connections.get(connection_id)
        if connection is not None and connection.pinned:
            # Subscriptions alone would keep a retired connection open for good
            # (and counted against max_connections): they move instead.
            connection.move_pinned_feeds("retired by the pool")

    def _close(self, connection_id: int, reason: str = "drained") -> None:
        connection = self._connections.pop(connection_id, None)
        self.state.closed(connection_id)
        if connection is not None:
            self._events.emit(
                ConnectionClosed(trio.current_time(), self.address, connection.serial, reason)
            )
            if not self._closed:
                self._nursery.start_soon(connection.aclose)
        self._wake_maintenance()

    def _start_open(self) -> None:
        self.state.open_started()
        now = trio.current_time()
        self._events.emit(ConnectionCreated(now, self.address))
        # The scope exists from now: an attempt abandoned before its task runs
        # is abandoned all the same.
        attempt = trio.CancelScope()
        self._opening[attempt] = now
        self._nursery.start_soon(self._open_one, attempt)

    async def _open_one(self, attempt: trio.CancelScope) -> None:
        started = trio.current_time()
        try:
            with attempt:
                connection = await self._connect(self)
        except Exception as exc:
            if not isinstance(exc, QdbError):  # defensive: connect translates errors
                exc = ConnectError(
                    f"connecting to {self.address} failed: {exc!r}", node=self.address
                )
            if isinstance(exc, ConnectError) and exc.failure_id is None:
                exc.failure_id = next(_OPEN_FAILURES)  # one refusal, however many waiters see it
            now = trio.current_time()
            self.state.open_finished(None, now)
            self._open_failures += 1
            self._warm_after_failure = False
            self.last_open_error = exc
            self._last_open_failure = now
            # Waiters may not open again before the delay (those queued now and
            # those arriving meanwhile): wake them when it ends.
            self._reopen_at = now + OPEN_RETRY_DELAY
            self._wake_maintenance()
            self._events.emit(ConnectionOpenFailed(now, self.address, _describe_error(exc)))
            self._tell(self._listener.open_failed, exc)
            self._wake_waiters()
            return
        except BaseException:
            self.state.open_finished(None, trio.current_time())
            raise
        finally:
            self._opening.pop(attempt, None)
        if attempt.cancelled_caught:
            # Abandoned (see abandon_connects): no failure of the node's, and
            # its place is free. Callers that counted on it look again.
            self.state.open_finished(None, trio.current_time())
            self._wake_maintenance()
            self._wake_waiters()
            return
        if self._closed or self._disabled is not None:
            # The node went out of service (DOWN, or found to be another
            # node's alias) while this was opening: nothing may use it.
            self.state.open_finished(None, trio.current_time())
            await connection.aclose()
            self._wake_maintenance()
            return
        connection_id = next(self._ids)
        connection.tag = connection_id
        self._connections[connection_id] = connection
        self.state.open_finished(connection_id, trio.current_time(), connection)
        self.last_connect_seconds = trio.current_time() - started
        self.last_open_error = None
        self._reopen_at = math.inf
        self._warm_after_failure = True
        now = trio.current_time()
        self._events.emit(
            ConnectionReady(
                now, self.address, connection.serial, connection.node_id or "", now - started
            )
        )
        self._tell(self._listener.opened, connection)
        if not connection.usable:
            self.connection_unusable(connection)
        self._wake_waiters()
        self._wake_maintenance()

    # ------------------------------------------------- connection listener

    def slot_freed(self, connection: Connection) -> None:
        """A request slot on ``connection`` became free (its ledger says so)."""
        connection_id = connection.tag  # an int once the pool has opened it
        record = None
        if isinstance(connection_id, int):
            record = self.state.connections.get(connection_id)
        if record is None:
            return  # not (or no longer) one of ours
        record.last_used = trio.current_time()
        if record.retiring or self._queue or record.idle:
            self._after_release(record.id)  # the rare cases: drain, waiters, expiry

    def orphaned(self, connection: Connection, forget_at: float) -> None:
        """An orphan on ``connection`` must be forgotten at ``forget_at`` if the node
        never confirms it: maintenance looks then (and serves the waiters)."""
        if forget_at < self._maintenance_at:
            self._wake_maintenance()

    def connection_unusable(self, connection: Connection) -> None:
        """``connection`` stopped taking new requests (GOAWAY, failure, close)."""
        connection_id = connection.tag
        if not isinstance(connection_id, int) or connection_id not in self._connections:
            return
        if connection.error is not None:
            # Dead: forget it now; its requests already got their errors.
            self._connections.pop(connection_id, None)
            self.state.closed(connection_id)
            why = "client" if isinstance(connection.error, ClientClosed) else "lost"
            self._events.emit(
                ConnectionClosed(
                    trio.current_time(),
                    self.address,
                    connection.serial,
                    f"{why}: {_describe_error(connection.error)}",
                )
            )
            if not isinstance(connection.error, ClientClosed):
                # Don't re-warm on our own: the health monitor probes first
                # and calls warm() once the node answers.
                self._warm_after_failure = False
                self._tell(self._listener.connection_failed, connection)
            self._wake_waiters()
            self._wake_maintenance()
        else:
            # GOAWAY: drain, then close; replacements open on demand.
            self.state.retire(connection_id)
            self._close_if_drained(connection_id)
            self._wake_waiters()

    def _wake_maintenance(self) -> None:
        self._maintenance.set()

    def _tell(self, event: Callable[[NodePool, Any], None], subject: Any) -> None:
        """Deliver one event to the listener; a failure in it is recorded, never
        raised into the background task (which would end the client)."""
        try:
            event(self, subject)
        except Exception as exc:
            self.listener_errors += 1
            self.last_listener_error = exc


def _describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


#: Ids of failed opens: the ``failure_id`` shared by every waiter that sees one.
_OPEN_FAILURES = itertools.count(1)


def _copy(error: QdbError) -> QdbError:
    """A fresh instance of an open failure for each waiter that raises it.

    Built without calling ``__init__`` (subclasses take different keyword
    arguments); the original becomes its cause.
    """
    fresh = error.__class__.__new__(error.__class__)
    fresh.__dict__.update(error.__dict__)
    fresh.args = error.args
    fresh.__cause__ = error
    return fresh
