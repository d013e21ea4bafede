"""The pool's wait queue: callers that found no room, served first come, first served.

:class:`WaitQueue` is the acquisition side of :class:`~._pool.NodePool`
(which inherits it and sets its state). A caller takes room at once when
there is some and nobody is queued (:meth:`WaitQueue._pick`); otherwise it
joins a bounded queue (PoolQueueFull beyond ``max_waiters``) and waits, at
most ``acquire_timeout`` (PoolTimeout), to be granted a connection in arrival
order. While it waits it starts an open if fewer are under way than callers
waiting; a failed open since it began waiting fails it at once with a copy of
that error (:func:`_copy`), and a grant that reaches a caller already giving
up is handed back rather than leaked.

It is apart from :mod:`._pool` (the public operations, maintenance, closing)
and :mod:`._connections` (opening connections and hearing from them) because
it is the one place that decides who gets room and in what order, and what a
caller that gets none is told.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from .._transport import Connection
from ..errors import ClientClosed, ConnectError, PoolQueueFull, PoolTimeout, QdbError
from ._connections import PoolConnections

__all__ = ["WaitQueue", "Waiter"]


class Waiter:
    """A caller queued for room; ``granted`` is filled in by ``_grant``."""

    __slots__ = ("event", "exclusive", "granted", "queued")

    def __init__(self, exclusive: bool) -> None:
        self.exclusive = exclusive
        self.event = trio.Event()
        self.granted: tuple[int, Connection] | None = None
        #: Still in the pool's queue (a flag, so leaving needs no O(queue) scan).
        self.queued = False


class WaitQueue(PoolConnections):
    """The wait queue of :class:`~._pool.NodePool` (its state is set there)."""

    _acquire_timeout: float
    _max_waiters: int
    _disabled_id: int
    #: The pool's counts (:meth:`~._pool.NodePool.statistics`).
    statistics: Callable[[], dict[str, int]]

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
        waiter = Waiter(exclusive)
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

    async def _wait_granted(self, waiter: Waiter) -> tuple[int, Connection]:
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

    def _give_back(self, waiter: Waiter) -> None:
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
