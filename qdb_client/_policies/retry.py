"""Whether another attempt follows, when, and why not. Pure.

The kind of failure is decided by the outcome classifier (:mod:`.outcome`);
this policy adds the limits. A failed attempt is retried when all of these
hold:

1. its outcome allows a retry: always (the node did not process the
   request: a retryable node error, a connection lost before the write, a
   failed connect, our pool's congestion), or only if the request is safe to
   repeat (a read, or a write carrying an idempotency key) when the request
   may have run (a connection lost after the write, a corrupted reply, an
   attempt timeout);
2. retries remain (``max_retries``), and the retry budget has room (checked
   by the pipeline);
3. the next attempt fits the deadline: after the backoff delay at least
   ``min_attempt_time`` of the budget must be left.

A re-queue (the node sent GOAWAY before processing the request) is no
retry: it goes again at once, without backoff, and uses up neither a retry
nor the budget (at most ``max_requeues`` times a call). The backoff delay
honours a server's ``retry_after_ms`` when longer.
"""

from __future__ import annotations

import random

import attrs

from .backoff import Backoff
from .outcome import Outcome, OutcomeKind, RetryRule

__all__ = ["RetryDecision", "RetryPolicy"]


@attrs.frozen
class RetryDecision:
    """Retry after ``delay``, or stop because ``reason``; ``requeue``: not a retry."""

    retry: bool
    delay: float
    reason: str
    requeue: bool = False


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Retry limits and backoff.

    Defaults (driver seed 001): 3 retries, 100 ms initial backoff doubling to
    at most 5 s, each delay jittered by +-10% (reliability seed 003).
    """

    max_retries: int = 3
    backoff: Backoff = attrs.field(
        factory=lambda: Backoff(initial=0.1, maximum=5.0, multiplier=2.0, factor=0.1)
    )
    min_attempt_time: float = 0.01
    max_requeues: int = 8

    def decide(
        self,
        retries_done: int,
        outcome: Outcome,
        *,
        idempotent: bool,
        remaining: float,
        rng: random.Random,
        previous_delay: float | None = None,
        requeues_done: int = 0,
        error: BaseException | None = None,
    ) -> RetryDecision:
        """Retry after a delay, or give up, after the attempt that ended in ``outcome``.

        ``retries_done`` retries and ``requeues_done`` re-queues came before;
        ``error`` (the attempt's exception) only words the reason and carries
        a server's ``retry_after_ms``.
        """
        why = _describe(outcome, error)
        rule = outcome.retry
        if rule is RetryRule.REQUEUE and requeues_done < self.max_requeues:
            return RetryDecision(True, 0.0, why, requeue=True)
        if rule is RetryRule.NEVER:
            return RetryDecision(False, 0.0, f"{why} is not retryable")
        if rule is RetryRule.IF_SAFE and not idempotent:
            return RetryDecision(
                False, 0.0, f"{why}; a write without an idempotency key can't be repeated"
            )
        if retries_done >= self.max_retries:
            return RetryDecision(False, 0.0, f"{why}, but all {self.max_retries} retries are used")
        delay = self.backoff.delay(retries_done, rng, previous_delay) if outcome.backoff else 0.0
        retry_after = getattr(error, "retry_after_ms", None)
        if isinstance(retry_after, int) and retry_after > 0:
            delay = max(delay, retry_after / 1000)
        if remaining - delay < self.min_attempt_time:
            return RetryDecision(
                False,
                delay,
                f"{why}, but {remaining:.3f} s of the deadline can't fit a {delay:.3f} s backoff"
                " and another attempt",
            )
        return RetryDecision(True, delay, f"{why}, retryable")


def _describe(outcome: Outcome, error: BaseException | None) -> str:
    name = getattr(error, "name", None)
    code = getattr(error, "code", None)
    if outcome.kind in (OutcomeKind.REJECTED, OutcomeKind.NODE_UNAVAILABLE) and name:
        return f"{name} ({code})"
    if outcome.kind is OutcomeKind.CIRCUIT_OPEN:
        return "every usable node's circuit breaker is open (fail fast)"
    if error is not None and outcome.kind in (
        OutcomeKind.CONNECT_FAILED,
        OutcomeKind.HANDSHAKE_REFUSED,
        OutcomeKind.BAD_REQUEST,
        OutcomeKind.UNEXPECTED,
    ):
        return f"{outcome.kind.value} ({type(error).__name__})"
    return outcome.kind.value
