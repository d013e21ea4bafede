"""Prometheus exporter: a custom collector over ``client.statistics()``.

Optional (``pip install 'qdb_client[prometheus]'``, which brings
``prometheus_client``); nothing else in the driver needs it::

    import prometheus_client
    import qdb_client.prometheus

    async with qdb_client.open_client(hosts) as client:
        qdb_client.prometheus.register(client)        # the default registry
        prometheus_client.start_http_server(9108)     # scrapes run in its thread

Every scrape reads one ``client.statistics()`` snapshot, taken in the
client's trio thread (``trio.from_thread``; directly when the scrape runs in
that thread already), so the request path pays nothing for the exporter.
The metrics, their types and labels are :data:`METRICS` (docs/observability.md
has the table); the alert rules of ``monitoring/qdb_alerts.yml`` use only
those names, which ``tests/unit/test_alert_rules.py`` checks.

This module imports without ``prometheus_client`` (:data:`METRICS` and
:func:`exported_names` need nothing); :func:`register` and
:class:`QdbCollector` raise an ImportError naming the extra when it is
missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import trio

__all__ = ["METRICS", "MetricSpec", "QdbCollector", "exported_names", "register"]


@attrs.frozen
class MetricSpec:
    """One exported metric: ``kind`` is counter, gauge or histogram; a
    counter's samples are named ``<name>_total``."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()


#: Every metric the collector exports.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "qdb_requests", "counter", "Calls made (execute, query, batch), however they ended."
    ),
    MetricSpec("qdb_request_attempts", "counter", "Attempts of all calls, retries included."),
    MetricSpec("qdb_request_failures", "counter", "Calls that raised an error."),
    MetricSpec(
        "qdb_request_timeouts",
        "counter",
        "Timeouts: kind=deadline, calls that ended at their deadline (RequestTimeout or"
        " OutcomeUnknown); kind=attempt, attempts with no reply within their attempt timeout.",
        ("kind",),
    ),
    MetricSpec("qdb_outcome_unknown", "counter", "Unkeyed writes whose outcome was lost."),
    MetricSpec("qdb_retries", "counter", "Retries (attempts after the first of a call)."),
    MetricSpec("qdb_retry_budget_exhausted", "counter", "Retries refused by the retry budget."),
    MetricSpec("qdb_circuit_rejections", "counter", "Calls refused because breakers were open."),
    MetricSpec("qdb_bulkhead_rejections", "counter", "Calls refused by max_concurrent_requests."),
    MetricSpec(
        "qdb_idempotency_hits", "counter", "Keyed writes a node answered from its stored outcome."
    ),
    MetricSpec("qdb_hedges", "counter", "Hedges sent: second copies of slow reads."),
    MetricSpec("qdb_hedge_wins", "counter", "Hedged reads that a hedge answered first."),
    MetricSpec("qdb_sagas", "counter", "Sagas that ended, by final status.", ("status",)),
    MetricSpec("qdb_saga_compensations", "counter", "Saga steps compensated."),
    MetricSpec(
        "qdb_saga_compensation_retries", "counter", "Failed saga compensations that were retried."
    ),
    MetricSpec("qdb_requests_in_progress", "gauge", "Calls in progress."),
    MetricSpec("qdb_node_up", "gauge", "1 if the node is UP, 0 if SUSPECT or DOWN.", ("node",)),
    MetricSpec("qdb_node_requests", "counter", "Attempts sent to the node.", ("node",)),
    MetricSpec("qdb_node_in_flight", "gauge", "Requests in flight on the node.", ("node",)),
    MetricSpec("qdb_node_connections", "gauge", "Open connections to the node.", ("node",)),
    MetricSpec("qdb_breaker_open", "gauge", "1 while the node's breaker is OPEN.", ("node",)),
    MetricSpec("qdb_breaker_opens", "counter", "Times the node's breaker opened.", ("node",)),
    MetricSpec(
        "qdb_request_duration_seconds",
        "histogram",
        "Reply time of successful attempts, seconds.",
        ("method", "node"),
    ),
)

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}

#: Sample name of each top-level counter, and its key in ``statistics()``.
_TOTALS = (
    ("qdb_requests", "calls"),
    ("qdb_request_attempts", "attempts"),
    ("qdb_request_failures", "failures"),
    ("qdb_outcome_unknown", "outcome_unknown"),
    ("qdb_retries", "retries"),
    ("qdb_retry_budget_exhausted", "retry_budget_exhausted"),
    ("qdb_circuit_rejections", "circuit_rejections"),
    ("qdb_bulkhead_rejections", "bulkhead_rejections"),
    ("qdb_idempotency_hits", "idempotent_replays"),
    ("qdb_hedges", "hedges"),
    ("qdb_hedge_wins", "hedge_wins"),
)


def exported_names() -> frozenset[str]:
    """Every sample name the collector can export (``qdb_requests_total``,
    ``qdb_request_duration_seconds_bucket``...)."""
    return frozenset(spec.name + suffix for spec in METRICS for suffix in _SUFFIXES[spec.kind])


