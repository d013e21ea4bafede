"""Latency histograms per method and node, kept on the request path itself.

Cheap enough to be always on (one bisect and two increments per reply), so
``Client.statistics()`` and the exporters always have them, listeners or
not. Buckets are upper bounds in seconds, Prometheus style (cumulative when
exported); the last bucket is +Inf.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

__all__ = ["BUCKETS", "Histogram", "LatencyHistograms"]

#: Upper bounds of the latency buckets, seconds (0.5 ms .. 10 s, then +Inf).
BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    math.inf,
)


class Histogram:
    """Counts of observations per bucket, their count and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """Observations in all."""
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding quantile ``q`` (None when empty)."""
        total = self.count
        if not total:
            return None
        rank = q * total
        running = 0
        for bound, n in zip(BUCKETS, self.counts, strict=True):
            running += n
            if running >= rank:
                return bound
        return math.inf

    def snapshot(self) -> dict[str, Any]:
        """Buckets (upper bound -> count in it), count, sum, p50/p99 estimates."""
        return {
            "buckets": {str(b): n for b, n in zip(BUCKETS, self.counts, strict=True)},
            "count": self.count,
            "sum": self.sum,
            "p50": self.quantile(0.5),
            "p99": self.quantile(0.99),
        }


class LatencyHistograms:
    """Reply times of successful attempts, per (method, node)."""

    def __init__(self) -> None:
        self._histograms: dict[tuple[str, str], Histogram] = {}

    def observe(self, method: str, node: str, seconds: float) -> None:
        """One successful attempt of ``method`` on ``node`` took ``seconds``."""
        key = (method, node)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = Histogram()
        histogram.observe(seconds)

    def items(self) -> list[tuple[tuple[str, str], Histogram]]:
        """((method, node), histogram) pairs."""
        return list(self._histograms.items())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{method: {node: histogram snapshot}}``."""
        out: dict[str, dict[str, Any]] = {}
        for (method, node), histogram in sorted(self._histograms.items()):
            out.setdefault(method, {})[node] = histogram.snapshot()
        return out
