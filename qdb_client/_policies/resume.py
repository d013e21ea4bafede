"""Whether a broken result stream or subscription is resumed, when, and why not. Pure.

A stream (``client.stream``) or subscription (``client.subscribe``) that loses
its connection or node continues elsewhere: a stream from the token of its
last page (``resume_stream``), a subscription from the event after its last
one (``subscribe`` with ``from_event``). Each failed attempt is classified
once by :func:`~.outcome.classify`, as for any request; this policy adds the
limits of a resume:

1. the outcome allows another attempt (a stream is a read, so "if safe to
   repeat" holds). Two outcomes that end a plain call are "not yet" here:
   no node available (every node was down for the selection timeout) and
   every breaker open. A resume has its own limits (below) and is worth
   waiting for: a node restarting in a few seconds should not cost the
   whole stream;
2. fewer than ``max_attempts`` attempts have failed since the last page (or
   event) arrived: progress resets the count, so cascading drops that each
   let some pages through never exhaust it, while a node that never comes
   back does;
3. with a deadline, the attempt fits in what is left after the backoff.

Delays are the retry policy's backoff (exponential, jittered, honouring a
server's ``retry_after_ms``), counted from the first attempt after the last
progress. A GOAWAY (the node promises it did not process the request) is
resumed at once, without backoff.
"""

from __future__ import annotations

import math
import random

import attrs

from .backoff import Backoff
from .outcome import Outcome, OutcomeKind, RetryRule
from .retry import RetryDecision

__all__ = ["ResumePolicy"]

#: Outcomes that end a call but only mean "not now" to a resume.
_WAIT_AND_SEE = frozenset({OutcomeKind.NO_NODE, OutcomeKind.CIRCUIT_OPEN})


@attrs.frozen(kw_only=True)
class ResumePolicy:
    """Limits of resuming one stream or subscription (see the module docstring)."""

    max_attempts: int = 5
    backoff: Backoff = attrs.field(
        factory=lambda: Backoff(initial=0.1, maximum=5.0, multiplier=2.0, factor=0.1)
    )
    min_attempt_time: float = 0.01

    def decide(
        self,
        outcome: Outcome,
        *,
        attempts_done: int,
        remaining: float = math.inf,
        rng: random.Random,
        previous_delay: float | None = None,
        error: BaseException | None = None,
    ) -> RetryDecision:
        """Resume after a delay, or give up, after a failure classified as ``outcome``.

        ``attempts_done`` attempts failed since the last progress (0 for the
        failure that broke a running stream); ``remaining`` is the time left
        before the stream's deadline (inf: none).
        """
        why = _describe(outcome, error)
        rule = outcome.retry
        if rule is RetryRule.NEVER and outcome.kind not in _WAIT_AND_SEE:
            return RetryDecision(False, 0.0, f"{why} is not retryable")
        if attempts_done >= self.max_attempts:
            return RetryDecision(
                False,
                0.0,
                f"{why}, and all {self.max_attempts} resume attempts since the last"
                " progress failed",
            )
        if rule is RetryRule.REQUEUE:
            delay = 0.0
        elif outcome.backoff or outcome.kind in _WAIT_AND_SEE:
            delay = self.backoff.delay(attempts_done, rng, previous_delay)
        else:
            delay = 0.0
        retry_after = getattr(error, "retry_after_ms", None)
        if isinstance(retry_after, int) and not isinstance(retry_after, bool) and retry_after > 0:
            delay = max(delay, min(retry_after / 1000, self.backoff.maximum))
        if remaining - delay < self.min_attempt_time:
            return RetryDecision(
                False,
                delay,
                f"{why}, but {remaining:.3f} s of the deadline can't fit a {delay:.3f} s"
                " backoff and another attempt",
            )
        return RetryDecision(True, delay, f"{why}, resuming")


def _describe(outcome: Outcome, error: BaseException | None) -> str:
    name = getattr(error, "name", None)
    if name and outcome.kind in (
        OutcomeKind.REJECTED,
        OutcomeKind.NODE_UNAVAILABLE,
        OutcomeKind.NODE_FAILED,
    ):
        return f"{outcome.kind.value} ({name})"
    if error is not None and outcome.kind is not OutcomeKind.SUCCESS:
        return f"{outcome.kind.value} ({type(error).__name__})"
    return outcome.kind.value
