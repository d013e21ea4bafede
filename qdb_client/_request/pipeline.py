"""Calls: one deadline, attempts until one succeeds or the retry policy stops,
and the one error that says truthfully what happened."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .._cluster import Cluster
from .._metrics import LatencyHistograms
from .._policies import (
    AttemptTimeouts,
    Backoff,
    OutcomeKind,
    RetryBudget,
    RetryDecision,
    RetryPolicy,
    RetryRule,
)
from .._transport import Expiries
from ..errors import (
    Attempt,
    OutcomeUnknown,
    QdbError,
    RequestTimeout,
    RetryExhausted,
)
from ..events import (
    EventBus,
    RequestFailed,
    RequestStarted,
    RetryScheduled,
)
from .attempt import AttemptRunner
from .hedge import HedgedReads, Hedging
from .state import Arguments, AttemptResult, CallState, PipelineCounters

if TYPE_CHECKING:
    from ..config import ClientConfig


__all__ = ["RequestPipeline", "retry_backoff"]


class RequestPipeline(HedgedReads, AttemptRunner):
    """Runs calls with attempt timeouts, breakers, retries, hedges and one deadline."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        policy: RetryPolicy,
        budget: RetryBudget,
        rng: random.Random,
        attempt_timeouts: AttemptTimeouts | None = None,
        events: EventBus | None = None,
        hedging: Hedging | None = None,
    ) -> None:
        self.cluster = cluster
        self.events = events or EventBus()
        #: Reply times per method and node (always on: a bisect per reply).
        self.latencies = LatencyHistograms()
        self.policy = policy
        self.budget = budget
        self.rng = rng
        self.attempt_timeouts = attempt_timeouts or AttemptTimeouts()
        #: Hedged reads: None (the default) sends no hedges.
        self.hedging = hedging
        self.counters = PipelineCounters()
        #: The timer of attempts' waits for replies; run by the client (until
        #: it runs, attempts bound their waits with cancel scopes).
        self.expiries = Expiries()
        #: Reply time of the last successful attempt (read right after it).
        self._last_reply_time = 0.0
        self._now = _clock_reader()

    async def call(
        self,
        method: str,
        args: Arguments,
        *,
        budget_seconds: float,
        read_only: bool,
        idempotency_key: str | None = None,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Run ``method``: attempt, and on failure retry or raise as its outcome says.

        ``parse`` turns the node's result into the caller's (it raises
        ProtocolError for a malformed one): run inside the attempt, so a
        malformed reply is classified like a corrupted one. ``args`` may be a
        callable taking the connection the attempt goes on (a prepared
        statement's id depends on it).
        """
        now = self._now()
        call = CallState(method, now, budget_seconds, read_only, idempotency_key, parse)
        call.observe = self.events.wants(RequestStarted)
        self.counters.calls += 1
        self.budget.record_request(now)
        if read_only and self.hedging is not None and len(self.cluster.nodes) > 1:
            return await self._hedged(call, args, self.hedging)
        return await self._execute(call, args)

    async def _execute(self, call: CallState, args: Arguments) -> Any:
        """The attempts of ``call``, until one succeeds or the retry policy stops."""
        try:
            while True:
                result, attempt = await self._attempt(call, args)
                if attempt is None:
                    if call.suspects:
                        self._judge(call, answered_in=self._last_reply_time)
                    return result  # attempts are only reported with errors
                decision = self._decide(call, attempt)
                self._record_attempt(call, attempt, decision)
                if not decision.retry:
                    if call.suspects:
                        self._judge(call, answered_in=None)
                    call.ended_on = attempt.outcome.kind
                    raise self._final(call, attempt, decision)
                await self._next(call, attempt, decision)
        except BaseException:
            if call.suspects:
                if call.superseded_after is not None:
                    # Another copy of the read answered in that time.
                    self._judge(call, answered_in=call.superseded_after)
                else:
                    self._judge(call, answered_in=None, blame=False)  # cancelled: release probes
            raise

    async def _next(self, call: CallState, attempt: AttemptResult, decision: RetryDecision) -> None:
        """Count the retry (or re-queue) and wait out its backoff."""
        if call.observe:
            self.events.emit(
                RetryScheduled(
                    trio.current_time(),
                    call.method,
                    len(call.attempts) + 1,
                    decision.delay,
                    decision.reason,
                )
            )
        if decision.requeue:
            call.requeues += 1
            self.counters.requeues += 1
        else:
            call.retries += 1
            self.counters.retries += 1
            call.previous_delay = decision.delay
            if attempt.node is not None:
                call.tried.append(attempt.node)
        if decision.delay > 0:
            await trio.sleep(decision.delay)

    def _judge(self, call: CallState, *, answered_in: float | None, blame: bool = True) -> None:
        """Decide the attempt timeouts of a call now that it ended.

        A node that timed out is to blame, unless another node's reply took as
        long (then the request is slow everywhere) or the caller cancelled.
        """
        assert call.suspects is not None
        now = trio.current_time()
        for node, generation, timeout, waited in call.suspects:
            if blame and (answered_in is None or answered_in < timeout):
                node.breaker.record_failure(
                    now, generation, cause="slow", may_open=self.cluster.may_open_on_silence(node)
                )
                node.latency.record_penalty(waited)
            else:
                node.breaker.record_ignored(generation)
        call.suspects = None

    # ------------------------------------------------------------ decisions

    def _decide(self, call: CallState, attempt: AttemptResult) -> RetryDecision:
        now = trio.current_time()
        outcome = attempt.outcome
        if outcome.kind is OutcomeKind.CIRCUIT_OPEN:
            self.counters.circuit_rejections += 1
        decision = self.policy.decide(
            call.retries,
            outcome,
            idempotent=call.safe,
            remaining=call.deadline - now,
            rng=self.rng,
            previous_delay=call.previous_delay,
            requeues_done=call.requeues,
            error=attempt.error,
        )
        if decision.retry and not decision.requeue and not self.budget.try_retry(now):
            self.counters.retry_budget_exhausted += 1
            return RetryDecision(False, 0.0, f"{decision.reason}, but the retry budget is spent")
        return decision

    def _record_attempt(
        self, call: CallState, attempt: AttemptResult, decision: RetryDecision
    ) -> None:
        now = trio.current_time()
        outcome = attempt.outcome
        text = outcome.kind.value if attempt.error is None else _describe(attempt.error)
        call.attempts.append(
            Attempt(
                number=len(call.attempts) + 1,
                node=attempt.node.address if attempt.node is not None else None,
                started=attempt.started - call.start,
                elapsed=now - attempt.started,
                outcome=text,
                retried=decision.retry,
                reason=decision.reason,
                sent=attempt.sent,
                maybe_applied=outcome.maybe_applied and not call.read_only,
            )
        )
        if self.events.wants(RequestFailed):
            self.events.emit(
                RequestFailed(
                    now,
                    call.method,
                    attempt.node.address if attempt.node is not None else "",
                    len(call.attempts),
                    attempt.request_id,
                    now - attempt.started,
                    outcome.kind.value,
                    text,
                    decision.retry,
                )
            )

    def _final(self, call: CallState, attempt: AttemptResult, decision: RetryDecision) -> QdbError:
        """The one error the call raises, with its facts."""
        outcome = attempt.outcome
        error = attempt.error
        kind = outcome.kind
        if not call.in_race:  # a hedged read's failure is counted once, when the read ends
            self.count_failure(kind)
        history = tuple(call.attempts)
        unkeyed_write = not call.read_only and call.key is None
        final: QdbError
        if kind in _DEADLINE:
            sent = call.sent
            timed_out = RequestTimeout(
                f"{call.method} did not complete within {call.timeout:g} s"
                + (" (sent; outcome unknown)" if sent else " (not sent)"),
                timeout=call.timeout,
                request_sent=sent,
            )
            if unkeyed_write and call.maybe_applied:
                final = self._unknown(
                    call,
                    f"{call.method} was sent to {history[-1].node} but no reply came within"
                    f" {call.timeout:g} s; without an idempotency key it is unknown whether it"
                    " was applied",
                    timed_out,
                )
            else:
                timed_out.attempts = history
                final = timed_out
        elif unkeyed_write and call.maybe_applied:
            final = self._unknown(
                call,
                f"{call.method} reached {history[-1].node} but its outcome was lost ({error});"
                " without an idempotency key it was not retried and may or may not have been"
                " applied",
                error,
            )
        elif outcome.retry is not RetryRule.NEVER or (
            kind in (OutcomeKind.CIRCUIT_OPEN, OutcomeKind.NO_NODE) and call.sent
        ):
            # Retrying stopped on a failure that could have been retried (or
            # nothing was left to try after an attempt that reached a node).
            assert error is not None
            final = RetryExhausted(
                f"{call.method} failed: {decision.reason}", last_error=error, attempts=history
            )
            final.__cause__ = error
        else:
            assert error is not None
            final = error
        final.attempts = history
        final.request_sent = call.sent
        final.maybe_applied = call.maybe_applied
        final.idempotency_key = call.key
        return final

    def count_failure(self, kind: OutcomeKind | None) -> None:
        """Count a call that failed, ending on an attempt of ``kind``."""
        self.counters.failures += 1
        if kind in _DEADLINE:
            self.counters.call_timeouts += 1

    def _unknown(
        self, call: CallState, message: str, cause: BaseException | None
    ) -> OutcomeUnknown:
        self.counters.outcome_unknown += 1
        unknown = OutcomeUnknown(message)
        unknown.__cause__ = cause
        return unknown


_DEADLINE = (OutcomeKind.DEADLINE_BEFORE_SEND, OutcomeKind.DEADLINE_AFTER_SEND)


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


def retry_backoff(config: ClientConfig) -> Backoff:
    """The backoff between retries that ``config`` asks for (requests, and the
    resumes of streams and subscriptions)."""
    return Backoff(
        initial=config.retry_initial_backoff,
        maximum=config.retry_max_backoff,
        multiplier=config.retry_multiplier,
        jitter=config.retry_jitter,
        factor=config.retry_jitter_factor,
    )


def _clock_reader() -> Callable[[], float]:
    """What reads trio's clock on the request path: the run's clock itself when
    made inside a run (``trio.current_time`` asks the run for it at each read;
    a client lives in one run), else ``trio.current_time``."""
    try:
        return trio.lowlevel.current_clock().current_time
    except RuntimeError:
        return trio.current_time
