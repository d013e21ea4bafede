"""The optional exporters: Prometheus (``qdb_client[prometheus]``) and OpenTelemetry
(``qdb_client[otel]``), against scripted nodes.

Each part skips, saying why, when its package is not installed; the tests
that prove the clear ImportError run always.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client import prometheus as qdb_prometheus
from qdb_client.protocol import ErrorCode, Request

from .fake_network import FakeNetwork, echo, never_answer
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


async def read(client: qdb_client.Client, budget: float | None = None) -> object:
    return await client._call("query", {}, budget, read_only=True)


def fail_first_then_echo() -> Any:
    calls = 0

    async def handler(node: FakeNode, request: Request) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await node.fail(request, ErrorCode.UNAVAILABLE, "busy")
        else:
            await echo(node, request)

    return handler


# --------------------------------------------------------------- prometheus


def _prometheus() -> Any:
    return pytest.importorskip(
        "prometheus_client", reason="prometheus_client is not installed (qdb_client[prometheus])"
    )


async def test_prometheus_exports_the_clients_counters_gauges_and_histograms(
    network: FakeNetwork, autojump_clock
):
    prometheus_client = _prometheus()
    network.handlers["a:1"] = fail_first_then_echo()
    registry = prometheus_client.CollectorRegistry()
    async with qdb_client.open_client("a:1", **EXACT) as client:
        qdb_prometheus.register(client, registry)
        await read(client)
        await read(client)
        value = registry.get_sample_value
        assert value("qdb_requests_total") == 2
        assert value("qdb_request_attempts_total") == 3
        assert value("qdb_retries_total") == 1
        assert value("qdb_request_timeouts_total", {"kind": "deadline"}) == 0
        assert value("qdb_request_timeouts_total", {"kind": "attempt"}) == 0
        assert value("qdb_bulkhead_rejections_total") == 0
        assert value("qdb_idempotency_hits_total") == 0
        assert value("qdb_sagas_total", {"status": "compensated"}) == 0
        assert value("qdb_node_up", {"node": "a:1"}) == 1
        assert value("qdb_node_requests_total", {"node": "a:1"}) == 3
        assert value("qdb_breaker_open", {"node": "a:1"}) == 0
        assert value("qdb_breaker_opens_total", {"node": "a:1"}) == 0
        labels = {"method": "query", "node": "a:1"}
        assert value("qdb_request_duration_seconds_count", labels) == 2
        assert value("qdb_request_duration_seconds_bucket", {**labels, "le": "+Inf"}) == 2
        assert value("qdb_request_duration_seconds_sum", labels) == 0.0
        families = list(registry.collect())
        text = prometheus_client.generate_latest(registry).decode()
    exported = {s.name for f in families for s in f.samples}
    assert exported == qdb_prometheus.exported_names()  # the spec is what is exported
    assert "# TYPE qdb_request_duration_seconds histogram" in text
    buckets = [
        s.value
        for f in families
        for s in f.samples
        if s.name == "qdb_request_duration_seconds_bucket"
    ]
    assert buckets == sorted(buckets) and len(buckets) == 15  # cumulative, 0.5 ms .. +Inf


async def test_prometheus_shows_an_open_breaker_and_a_timed_out_call(
    network: FakeNetwork, autojump_clock
):
    prometheus_client = _prometheus()

    async def overloaded(node: FakeNode, request: Request) -> None:
        await node.fail(request, ErrorCode.OVERLOADED, "shedding")

    # Silence first, while the other node still admits (silence never ejects
    # the last node left), then overload.
    network.handlers["a:1"] = never_answer
    network.handlers["b:2"] = overloaded
    registry = prometheus_client.CollectorRegistry()
    options = dict(EXACT, max_retries=0, breaker_failure_threshold=1, attempt_timeout_factor=0)
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        qdb_prometheus.register(client, registry)
        for _ in range(2):
            with pytest.raises(qdb_client.QdbError):
                await read(client, budget=1.0)
        value = registry.get_sample_value
        # a:1 kept silent past the deadline, slower than usual: a failure.
        assert value("qdb_breaker_open", {"node": "a:1"}) == 1
        assert value("qdb_breaker_opens_total", {"node": "a:1"}) == 1
        assert value("qdb_breaker_open", {"node": "b:2"}) == 1
        assert value("qdb_request_timeouts_total", {"kind": "deadline"}) == 1
        assert value("qdb_request_failures_total") == 2


async def test_a_scrape_from_another_thread_reads_the_statistics_in_the_trio_thread(
    network: FakeNetwork,
):
    prometheus_client = _prometheus()
    network.handlers["a:1"] = echo
    registry = prometheus_client.CollectorRegistry()
    async with qdb_client.open_client("a:1", **EXACT) as client:
        qdb_prometheus.register(client, registry)
        await read(client)
        text = await trio.to_thread.run_sync(prometheus_client.generate_latest, registry)
    assert b"qdb_requests_total 1.0" in text


def test_a_collector_whose_trio_run_ended_exports_nothing():
    _prometheus()

    class Client:
        def statistics(self) -> dict[str, Any]:
            return {"calls": 1}

    async def main() -> qdb_prometheus.QdbCollector:
        collector = qdb_prometheus.QdbCollector(Client())
        assert next(f.name for f in collector.collect()) == "qdb_requests"
        return collector

    collector = trio.run(main)
    assert list(collector.collect()) == []
    with pytest.raises(RuntimeError, match="inside the client's trio run"):
        qdb_prometheus.QdbCollector(Client())


async def test_one_registry_takes_one_unlabelled_collector_or_several_labelled_ones(
    network: FakeNetwork, autojump_clock
):
    prometheus_client = _prometheus()
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        registry = prometheus_client.CollectorRegistry()
        qdb_prometheus.register(client, registry)
        with pytest.raises(ValueError, match="Duplicated"):
            qdb_prometheus.register(client, registry)
        shared = prometheus_client.CollectorRegistry()
        qdb_prometheus.register(client, shared, labels={"client": "one"})
        qdb_prometheus.register(client, shared, labels={"client": "two"})
        assert shared.get_sample_value("qdb_requests_total", {"client": "two"}) == 0


async def test_prometheus_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.setitem(sys.modules, "prometheus_client.core", None)
    assert "qdb_requests_total" in qdb_prometheus.exported_names()  # needs nothing
    with pytest.raises(ImportError, match=r"qdb_client\[prometheus\]"):
        qdb_prometheus.register(object())


# ------------------------------------------------------------ opentelemetry


class Telemetry:
    """An SDK tracer and meter provider whose output stays in memory."""

    def __init__(self) -> None:
        pytest.importorskip(
            "opentelemetry.sdk", reason="opentelemetry-sdk is not installed (qdb_client[otel])"
        )
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[Any]:
        return list(self.exporter.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    def instrument(self, client: qdb_client.Client, **options: Any) -> Any:
        import qdb_client.otel

        return qdb_client.otel.instrument(
            client,
            tracer_provider=self.tracer_provider,
            meter_provider=self.meter_provider,
            **options,
        )


async def test_every_attempt_is_a_client_span_with_the_database_conventions(
    network: FakeNetwork, autojump_clock
):
    telemetry = Telemetry()
    from opentelemetry.trace import SpanKind, StatusCode

    network.handlers["a:1"] = fail_first_then_echo()
    async with qdb_client.open_client("a:1", **EXACT) as client:
        telemetry.instrument(client)
        tracer = telemetry.tracer_provider.get_tracer("test")
        with tracer.start_as_current_span("checkout") as parent:
            await read(client)
    *attempts, outer = telemetry.spans()
    assert outer.name == "checkout"
    failed, ok = attempts
    for span in attempts:
        assert span.name == "query" and span.kind is SpanKind.CLIENT
        assert span.parent.span_id == parent.get_span_context().span_id
        assert span.attributes["db.system"] == "qdb"
        assert span.attributes["db.operation.name"] == "query"
        assert (span.attributes["server.address"], span.attributes["server.port"]) == ("a", 1)
        assert "db.query.text" not in span.attributes
    assert [failed.attributes["qdb.attempt"], ok.attributes["qdb.attempt"]] == [1, 2]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "Unavailable"
    assert failed.attributes["qdb.outcome"] == "node unavailable"
    assert failed.attributes["qdb.retried"] is True
    assert ok.status.status_code is StatusCode.UNSET
    assert ok.start_time >= failed.end_time
    durations = telemetry.points("db.client.operation.duration")
    assert sorted(p.count for p in durations) == [1, 1]
    assert {p.attributes.get("error.type") for p in durations} == {None, "Unavailable"}
    assert [p.value for p in telemetry.points("qdb.client.retries")] == [1]


async def test_statements_are_recorded_only_when_asked_and_given(
    network: FakeNetwork, autojump_clock
):
    telemetry = Telemetry()
    import qdb_client.otel

    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        instrumentation = telemetry.instrument(client, record_statement=True)
        with qdb_client.otel.statement("SELECT 1"):
            await read(client)
        await read(client)  # no statement given
        instrumentation.uninstrument()
        await read(client)  # not traced any more
        assert instrumentation not in client.events.listeners
    first, second = telemetry.spans()
    assert first.attributes["db.query.text"] == "SELECT 1"
    assert "db.query.text" not in second.attributes


async def test_an_attempt_its_caller_cancelled_ends_as_cancelled(
    network: FakeNetwork, autojump_clock
):
    telemetry = Telemetry()
    quiet = True

    async def answer_later(node: FakeNode, request: Request) -> None:
        if not quiet:
            await echo(node, request)

    network.handlers["a:1"] = answer_later
    async with qdb_client.open_client("a:1", **EXACT) as client:
        telemetry.instrument(client)
        with trio.move_on_after(0.5):
            await read(client)
        assert telemetry.spans() == []  # no failure event for a caller's own cancel
        quiet = False
        await read(client)  # the same task's next attempt ends the stale span
    cancelled, ok = telemetry.spans()
    assert cancelled.attributes["qdb.outcome"] == "cancelled"
    assert "qdb.outcome" not in ok.attributes


async def test_a_failure_before_any_node_is_a_span_of_no_duration(
    network: FakeNetwork, autojump_clock
):
    telemetry = Telemetry()

    async def overloaded(node: FakeNode, request: Request) -> None:
        await node.fail(request, ErrorCode.OVERLOADED, "shedding")

    network.handlers["a:1"] = overloaded
    options = dict(EXACT, max_retries=0, breaker_failure_threshold=1)
    async with qdb_client.open_client("a:1", **options) as client:
        telemetry.instrument(client)
        for _ in range(2):
            with pytest.raises(qdb_client.QdbError):
                await read(client)
    sent, refused = telemetry.spans()
    assert sent.attributes["error.type"] == "Overloaded"
    assert refused.attributes["error.type"] == "CircuitOpen"
    assert refused.end_time - refused.start_time < 10_000_000  # ns: no wait
    transitions = telemetry.points("qdb.client.breaker.transitions")
    assert [(p.attributes["qdb.breaker.state"], p.value) for p in transitions] == [("OPEN", 1)]


async def test_otel_without_its_package_names_the_extra(monkeypatch):
    import qdb_client.otel

    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ImportError, match=r"qdb_client\[otel\]"):
        qdb_client.otel.instrument(object())


def test_docs_list_every_exported_metric():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    for spec in qdb_prometheus.METRICS:
        name = spec.name + ("_total" if spec.kind == "counter" else "")
        assert f"| `{name}` | {spec.kind} |" in text, f"docs/observability.md misses {name}"


async def test_the_span_of_a_cancelled_attempt_ends_when_its_task_is_gone(
    network: FakeNetwork, autojump_clock
):
    import gc

    telemetry = Telemetry()
    network.handlers["a:1"] = never_answer

    async def give_up(client: qdb_client.Client) -> None:
        with trio.move_on_after(0.5):
            await read(client)

    async with qdb_client.open_client("a:1", **EXACT) as client:
        telemetry.instrument(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(give_up, client)
        gc.collect()
        (span,) = telemetry.spans()
    assert span.attributes["qdb.outcome"] == "cancelled"
