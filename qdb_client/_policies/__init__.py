"""Pure resilience policies: no trio, time enters as ``now``, randomness injected."""

from .backoff import Backoff, Jitter
from .breaker import BreakerSettings, BreakerState, CircuitBreaker
from .budget import RetryBudget, RetryBudgetSettings
from .retry import RetryDecision, RetryPolicy, request_reached_node

__all__ = [
    "Backoff",
    "BreakerSettings",
    "BreakerState",
    "CircuitBreaker",
    "Jitter",
    "RetryBudget",
    "RetryBudgetSettings",
    "RetryDecision",
    "RetryPolicy",
    "request_reached_node",
]
