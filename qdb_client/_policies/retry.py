"""Which failures are retried, when, and why not. Pure.

A failed attempt is retried when all of these hold:

1. the error is of a retryable kind: a transport failure, a pool failure,
   or a server error whose ``retryable`` flag is set
   (classes 408, 429, 500, 502, 503, 504 of the reliability catalogue);
2. repeating it is safe: the request never reached a node, or it is
   idempotent (a read, or a write carrying an idempotency key);
3. retries remain (``max_retries``), and the retry budget has room;
4. the next attempt fits the deadline: after the backoff delay at least
   ``min_attempt_time`` of the budget must be left.

The backoff delay honours a server's ``retry_after_ms`` when longer.
"""

from __future__ import annotations

import random

import attrs

from ..errors import (
    CircuitOpen,
    MessageError,
    NoAvailableNode,
    PoolError,
    QdbError,
    ServerError,
    TransportError,
)
from .backoff import Backoff

__all__ = ["RetryDecision", "RetryPolicy", "request_reached_node"]


def request_reached_node(error: BaseException) -> bool:
    """Whether the failed request may have been seen (and applied) by a node."""
    if isinstance(error, ServerError):
        # The node answered; it decides what it applied (a retryable error
        # from a node means it did not commit, see docs/protocol.md).
        return True
    if isinstance(error, (PoolError, NoAvailableNode)):
        return False
    if isinstance(error, TransportError):
        return error.request_sent
    return True


@attrs.frozen
class RetryDecision:
    """Outcome of one retry decision: retry after ``delay``, or stop because ``reason``."""

    retry: bool
    delay: float
    reason: str


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

    def classify(self, error: BaseException, *, idempotent: bool) -> tuple[bool, str]:
        """(retryable, why) for one failed attempt, ignoring limits."""
        if isinstance(error, ServerError):
            if not error.retryable:
                return False, f"{error.name} ({error.code}) is not retryable"
            if error.name == "TIMEOUT" and not idempotent and error.details.get("executed"):
                return False, "the node timed out after executing a write without a key"
            return True, f"{error.name} ({error.code}) is retryable"
        if isinstance(error, CircuitOpen):
            # Failing fast is the point: retrying would only wait out the breaker.
            return False, "every usable node's circuit breaker is open"
        if isinstance(error, NoAvailableNode):
            # Selection already waited node_selection_timeout for a node.
            return False, "no node became usable within the selection timeout"
        if isinstance(error, PoolError):
            return True, f"{type(error).__name__}: no node saw the request"
        if isinstance(error, TransportError):
            if not error.request_sent:
                return True, f"{type(error).__name__} before the request was sent"
            if idempotent:
                return True, f"{type(error).__name__} after sending an idempotent request"
            return False, f"{type(error).__name__} after sending a write without an idempotency key"
        if isinstance(error, MessageError):
            if idempotent:
                return True, "reply was corrupted; the request is idempotent"
            return False, "reply was corrupted; a write without a key can't be repeated"
        if isinstance(error, QdbError):
            return False, f"{type(error).__name__} is not retryable"
        return False, f"unexpected {type(error).__name__}"

    def decide(
        self,
        retries_done: int,
        error: BaseException,
        *,
        idempotent: bool,
        remaining: float,
        rng: random.Random,
        previous_delay: float | None = None,
    ) -> RetryDecision:
        """Retry after a delay, or give up, for the failure of attempt ``retries_done + 1``."""
        retryable, why = self.classify(error, idempotent=idempotent)
        if not retryable:
            return RetryDecision(False, 0.0, why)
        if retries_done >= self.max_retries:
            return RetryDecision(False, 0.0, f"{why}, but all {self.max_retries} retries are used")
        delay = self.backoff.delay(retries_done, rng, previous_delay)
        retry_after = getattr(error, "retry_after_ms", None)
        if retry_after:
            delay = max(delay, retry_after / 1000)
        if remaining - delay < self.min_attempt_time:
            return RetryDecision(
                False,
                delay,
                f"{why}, but {remaining:.3f} s of the deadline can't fit a {delay:.3f} s backoff"
                " and another attempt",
            )
        return RetryDecision(True, delay, why)
