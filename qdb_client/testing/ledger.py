"""The in-flight ledger of one connection: which requests hold a slot, which await a reply.

Two counts, because they end at different moments:

- a request's **slot** (what ``max_in_flight`` limits, and what a CANCEL
  finds) is held from acceptance until its reply is *decided*, and freed
  *before* the reply is written. A client sends its next request as soon as
  a reply arrives; were the slot freed after the write (trio yields after
  every successful send), that request could find it still taken and get
  CAPACITY_EXCEEDED.
- a request is **unanswered** until its reply has been *written* (or it
  will never have one). Graceful closing (GOAWAY ``shutdown``, a client's
  GOAWAY) and the idle watchdog wait for that, so closing never cuts a
  reply off.

Unanswered requests also bound what a connection reads: a client that
stops reading its replies (they wait to be written) is no longer read once
``max_in_flight`` + 1 requests are unanswered (:meth:`RequestLedger.wait_backlog_below`),
so TCP backpressure stops it instead of the node running all it pipelines.

A CANCEL stops a request that still holds its slot; one whose slot is gone
has had (or is being sent) its reply, and the CANCEL is ignored
(docs/protocol.md section 8.3).
"""

from __future__ import annotations

import trio

from ..protocol import ErrorCode

__all__ = ["RequestLedger", "Slot"]


class Slot:
    """One accepted request's hold on the connection, until its reply is decided."""

    __slots__ = ("cancel_requested", "scope")

    def __init__(self) -> None:
        #: Cancelled by the client's CANCEL; the request runs inside it.
        self.scope = trio.CancelScope()
        #: Whether a CANCEL asked to stop the request.
        self.cancel_requested = False


class RequestLedger:
    """Slots and unanswered requests of one connection (synchronous bookkeeping).

    ``max_in_flight`` is the WELCOME limit, checked by :meth:`refusal`.
    """

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._slots: dict[int, Slot] = {}
        self._unanswered = 0
        self._answered = trio.lowlevel.ParkingLot()  # every request answered
        self._progress = trio.lowlevel.ParkingLot()  # one request answered

    @property
    def in_flight(self) -> int:
        """Requests holding a slot."""
        return len(self._slots)

    @property
    def unanswered(self) -> int:
        """Requests accepted whose reply has not been written yet."""
        return self._unanswered

    def refusal(self, rid: int) -> tuple[ErrorCode, str] | None:
        """Why request ``rid`` can't be accepted now (None: it can)."""
        if rid in self._slots:
            return ErrorCode.INVALID_REQUEST, f"request id {rid} is already in flight"
        if len(self._slots) >= self.max_in_flight:
            return (
                ErrorCode.CAPACITY_EXCEEDED,
                f"{len(self._slots)} requests in flight, the maximum per connection",
            )
        return None

    def accept(self, rid: int) -> Slot:
        """Give request ``rid`` a slot; it is unanswered until :meth:`answered`."""
        slot = Slot()
        self._slots[rid] = slot
        self._unanswered += 1
        return slot

    def cancel(self, rid: int) -> bool:
        """CANCEL of ``rid``: stop it if it holds a slot; False if it doesn't (ignored)."""
        slot = self._slots.get(rid)
        if slot is None:
            return False
        slot.cancel_requested = True
        slot.scope.cancel()
        return True

    def free(self, rid: int, slot: Slot) -> None:
        """The reply of ``rid`` is decided: free its slot (idempotent)."""
        # Only this request's own entry: once freed, a (buggy) client may reuse the id.
        if self._slots.get(rid) is slot:
            del self._slots[rid]

    def answered(self) -> bool:
        """A request's reply was written (or never will be); True if none is left."""
        self._unanswered -= 1
        self._progress.unpark_all()
        if self._unanswered:
            return False
        self._answered.unpark_all()
        return True

    async def wait_backlog_below(self, limit: int) -> None:
        """Return once fewer than ``limit`` requests are unanswered.

        No checkpoint when there is nothing to wait for: the reader calls it
        before every frame, and reading checkpoints anyway.
        """
        while self._unanswered >= limit:
            await self._progress.park()

    async def wait_answered(self) -> None:
        """Return once no request is unanswered."""
        if not self._unanswered:
            await trio.lowlevel.checkpoint()
        while self._unanswered:
            await self._answered.park()