def _client_library() -> Any:
    try:
        import prometheus_client.core as core
    except ImportError as exc:
        raise ImportError(
            "qdb_client.prometheus needs prometheus_client: install the extra with"
            " pip install 'qdb_client[prometheus]'"
        ) from exc
    return core


class QdbCollector:
    """A ``prometheus_client`` collector of one client's metrics.

    ``labels`` are constant labels added to every sample (e.g.
    ``{"client": "orders"}``); with labels, several clients' collectors may
    share a registry (the collector then describes no names up front).
    Create it inside the client's trio run: scrapes from other threads go
    through that run's token.
    """

    def __init__(self, client: Any, *, labels: Mapping[str, str] | None = None) -> None:
        self._core = _client_library()
        self._client = client
        self._labels = dict(labels or {})
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            raise RuntimeError(
                "create the Prometheus collector inside the client's trio run"
            ) from None

    def describe(self) -> list[Any]:
        """The metric families (without samples), so a registry can refuse duplicates."""
        if self._labels:
            return []
        return [self._family(spec) for spec in METRICS]

    def collect(self) -> Iterator[Any]:
        """The families of one statistics snapshot (nothing once the trio run ended)."""
        stats = self._statistics()
        if stats is None:
            return
        families = {spec.name: self._family(spec) for spec in METRICS}
        self._fill(families, stats)
        yield from families.values()

    # ------------------------------------------------------------ internals

    def _statistics(self) -> dict[str, Any] | None:
        try:
            here = trio.lowlevel.current_trio_token()
        except RuntimeError:
            here = None
        if here is self._token:
            return self._client.statistics()
        try:
            return trio.from_thread.run_sync(self._client.statistics, trio_token=self._token)
        except trio.RunFinishedError:
            return None

    def _family(self, spec: MetricSpec) -> Any:
        core = self._core
        names = [*self._labels, *spec.labels]
        cls = {
            "counter": core.CounterMetricFamily,
            "gauge": core.GaugeMetricFamily,
            "histogram": core.HistogramMetricFamily,
        }[spec.kind]
        return cls(spec.name, spec.help, labels=names)

    def _fill(self, families: dict[str, Any], stats: dict[str, Any]) -> None:
        const = list(self._labels.values())
        for name, key in _TOTALS:
            families[name].add_metric(const, stats.get(key, 0))
        timeouts = families["qdb_request_timeouts"]
        timeouts.add_metric([*const, "deadline"], stats.get("call_timeouts", 0))
        timeouts.add_metric([*const, "attempt"], stats.get("attempt_timeouts", 0))
        families["qdb_requests_in_progress"].add_metric(const, stats.get("in_progress", 0))
        reliability = stats.get("reliability", {})
        ended = {
            "compensated": reliability.get("sagas_compensated", {}).get("total", 0),
            "failed": reliability.get("sagas_failed", {}).get("total", 0),
        }
        ended["completed"] = reliability.get("sagas", {}).get("total", 0) - sum(ended.values())
        for status, count in ended.items():
            families["qdb_sagas"].add_metric([*const, status], count)
        for name, key in (
            ("qdb_saga_compensations", "saga_compensations"),
            ("qdb_saga_compensation_retries", "saga_compensation_retries"),
        ):
            families[name].add_metric(const, reliability.get(key, {}).get("total", 0))
        for node in stats.get("nodes", ()):
            labels = [*const, node["address"]]
            breaker = node["breaker"]
            families["qdb_node_up"].add_metric(labels, 1 if node["state"] == "UP" else 0)
            families["qdb_node_requests"].add_metric(labels, node["requests_sent"])
            families["qdb_node_in_flight"].add_metric(labels, node["in_flight"])
            families["qdb_node_connections"].add_metric(labels, node["connections"]["open"])
            is_open = breaker["current_state"] == "OPEN"
            families["qdb_breaker_open"].add_metric(labels, 1 if is_open else 0)
            families["qdb_breaker_opens"].add_metric(labels, breaker.get("opens", 0))
        durations = families["qdb_request_duration_seconds"]
        for method, per_node in stats.get("latency", {}).items():
            for node, histogram in per_node.items():
                durations.add_metric(
                    [*const, method, node],
                    buckets=_cumulative(histogram["buckets"]),
                    sum_value=histogram["sum"],
                )


def _cumulative(buckets: Mapping[str, int]) -> list[tuple[str, float]]:
    """Per-bucket counts (upper bound -> count) as Prometheus' cumulative ``le`` buckets."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in buckets.items():
        running += count
        value = float(bound)
        out.append(("+Inf" if math.isinf(value) else repr(value), running))
    return out


def register(
    client: Any, registry: Any = None, *, labels: Mapping[str, str] | None = None
) -> QdbCollector:
    """Export ``client``'s metrics through ``registry`` (default: prometheus_client's
    global ``REGISTRY``); returns the collector (``registry.unregister(it)`` stops it).
    Call it inside the client's trio run."""
    collector = QdbCollector(client, labels=labels)
    if registry is None:
        registry = collector._core.REGISTRY
    registry.register(collector)
    return collector
