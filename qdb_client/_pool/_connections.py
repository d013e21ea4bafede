"""The pool's connections over their life: opened in the background, heard from, closed.

:class:`PoolConnections` is the connection side of :class:`~._pool.NodePool`
(which inherits it and sets its state). A connection is opened in a task of
the pool's nursery, never in a caller's (:meth:`PoolConnections._start_open`),
within a cancel scope that lets a hung attempt be abandoned. A failed open is
recorded once (its ``failure_id`` shared by every waiter that sees it), wakes
the waiters with its error and holds further opens back for
:data:`OPEN_RETRY_DELAY` (:meth:`PoolConnections._may_open`). The pool is
each connection's :class:`~qdb_client._transport.ConnectionListener`: it hears
when a slot frees, an orphan must be forgotten, or the connection stops taking
work (dead: forgotten now; GOAWAY: drained, then closed). A retired
connection closes once it is idle (:meth:`PoolConnections._close_if_drained`).

It is apart from :mod:`._pool` (the public operations and maintenance) and
:mod:`._waiting` (who gets room, in what order) because it is everything that
changes which connections the pool has.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from .._transport import Connection, ConnectionListener
from ..errors import ClientClosed, ConnectError, QdbError
from ..events import (
    ConnectionClosed,
    ConnectionCreated,
    ConnectionOpenFailed,
    ConnectionReady,
    EventBus,
)
from ._state import PoolState

if TYPE_CHECKING:
    from ._pool import NodePool, PoolListener
    from ._waiting import Waiter

__all__ = ["OPEN_FAILURES", "OPEN_RETRY_DELAY", "Connector", "PoolConnections"]

#: Seconds after a failed open before waiters may try another one.
OPEN_RETRY_DELAY = 1.0

Connector = Callable[[ConnectionListener], Awaitable[Connection]]


class PoolConnections:
    """The connections of :class:`~._pool.NodePool` (its state is set there)."""

    address: str
    state: PoolState
    last_connect_seconds: float | None
    last_open_error: QdbError | None
    _events: EventBus
    _connect: Connector
    _nursery: trio.Nursery
    _listener: PoolListener
    _connections: dict[int, Connection]
    _opening: dict[trio.CancelScope, float]
    _ids: itertools.count[int]
    _queue: deque[Waiter]
    _maintenance: trio.Event
    _maintenance_at: float
    _open_failures: int
    _last_open_failure: float
    _reopen_at: float
    _warm_after_failure: bool
    _disabled: str | None
    _closed: bool
    #: Serve the queue in order (:meth:`~._waiting.WaitQueue._grant`).
    _grant: Callable[[], None]
    #: Let every queued caller look again (:meth:`~._waiting.WaitQueue._wake_waiters`).
    _wake_waiters: Callable[[], None]
    #: Deliver one event to the listener (:meth:`~._pool.NodePool._tell`).
    _tell: Callable[[Callable[[NodePool, Any], None], Any], None]

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
                exc.failure_id = next(OPEN_FAILURES)  # one refusal, however many waiters see it
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


def _describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


#: Ids of failed opens: the ``failure_id`` shared by every waiter that sees one.
OPEN_FAILURES = itertools.count(1)
