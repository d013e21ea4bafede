"""Circuit breaker of one node. Pure: time comes in as ``now``.

CLOSED: requests flow; ``failure_threshold`` consecutive failures open it.
OPEN: requests are refused (counted as ``circuit_open_requests``) until
``open_timeout`` has passed, then HALF_OPEN.
HALF_OPEN: at most ``half_open_probes`` requests at a time are let through;
``success_threshold`` successes close it, any failure opens it again.

What counts is decided once per attempt by the outcome classifier
(:mod:`.outcome`, whose table docs/resilience.md prints): failures are
connection losses and failed connects (cause ``connection``), silence
(attempt timeouts, the node's TIMEOUT; cause ``slow``) and retryable node
errors (cause ``overload``); a SQL error is the caller's problem and counts
as a success of the node; a GOAWAY, a cancellation or our own pool's
congestion count as nothing.

Correlated failures count once: every failure carries an optional
``correlation`` key (the id of the connection loss or failed connect behind
it) and a key already counted in the current run of failures is only
tallied in the metrics. So one reset that fails N requests in flight is one
failure, not N.

A breaker opened only by ``connection`` failures is given a second chance as
soon as the node is shown reachable (a successful heartbeat, a reconnect):
:meth:`node_reachable` moves it to HALF_OPEN. One opened by silence or
overload waits out ``open_timeout``: a node that answers pings but not
queries proves nothing by answering pings.

Silence is judged beside the other nodes (slower than they answer), so it
never ejects the last node left: the owner records such a failure with
``may_open=False`` when no other node's breaker admits, and calls
:meth:`rejudge` when none is left, which sends a breaker that silence alone
opened to HALF_OPEN (a host-wide stall, or the faster nodes shut down for a
rolling restart, must not leave every remaining node refused for
``open_timeout``).

Defaults follow seed 000: 5 failures to open, 2 successes to close, 30 s
before half-open.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["SILENCE_CAUSES", "BreakerSettings", "BreakerState", "CircuitBreaker"]

#: Failure causes that a successful contact with the node disproves.
_CONNECTION_CAUSES = frozenset({"connection"})
#: Failure causes that only mean "slower than the other nodes".
SILENCE_CAUSES = frozenset({"slow"})


class BreakerState(enum.Enum):
    """The three breaker states."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@attrs.frozen(kw_only=True)
class BreakerSettings:
    """Thresholds of a circuit breaker."""

    failure_threshold: int = 5
    success_threshold: int = 2
    open_timeout: float = 30.0
    half_open_probes: int = 1


