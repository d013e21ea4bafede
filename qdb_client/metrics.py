"""The reliability summary: seed 003's metrics, with rates over a sliding window.

``client.statistics()["reliability"]`` is the summary a dashboard or an
alert reads (docs/observability.md)::

    {
        "window": 60.0,                 # seconds the rates look back
        "calls":      {"total": 1200, "in_window": 600, "rate": 10.0},
        "timeouts":   {"total": 3, "in_window": 1, "rate": 0.0167},
        ...                             # one entry per name of COUNTERS
        "ratios": {"timeout_rate": 0.0017, "retry_rate": 0.02,
                   "saga_compensation_rate": None},
        "latency": {...},               # the histograms of statistics()["latency"]
    }

``total`` counts since the client started; ``in_window`` what was observed
in the last ``window`` seconds; ``rate`` is ``in_window`` per second (over
the time the client has run, while that is shorter than the window). The
ratios are those of seed 003's alert rules: call timeouts per call, retries
per call, sagas that needed compensation per saga ended (None while their
denominator is 0 in the window).

The request path only bumps integer counters (``PipelineCounters``, the
breakers' ``opens``, the client's bulkhead count); nothing here runs per
request. A sampler task of the client reads those totals once a second (and
``statistics()`` once more when called) and puts the increase since the
last reading into per-second buckets (:class:`RateWindow`, pure, in trio
time): an event counts in the second it was observed, never more than one
second late.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

__all__ = [
    "COUNTERS",
    "WINDOW",
    "RateWindow",
    "ReliabilityMetrics",
    "reliability_of",
]

logger = logging.getLogger("qdb_client.metrics")

#: Seconds the rates of the summary look back.
WINDOW = 60.0

#: The counters of the summary, in order (seed 003's names, and what their
#: ratios divide by).
COUNTERS: tuple[str, ...] = (
    "calls",
    "timeouts",
    "call_timeouts",
    "attempt_timeouts",
    "retries",
    "circuit_breaker_opens",
    "bulkhead_rejections",
    "idempotency_hits",
    "sagas",
    "sagas_compensated",
    "sagas_failed",
    "saga_compensations",
    "saga_compensation_retries",
)


class RateWindow:
    """How many events happened in the last ``seconds`` seconds. Pure.

    One bucket per second of trio time (``now`` comes in as an argument),
    like the retry budget's: memory stays constant whatever the rate.
    """

    __slots__ = ("_counts", "_second", "seconds")

    def __init__(self, seconds: int = int(WINDOW)) -> None:
        if seconds < 1:
            raise ValueError(f"a rate window spans at least 1 s, not {seconds}")
        self.seconds = seconds
        self._counts = [0] * seconds
        self._second: int | None = None

    def _advance(self, now: float) -> int:
        second = math.floor(now)
        if self._second is None:
            self._second = second
        elif second > self._second:
            for tick in range(self._second + 1, min(second, self._second + self.seconds) + 1):
                self._counts[tick % self.seconds] = 0
            self._second = second
        return second % self.seconds

    def add(self, now: float, n: int = 1) -> None:
        """Count ``n`` events in the second of ``now``."""
        self._counts[self._advance(now)] += n

    def total(self, now: float) -> int:
        """Events in the window ending at ``now`` (its current second included)."""
        self._advance(now)
        return sum(self._counts)


class ReliabilityMetrics:
    """Seed 003's reliability counters of one client, and their windowed rates.

    The client owns one (``reliability_of(client)``); the saga helper feeds
    the saga counters through :meth:`record_saga_end`,
    :meth:`record_compensation` and :meth:`record_compensation_retry`.
    """

    def __init__(self, window: float = WINDOW) -> None:
        self.window = float(window)
        self._windows = {name: RateWindow(max(1, math.ceil(window))) for name in COUNTERS}
        self._last = dict.fromkeys(COUNTERS, 0)
        self._started: float | None = None
        #: Sagas that ended, by final status (completed/compensated/failed).
        self.sagas: dict[str, int] = {"completed": 0, "compensated": 0, "failed": 0}
        #: Saga steps compensated, and compensation attempts that were retried.
        self.saga_compensations = 0
        self.saga_compensation_retries = 0
        # Breaker openings already counted, per breaker (a forgotten node's
        # breaker goes away; the total must not go down with it).
        self._opens_seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._opens = 0

    # ------------------------------------------------------------- sagas

    def record_saga_end(self, status: str) -> None:
        """A saga ended with ``status`` (``completed``, ``compensated`` or ``failed``)."""
        self.sagas[status] = self.sagas.get(status, 0) + 1

    def record_compensation(self) -> None:
        """One completed saga step was compensated."""
        self.saga_compensations += 1

    def record_compensation_retry(self) -> None:
        """A failed compensation is tried again."""
        self.saga_compensation_retries += 1

    # ------------------------------------------------------------ totals

    def breaker_opens(self, breakers: Iterable[Any]) -> int:
        """Openings of all these breakers since the client started (never decreases)."""
        seen = self._opens_seen
        for breaker in breakers:
            opens = breaker.opens
            before = seen.get(breaker, 0)
            if opens != before:
                self._opens += opens - before
                seen[breaker] = opens
        return self._opens

    def totals(
        self, counters: Any, *, bulkhead_rejections: int, breakers: Iterable[Any]
    ) -> dict[str, int]:
        """Every counter of :data:`COUNTERS` now, from the client's own counters
        (``PipelineCounters``), its bulkhead count and its nodes' breakers."""
        sagas = self.sagas
        return {
            "calls": counters.calls,
            "timeouts": counters.call_timeouts + counters.attempt_timeouts,
            "call_timeouts": counters.call_timeouts,
            "attempt_timeouts": counters.attempt_timeouts,
            "retries": counters.retries,
            "circuit_breaker_opens": self.breaker_opens(breakers),
            "bulkhead_rejections": bulkhead_rejections,
            "idempotency_hits": counters.idempotent_replays,
            "sagas": sum(sagas.values()),
            "sagas_compensated": sagas.get("compensated", 0),
            "sagas_failed": sagas.get("failed", 0),
            "saga_compensations": self.saga_compensations,
            "saga_compensation_retries": self.saga_compensation_retries,
        }

    # ----------------------------------------------------------- windows

    def sample(self, now: float, totals: Mapping[str, int]) -> None:
        """Count what the totals gained since the last sample in the second of ``now``."""
        if self._started is None:
            self._started = now
        last = self._last
        for name in COUNTERS:
            value = totals[name]
            gained = value - last[name]
            if gained > 0:
                self._windows[name].add(now, gained)
            last[name] = value

    def summary(
        self, now: float, totals: Mapping[str, int], latency: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """The reliability summary at ``now`` (sampling ``totals`` first)."""
        self.sample(now, totals)
        assert self._started is not None
        span = max(1.0, min(self.window, now - self._started))
        out: dict[str, Any] = {"window": self.window}
        seen: dict[str, int] = {}
        for name in COUNTERS:
            seen[name] = in_window = self._windows[name].total(now)
            out[name] = {"total": totals[name], "in_window": in_window, "rate": in_window / span}
        compensated = seen["sagas_compensated"] + seen["sagas_failed"]
        out["ratios"] = {
            "timeout_rate": _ratio(seen["call_timeouts"], seen["calls"]),
            "retry_rate": _ratio(seen["retries"], seen["calls"]),
            "saga_compensation_rate": _ratio(compensated, seen["sagas"]),
        }
        out["latency"] = dict(latency or {})
        return out

    async def run(self, totals: Callable[[], Mapping[str, int]]) -> None:
        """Sample ``totals()`` at every whole second of trio time, forever."""
        while True:
            try:
                self.sample(trio.current_time(), totals())
            except Exception:  # a bug here must not take the client down
                logger.exception("reliability metrics: sampling failed")
            await trio.sleep_until(math.floor(trio.current_time()) + 1)


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def reliability_of(client: Any) -> ReliabilityMetrics:
    """The :class:`ReliabilityMetrics` of a :class:`~qdb_client.Client`."""
    metrics = getattr(client, "_reliability", None)
    if not isinstance(metrics, ReliabilityMetrics):
        raise TypeError(f"{client!r} keeps no reliability metrics (not a qdb_client.Client?)")
    return metrics
