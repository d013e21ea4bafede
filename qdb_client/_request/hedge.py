"""Hedged reads (Cassandra's speculative execution, gRPC's hedging policy): a
read that has no answer ``hedge_delay`` after it started is sent again, to
another node, and the first answer wins.

Each copy of the read is a whole call of its own (its attempts, retries and
attempt timeouts) within the read's one deadline, run in a nursery of the
caller's task, so a copy never outlives the call. The first copy to answer
wins and the others are cancelled: their requests are CANCELled on their
nodes, and each one's outcome is ``SUPERSEDED``: its node is blamed (a
breaker failure of cause ``slow`` and a latency penalty) when the winner's
reply took less than it had waited, so a copy sent later that loses is not.
A copy that fails ends the read only when its error is the answer itself (a
node refused the SQL: every node would) or when no other copy is left;
otherwise the others go on. Hedges have a budget of their own, with the
retry budget's settings, so when the whole cluster slows down they stop
instead of doubling the load, and never leave a retry without budget.

Only reads are hedged, and only in a cluster of more than one node: a write,
even one with an idempotency key, is never sent twice at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._cluster import Cluster
from .._policies import OutcomeKind, RetryBudget, RetryBudgetSettings
from ..errors import QdbError
from ..events import EventBus, RequestHedged
from .state import Arguments, CallState, PipelineCounters

__all__ = ["HedgedReads", "Hedging"]


class Hedging:
    """When hedges are sent: ``delay`` seconds after the read started (and
    ``delay`` after each hedge), at most ``max_hedges`` of them, within
    ``budget`` (a retry budget of their own: spending the retries' would
    leave a read that meets an attempt timeout no retry)."""

    __slots__ = ("budget", "delay", "max_hedges")

    def __init__(
        self, delay: float, max_hedges: int = 1, budget: RetryBudgetSettings | None = None
    ) -> None:
        self.delay = delay
        self.max_hedges = max_hedges
        self.budget = RetryBudget(budget or RetryBudgetSettings())


#: Outcomes whose error is the answer itself, the same whichever node gave it
#: (or that end every copy): a read that fails so ends at once.
_ANSWERS = frozenset(
    {
        OutcomeKind.REJECTED,
        OutcomeKind.BAD_REQUEST,
        OutcomeKind.UNEXPECTED,
        OutcomeKind.CLOSED_BEFORE_SEND,
        OutcomeKind.CLOSED_AFTER_SEND,
    }
)


class _Race:
    """The copies of one hedged read, and how it ended."""

    __slots__ = (
        "answered",
        "copies",
        "done",
        "ended_on",
        "errors",
        "reply_time",
        "result",
        "running",
    )

    def __init__(self) -> None:
        self.copies: list[CallState] = []
        self.running: list[CallState] = []
        self.done = trio.Event()
        self.answered = False
        self.result: Any = None
        #: The reply time of the winning copy's last attempt.
        self.reply_time: float | None = None
        self.errors: list[Exception] = []
        #: The outcome of the attempt the failed read ended on.
        self.ended_on: OutcomeKind | None = None


class HedgedReads:
    """The hedged reads of :class:`~.pipeline.RequestPipeline` (its state is set there)."""

    cluster: Cluster
    counters: PipelineCounters
    events: EventBus
    _last_reply_time: float

    if TYPE_CHECKING:

        async def _execute(self, call: CallState, args: Arguments) -> Any: ...

        def count_failure(self, kind: OutcomeKind | None) -> None: ...

    async def _hedged(self, first: CallState, args: Arguments, hedging: Hedging) -> Any:
        """Run the read ``first`` with hedges: the first copy's answer."""
        race = _Race()
        hedging.budget.record_request(first.start)
        async with trio.open_nursery() as nursery:
            self._spawn(nursery, race, first, args)
            for number in range(1, hedging.max_hedges + 1):
                at = first.start + number * hedging.delay
                if at >= first.deadline:
                    break
                with trio.move_on_at(at):
                    await race.done.wait()
                if race.done.is_set():
                    break
                copy = self._hedge(race, first, number, hedging.budget)
                if copy is not None:
                    self._spawn(nursery, race, copy, args)
            await race.done.wait()
            for loser in race.running:  # still waiting when another copy answered
                loser.superseded = True
                loser.superseded_after = race.reply_time
            nursery.cancel_scope.cancel()
        if race.answered:
            return race.result
        raise self._failed(race)

    def _spawn(self, nursery: trio.Nursery, race: _Race, call: CallState, args: Arguments) -> None:
        call.in_race = True
        race.copies.append(call)
        race.running.append(call)
        nursery.start_soon(self._copy, race, call, args)

    def _hedge(
        self, race: _Race, first: CallState, number: int, budget: RetryBudget
    ) -> CallState | None:
        """The call state of hedge ``number``, or None when it should not be sent:
        no other node would take it, or the hedge budget is spent."""
        now = trio.current_time()
        busy = [c.node for c in race.running if c.node is not None]
        if not busy or not self.cluster.has_alternative(busy[0], busy[1:], now):
            return None
        if not budget.try_retry(now):
            self.counters.hedge_budget_exhausted += 1
            return None
        self.counters.hedges += 1
        copy = CallState(first.method, first.start, first.timeout, True, None, first.parse)
        copy.observe = first.observe
        copy.tried = busy  # the nodes the read already waits on: go elsewhere
        if self.events.wants(RequestHedged):
            self.events.emit(
                RequestHedged(
                    now, first.method, number, now - first.start, tuple(n.address for n in busy)
                )
            )
        return copy

    async def _copy(self, race: _Race, call: CallState, args: Arguments) -> None:
        """One copy of the read; what it ends in goes to ``race``."""
        try:
            result = await self._execute(call, args)
        except Exception as exc:  # a QdbError, or a defect: raised by the read either way
            race.running.remove(call)
            if not race.done.is_set():
                race.errors.append(exc)
                race.ended_on = call.ended_on
                if not race.running or call.ended_on in _ANSWERS or not isinstance(exc, QdbError):
                    race.done.set()
            return
        race.running.remove(call)
        if race.done.is_set():
            return  # answered in the same pass as the winner: dropped
        race.answered = True
        race.result = result
        race.reply_time = self._last_reply_time  # the winning attempt's, set as it returned
        if call is not race.copies[0]:
            self.counters.hedge_wins += 1
        race.done.set()

    def _failed(self, race: _Race) -> Exception:
        """The read's error when no copy answered: the one that ended it, with
        every copy's attempts in the order they started."""
        error = race.errors[-1]
        self.count_failure(race.ended_on)
        if isinstance(error, QdbError):
            attempts = sorted((a for c in race.copies for a in c.attempts), key=_started)
            error.attempts = tuple(attrs.evolve(a, number=n) for n, a in enumerate(attempts, 1))
            error.request_sent = any(c.sent for c in race.copies)
        return error


def _started(attempt: Any) -> float:
    return float(attempt.started)