class CircuitBreaker:
    """Failure accounting and admission for one node."""

    def __init__(self, settings: BreakerSettings) -> None:
        self.settings = settings
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._probes = 0
        #: Correlation keys already counted in the current run of failures.
        self._correlated: set[object] = set()
        #: Causes of the failures of the current run (and of the last opening).
        self._causes: set[str] = set()
        #: Causes of the failures that last opened the breaker.
        self.opened_by: frozenset[str] = frozenset()
        #: Bumped at every state change; records carry the one they were admitted in.
        self.generation = 0
        self.total_requests = 0
        self.successful_requests = 0
        self.failed_requests = 0
        self.circuit_open_requests = 0
        #: Times the breaker moved to OPEN (from CLOSED or HALF_OPEN).
        self.opens = 0
        #: (time, new state) of every transition, oldest first (last 100 kept).
        self.transitions: list[tuple[float, BreakerState]] = []
        #: Called as ``on_transition(previous, new, now)`` after every state change
        #: (the owner reports it; the breaker stays free of I/O).
        self.on_transition: Callable[[BreakerState, BreakerState, float], None] | None = None

    def state(self, now: float) -> BreakerState:
        """The state at ``now`` (OPEN turns HALF_OPEN once its timeout passed)."""
        if self._state is BreakerState.OPEN and now >= self._opened_at + self.settings.open_timeout:
            self._move(BreakerState.HALF_OPEN, now)
        return self._state

    def reopens_at(self) -> float | None:
        """When an OPEN breaker turns HALF_OPEN (None unless OPEN)."""
        if self._state is BreakerState.OPEN:
            return self._opened_at + self.settings.open_timeout
        return None

    def allow(self, now: float) -> bool:
        """Admit one request? Every True must be followed by one record_*()."""
        self.total_requests += 1
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self._probes < self.settings.half_open_probes:
            self._probes += 1
            return True
        self.circuit_open_requests += 1
        return False

    def record_rejection(self) -> None:
        """Count a request turned away without ``allow`` (node skipped while open)."""
        self.total_requests += 1
        self.circuit_open_requests += 1

    def would_allow(self, now: float) -> bool:
        """Whether ``allow`` would admit a request now, without counting one."""
        state = self.state(now)
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and self._probes < self.settings.half_open_probes
        )

    def record_success(self, now: float, generation: int | None = None) -> None:
        """An admitted request succeeded (as far as the node is concerned).

        ``generation`` is :attr:`generation` as it was when the request was
        admitted; a record from before a state change only counts in the
        metrics (it must not close a breaker it didn't probe).
        """
        self.successful_requests += 1
        if generation is not None and generation != self.generation:
            return
        self._consecutive_failures = 0
        if self._correlated:
            self._correlated.clear()
        if self._causes:
            self._causes.clear()
        if self._state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            self._half_open_successes += 1
            if self._half_open_successes >= self.settings.success_threshold:
                self._move(BreakerState.CLOSED, now)

    def record_failure(
        self,
        now: float,
        generation: int | None = None,
        *,
        cause: str = "",
        correlation: object = None,
        may_open: bool = True,
    ) -> None:
        """An admitted request failed because of the node (``generation`` as above).

        ``cause`` is the outcome's kind of evidence (``connection``, ``slow``,
        ``overload``); failures sharing a non-None ``correlation`` key are one
        event and count once. With ``may_open=False`` the failure counts in
        the run (a later one may open the breaker) but does not open or
        reopen it now.
        """
        self.failed_requests += 1
        if generation is not None and generation != self.generation:
            return
        if correlation is not None:
            if correlation in self._correlated:
                if self._state is BreakerState.HALF_OPEN:
                    self._probes = max(0, self._probes - 1)
                return
            self._correlated.add(correlation)
        self._causes.add(cause)
        if self._state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if may_open:
                self._open(now)
            return
        self._consecutive_failures += 1
        if (
            may_open
            and self._state is BreakerState.CLOSED
            and self._consecutive_failures >= self.settings.failure_threshold
        ):
            self._open(now)

    def record_ignored(self, generation: int | None = None) -> None:
        """An admitted request ended without saying anything about the node
        (e.g. the caller cancelled it): release its half-open probe slot."""
        if generation is not None and generation != self.generation:
            return
        if self._state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)

    def probe_now(self, now: float) -> None:
        """Skip the rest of an OPEN wait (the node was just seen healthy again)."""
        if self._state is BreakerState.OPEN:
            self._move(BreakerState.HALF_OPEN, now)

    def rejudge(self, now: float) -> bool:
        """No other node is left to compare this one with.

        An OPEN breaker that silence alone opened goes HALF_OPEN at once:
        "slower than the others" means nothing without others. Returns
        whether it did.
        """
        if self._state is BreakerState.OPEN and self.opened_by and self.opened_by <= SILENCE_CAUSES:
            self._move(BreakerState.HALF_OPEN, now)
            return True
        return False

    def node_reachable(self, now: float) -> bool:
        """The node was just reached (a heartbeat answered, a connection opened).

        An OPEN breaker that only connection failures opened goes HALF_OPEN at
        once (those failures are disproved); returns whether it did.
        """
        if (
            self._state is BreakerState.OPEN
            and self.opened_by
            and self.opened_by <= _CONNECTION_CAUSES
        ):
            self._move(BreakerState.HALF_OPEN, now)
            return True
        return False

    def _open(self, now: float) -> None:
        self._opened_at = now
        self.opened_by = frozenset(self._causes)
        self._move(BreakerState.OPEN, now)

    def _move(self, state: BreakerState, now: float) -> None:
        previous = self._state
        self.generation += 1
        self._state = state
        if state is BreakerState.OPEN:
            self.opens += 1
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._probes = 0
        self._correlated.clear()
        self._causes.clear()
        self.transitions.append((now, state))
        del self.transitions[:-100]
        if self.on_transition is not None:
            self.on_transition(previous, state, now)

    def metrics(self, now: float) -> dict[str, Any]:
        """Counters named as in the reliability catalogue (seed 003)."""
        return {
            "total_requests": self.total_requests,
            "successful_requests": self.successful_requests,
            "failed_requests": self.failed_requests,
            "circuit_open_requests": self.circuit_open_requests,
            "current_state": self.state(now).value,
            "opens": self.opens,
            "opened_by": sorted(self.opened_by),
            "transitions": [state.value for _, state in self.transitions],
        }
