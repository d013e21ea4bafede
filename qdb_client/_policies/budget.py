"""Retry budget: retries limited to a share of recent traffic. Pure.

Finagle's ``RetryBudget``: over a sliding window of ``ttl`` seconds, retries
may add at most ``ratio`` of the requests made, plus a floor of
``min_per_second * ttl`` so that a quiet client can still retry. When a
whole cluster fails, every request fails and the budget caps the extra load
at ``ratio`` instead of multiplying it by ``1 + max_retries``.

The window is kept in one-second buckets, so memory stays constant however
high the request rate.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["RetryBudget", "RetryBudgetSettings"]


@attrs.frozen(kw_only=True)
class RetryBudgetSettings:
    """Defaults from Finagle: 20% extra load, 10 retries/s floor, 10 s window."""

    ratio: float = 0.2
    min_per_second: float = 10.0
    ttl: float = 10.0


class RetryBudget:
    """Counts requests and retries in a sliding window; admits retries within budget."""

    def __init__(self, settings: RetryBudgetSettings) -> None:
        self.settings = settings
        self._buckets = max(1, math.ceil(settings.ttl))
        self._requests = [0] * self._buckets
        self._retries = [0] * self._buckets
        self._second: int | None = None
        #: Retries refused because the budget was spent.
        self.exhausted = 0

    def _advance(self, now: float) -> int:
        second = math.floor(now)
        if self._second is None:
            self._second = second
        elif second > self._second:
            for tick in range(self._second + 1, min(second, self._second + self._buckets) + 1):
                index = tick % self._buckets
                self._requests[index] = 0
                self._retries[index] = 0
            self._second = second
        return second % self._buckets

    def record_request(self, now: float) -> None:
        """A first attempt was made."""
        self._requests[self._advance(now)] += 1

    def available(self, now: float) -> float:
        """Retries the budget still allows right now."""
        self._advance(now)
        allowed = self.settings.ratio * sum(self._requests)
        allowed += self.settings.min_per_second * self.settings.ttl
        return allowed - sum(self._retries)

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it."""
        if self.available(now) >= 1:
            self._retries[self._advance(now)] += 1
            return True
        self.exhausted += 1
        return False
