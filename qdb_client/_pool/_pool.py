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

:class:`NodePool` here holds the pool's state and its public operations
(acquire, lease, disable/enable, maintenance, closing). It inherits the wait
queue from :class:`~._waiting.WaitQueue` and the opening, listening to and
closing of its connections from :class:`~._connections.PoolConnections`.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._transport import Connection
from ..errors import QdbError
from ..events import EventBus, PoolCleared
from ._connections import OPEN_FAILURES, Connector
from ._state import PoolLimits, PoolState
from ._waiting import Waiter, WaitQueue

__all__ = ["NodePool", "PoolListener", "Reservation"]


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


class NodePool(WaitQueue):
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
        self._queue: deque[Waiter] = deque()
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
            self._disabled_id = next(OPEN_FAILURES)
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

    def _tell(self, event: Callable[[NodePool, Any], None], subject: Any) -> None:
        """Deliver one event to the listener; a failure in it is recorded, never
        raised into the background task (which would end the client)."""
        try:
            event(self, subject)
        except Exception as exc:
            self.listener_errors += 1
            self.last_listener_error = exc
