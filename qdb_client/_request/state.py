"""What a call carries across its attempts, and what one attempt leaves behind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from .._cluster import Node
from .._policies import Outcome, OutcomeKind
from ..errors import Attempt, QdbError

__all__ = [
    "NOT_ADMITTED",
    "Arguments",
    "AttemptResult",
    "CallState",
    "DeadlinePassed",
    "PipelineCounters",
]

#: A request's arguments, or a function of the connection it goes on.
Arguments = dict[str, Any] | Callable[[Any], dict[str, Any]]

NOT_ADMITTED = -1


@attrs.define
class PipelineCounters:
    """Totals across all calls of one client."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    requeues: int = 0
    attempt_timeouts: int = 0
    #: Calls that ended because their deadline passed (RequestTimeout, or
    #: OutcomeUnknown for an unkeyed write that was sent).
    call_timeouts: int = 0
    #: Keyed writes a node answered from its stored outcome (IdempotentReplay).
    idempotent_replays: int = 0
    failures: int = 0
    outcome_unknown: int = 0
    retry_budget_exhausted: int = 0
    circuit_rejections: int = 0
    #: Hedges sent: second copies of reads that had no reply in ``hedge_delay``.
    hedges: int = 0
    #: Hedged reads a hedge answered (its first copy was then cancelled).
    hedge_wins: int = 0
    #: Hedges not sent because the hedge budget was spent.
    hedge_budget_exhausted: int = 0


class CallState:
    """The state of one call across its attempts."""

    __slots__ = (
        "attempts",
        "deadline",
        "ended_on",
        "in_race",
        "key",
        "method",
        "node",
        "observe",
        "parse",
        "previous_delay",
        "read_only",
        "requeues",
        "retries",
        "start",
        "superseded",
        "superseded_after",
        "suspects",
        "timeout",
        "tried",
    )

    def __init__(
        self,
        method: str,
        start: float,
        timeout: float,
        read_only: bool,
        key: str | None,
        parse: Callable[[Any], Any] | None,
    ) -> None:
        self.method = method
        self.parse = parse
        #: Whether request events reach anyone (decided once per call).
        self.observe = False
        #: Attempt timeouts to judge when the call ends: (node, generation,
        #: timeout, waited). See BreakerVerdict.JUDGED.
        self.suspects: list[tuple[Node, int, float, float]] | None = None
        self.start = start
        self.timeout = timeout
        self.deadline = start + timeout
        self.read_only = read_only
        self.key = key
        self.attempts: list[Attempt] = []
        self.tried: list[Node] = []
        self.retries = 0
        self.requeues = 0
        self.previous_delay: float | None = None
        #: The node of the attempt under way (None before the first has one).
        self.node: Node | None = None
        #: Set when another copy of this read (a hedge) answered first: its
        #: attempt's cancellation is then not the caller's.
        self.superseded = False
        #: The reply time of the copy that answered first (None: its answer
        #: was an error); what this copy's lost wait is judged against.
        self.superseded_after: float | None = None
        #: Whether this is one copy of a hedged read (counted as a call once).
        self.in_race = False
        #: The outcome the call ended on, when it raised (read by hedging).
        self.ended_on: OutcomeKind | None = None

    @property
    def safe(self) -> bool:
        """Whether the request may be repeated: a read, or a write with a key."""
        return self.read_only or self.key is not None

    @property
    def sent(self) -> bool:
        """Whether any attempt's request reached the wire."""
        return any(a.sent for a in self.attempts)

    @property
    def maybe_applied(self) -> bool:
        """Whether a write may have been applied by one of the attempts."""
        return not self.read_only and any(a.maybe_applied for a in self.attempts)


class DeadlinePassed(Exception):  # internal: never leaves the attempt
    """The call's deadline passed while the attempt waited to send."""


class AttemptResult:
    """What one attempt left behind, for the call to decide on."""

    __slots__ = ("error", "node", "outcome", "request_id", "sent", "started")

    def __init__(
        self,
        outcome: Outcome,
        error: QdbError | None,
        node: Node | None,
        sent: bool,
        started: float,
        request_id: int = 0,
    ) -> None:
        self.outcome = outcome
        self.error = error
        self.node = node
        self.sent = sent
        self.started = started
        self.request_id = request_id
