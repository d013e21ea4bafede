"""A request waiting for its reply, and the one timer that bounds such waits.

A reply is handed to its waiting task directly (``reschedule``): no Event,
no parking lot, one task switch. A wait may also carry its own expiry
(:meth:`PendingRequest.wait_until`). Expiries are kept by one
:class:`Expiries` task per client instead of a cancel scope per attempt:
entering and leaving a scope with a deadline costs more than the rest of
a request's bookkeeping together (each one is a trio deadline registered
and withdrawn), while the timer keeps a dict entry per waiting request and
wakes only when the earliest expiry it knows of comes, which in steady
traffic is about once per attempt timeout, not once per request.

An expired wait ends exactly as a cancelled one does: the frame is withdrawn
if it was never written, or the request is abandoned (a CANCEL goes out and
the slot is kept until the node confirms). A reply that arrives between the
expiry and the waiter running wins: it is returned, not thrown away.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import TYPE_CHECKING, Any

import trio
from outcome import Value

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Expired", "Expiries", "PendingRequest"]

_EXPIRED = object()
#: The timer stopped before this wait's expiry: the waiter bounds it itself.
_UNTIMED = object()


class Expired(Exception):
    """Raised by :meth:`PendingRequest.wait_until` when its expiry passed first.

    Internal: the request pipeline turns it into the attempt's timeout outcome.
    """


class PendingRequest:
    """A request (or ping) from the moment it is queued until its reply.

    ``sent`` becomes True when its frame starts going to the kernel; a
    request whose caller gives up before that was never sent. ``started``
    is the trio time it was queued.
    """

    __slots__ = (
        "_connection",
        "_done",
        "_error",
        "_result",
        "_task",
        "_timer_key",
        "data",
        "expires",
        "holds_slot",
        "replayed",
        "request_id",
        "sent",
        "started",
        "withdrawn",
    )

    def __init__(
        self,
        connection: Connection,
        request_id: int,
        data: bytes,
        *,
        holds_slot: bool,
        started: float,
        expires: float,
    ) -> None:
        self._connection = connection
        self.request_id = request_id
        #: The frame until it is written (then released).
        self.data = data
        self.holds_slot = holds_slot
        self.sent = False
        self.withdrawn = False
        #: The node answered from a stored outcome (a keyed write's repeat).
        self.replayed = False
        self.started = started
        #: When an orphan of this request is forgotten if never confirmed.
        self.expires = expires
        self._done = False
        self._task: trio.lowlevel.Task | None = None
        self._result: Any = None
        self._error: BaseException | None = None
        #: This wait's key in the Expiries that holds it (see wait_until).
        self._timer_key = -1

    @property
    def done(self) -> bool:
        """Whether a reply (or failure) was delivered."""
        return self._done

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._result = result
        self._error = error
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _expire(self, why: object = _EXPIRED) -> None:
        """The wait's expiry passed, or its timer stopped: wake the waiter."""
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task, Value(why))

    def _abort(self, raise_cancel: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> Any:
        """Wait for the reply; return the result or raise the typed error.

        Cancellation withdraws an unsent frame, or orphans a sent one.
        """
        if self._done:
            await trio.lowlevel.checkpoint()
        else:
            self._task = trio.lowlevel.current_task()
            try:
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            except BaseException:
                self._connection._abandon(self)
                raise
        return self._outcome()

    async def wait_until(self, expires: float, expiries: Expiries) -> Any:
        """:meth:`wait`, giving up at trio time ``expires`` with :class:`Expired`
        (the request then withdrawn or abandoned, as for a cancellation).

        ``expiries`` must be running (:attr:`Expiries.running`).
        """
        if self._done:
            await trio.lowlevel.checkpoint()
            return self._outcome()
        self._task = trio.lowlevel.current_task()
        expiries.add(self, expires)
        try:
            woken = await trio.lowlevel.wait_task_rescheduled(self._abort)
        except BaseException:
            expiries.discard(self)
            self._connection._abandon(self)
            raise
        if woken is _EXPIRED:
            if not self._done:
                self._connection._abandon(self)
                raise Expired
        elif woken is _UNTIMED and not self._done:
            with trio.CancelScope(deadline=expires) as scope:
                return await self.wait()
            assert scope.cancelled_caught
            raise Expired
        else:
            expiries.discard(self)
        return self._outcome()

    def _outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class Expiries:
    """The timer of the waits that carry an expiry (see the module docstring).

    ``run`` it in a nursery; while it is not running, callers must bound their
    waits some other way (a cancel scope). When it stops, the waits it still
    holds are handed back to their waiters, which bound them with a cancel
    scope of their own, so none is left without a bound.
    """

    def __init__(self) -> None:
        #: The waits held, by the key each was given when added.
        self._live: dict[int, PendingRequest] = {}
        #: (expires, key) of every wait added, ended ones included until they
        #: reach the top or the heap is rebuilt (it never holds the requests).
        self._heap: list[tuple[float, int]] = []
        self._keys = itertools.count()
        self._wake_at = math.inf
        self._scope: trio.CancelScope | None = None
        #: Whether ``run`` is serving (waits may be given to it).
        self.running = False

    def __len__(self) -> int:
        return len(self._live)

    def add(self, pending: PendingRequest, expires: float) -> None:
        """Expire ``pending``'s wait at ``expires`` unless discarded before."""
        key = next(self._keys)
        pending._timer_key = key
        self._live[key] = pending
        heap = self._heap
        heapq.heappush(heap, (expires, key))
        if len(heap) > 2 * len(self._live) + 64:
            # Ended waits outnumber the live ones: drop them (amortised O(1) per
            # wait), so the heap stays within twice what is waiting.
            live = self._live
            heap[:] = [entry for entry in heap if entry[1] in live]
            heapq.heapify(heap)
        if expires < self._wake_at:
            # Rare in steady traffic: expiries come in about the order they are set.
            self._wake_at = expires
            if self._scope is not None:
                self._scope.deadline = expires

    def discard(self, pending: PendingRequest) -> None:
        """Forget ``pending`` (its wait ended some other way)."""
        self._live.pop(pending._timer_key, None)

    async def run(self) -> None:
        """Expire waits as their time comes, until cancelled."""
        self.running = True
        try:
            while True:
                with trio.CancelScope(deadline=self._wake_at) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
                self._expire_due(trio.current_time())
        finally:
            self.running = False
            self._scope = None
            live, self._live = self._live, {}
            self._heap.clear()
            for pending in live.values():
                pending._expire(_UNTIMED)

    def _expire_due(self, now: float) -> None:
        """Expire what is due (O(log n) each) and find the next wake-up."""
        heap, live = self._heap, self._live
        while heap and heap[0][0] <= now:
            pending = live.pop(heapq.heappop(heap)[1], None)
            if pending is not None:
                pending._expire()
        while heap and heap[0][1] not in live:
            heapq.heappop(heap)  # ended waits: nothing to wake up for
        self._wake_at = heap[0][0] if heap else math.inf
