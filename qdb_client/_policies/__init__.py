"""Pure resilience policies: no trio, time enters as ``now``, randomness injected."""

from .backoff import Backoff, Jitter
from .breaker import SILENCE_CAUSES, BreakerSettings, BreakerState, CircuitBreaker
from .budget import RetryBudget, RetryBudgetSettings
from .latency import AttemptTimeouts, LatencyTracker
from .outcome import (
    TABLE,
    BreakerVerdict,
    LatencyVerdict,
    Outcome,
    OutcomeKind,
    RetryRule,
    classify,
    outcome_table_markdown,
)
from .retry import RetryDecision, RetryPolicy

__all__ = [
    "SILENCE_CAUSES",
    "TABLE",
    "AttemptTimeouts",
    "Backoff",
    "BreakerSettings",
    "BreakerState",
    "BreakerVerdict",
    "CircuitBreaker",
    "Jitter",
    "LatencyTracker",
    "LatencyVerdict",
    "Outcome",
    "OutcomeKind",
    "RetryBudget",
    "RetryBudgetSettings",
    "RetryDecision",
    "RetryPolicy",
    "RetryRule",
    "classify",
    "outcome_table_markdown",
]
