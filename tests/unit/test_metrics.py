"""The reliability summary (seed 003's metrics) in ``statistics()["reliability"]``.

Pure tests of the per-second ring, then the counters of a real client
against scripted nodes in virtual time: every count, window edge and rate is
exact.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

import qdb_client
import qdb_client.saga as saga
from qdb_client import events as ev
from qdb_client.metrics import COUNTERS, RateWindow, ReliabilityMetrics, reliability_of
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


# ------------------------------------------------------------- the ring


def test_a_rate_window_counts_the_last_n_seconds_exactly():
    window = RateWindow(60)
    window.add(10.2)
    window.add(10.9, 2)
    window.add(30.0)
    assert window.total(30.5) == 4
    assert window.total(69.99) == 4  # second 10 is still one of the last 60 (10..69)
    assert window.total(70.0) == 1  # it is not any more; second 30 is
    assert window.total(89.0) == 1
    assert window.total(90.0) == 0


def test_a_gap_longer_than_the_window_clears_every_bucket():
    window = RateWindow(5)
    for second in range(5):
        window.add(second + 0.5, 10)
    assert window.total(4.5) == 50
    assert window.total(1000.0) == 0
    window.add(1000.1)
    assert window.total(1000.2) == 1
    with pytest.raises(ValueError):
        RateWindow(0)


def test_breaker_opens_never_go_down_when_a_node_is_forgotten():
    class Breaker:
        def __init__(self, opens: int) -> None:
            self.opens = opens

    metrics = ReliabilityMetrics()
    a, b = Breaker(2), Breaker(1)
    assert metrics.breaker_opens([a, b]) == 3
    b.opens = 4
    assert metrics.breaker_opens([a, b]) == 6
    assert metrics.breaker_opens([a]) == 6  # b's node was forgotten: its openings stay counted
    a.opens = 3
    assert metrics.breaker_opens([a]) == 7


def test_the_summary_has_every_seed_003_name_with_total_window_and_rate():
    metrics = ReliabilityMetrics()
    totals = dict.fromkeys(COUNTERS, 0)
    metrics.sample(0.0, totals)
    totals.update(calls=100, call_timeouts=5, timeouts=7, retries=20, saga_compensations=3)
    totals.update(sagas=10, sagas_compensated=1)
    summary = metrics.summary(10.0, totals)
    for name in (
        "timeouts",
        "retries",
        "circuit_breaker_opens",
        "bulkhead_rejections",
        "idempotency_hits",
        "saga_compensations",
    ):
        assert set(summary[name]) == {"total", "in_window", "rate"}
    assert summary["timeouts"] == {"total": 7, "in_window": 7, "rate": 0.7}
    assert summary["ratios"] == {
        "timeout_rate": 0.05,
        "retry_rate": 0.2,
        "saga_compensation_rate": 0.1,
    }
    idle = metrics.summary(100.0, totals)
    assert idle["calls"] == {"total": 100, "in_window": 0, "rate": 0.0}
    assert idle["ratios"] == dict.fromkeys(summary["ratios"])  # nothing to divide by


# -------------------------------------------------------- a real client


async def test_deadlines_count_as_call_timeouts_and_silence_as_attempt_timeouts(
    network: FakeNetwork, autojump_clock
):
    silent = False

    async def echo_until_silent(node: FakeNode, request: Request) -> None:
        if not silent:
            await echo(node, request)

    network.handlers["a:1"] = never_answer
    network.handlers["b:2"] = echo_until_silent
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        for _ in range(4):  # those sent to a:1 wait out an attempt timeout, then go to b:2
            await read(client)
        assert client.statistics()["attempt_timeouts"] >= 1
        silent = True
        with pytest.raises(qdb_client.RequestTimeout):
            await read(client, budget=1.0)
        with pytest.raises(qdb_client.OutcomeUnknown):  # an unkeyed write past its deadline
            await client._call("execute", {"sql": "x"}, 1.0)
        stats = client.statistics()
    assert stats["call_timeouts"] == 2
    summary = stats["reliability"]
    assert summary["call_timeouts"]["total"] == 2
    assert summary["attempt_timeouts"]["total"] == stats["attempt_timeouts"] >= 2
    assert summary["timeouts"]["total"] == 2 + stats["attempt_timeouts"]
    assert summary["ratios"]["timeout_rate"] == pytest.approx(2 / 6)


async def test_retries_breaker_opens_and_bulkhead_rejections_are_counted(
    network: FakeNetwork, autojump_clock
):
    calls = 0

    async def fail_first(node: FakeNode, request: Request) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await node.fail(request, ErrorCode.UNAVAILABLE, "busy")
        elif calls == 2:
            await echo(node, request)
        elif calls == 3:
            await trio.sleep(2.0)
            await echo(node, request)
        else:
            await node.fail(request, ErrorCode.OVERLOADED, "shedding")

    network.handlers["a:1"] = fail_first
    options = dict(EXACT, breaker_failure_threshold=2, max_concurrent_requests=1, max_retries=1)
    async with qdb_client.open_client("a:1", **options) as client:
        await read(client)  # one retry
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, client)  # holds the only slot for 2 s
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(qdb_client.BulkheadFull):
                await read(client)
        with pytest.raises(qdb_client.RetryExhausted):  # two OVERLOADED: the breaker opens
            await read(client)
        stats = client.statistics()
    summary = stats["reliability"]
    assert stats["nodes"][0]["breaker"]["opens"] == 1
    assert summary["circuit_breaker_opens"]["total"] == 1
    assert summary["bulkhead_rejections"]["total"] == stats["bulkhead_rejections"] == 1
    assert summary["retries"]["total"] == stats["retries"]
    assert summary["calls"]["total"] == stats["calls"]


async def test_idempotency_hits_come_from_the_pipelines_replay_counter(
    network: FakeNetwork, autojump_clock
):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        assert client.statistics()["idempotent_replays"] == 0
        assert client.statistics()["reliability"]["idempotency_hits"]["total"] == 0
        client._pipeline.counters.idempotent_replays += 2  # what an IdempotentReplay bumps
        assert client.statistics()["reliability"]["idempotency_hits"]["total"] == 2


async def test_rates_cover_the_last_60_seconds_of_trio_time(network: FakeNetwork, autojump_clock):
    calls = 0

    async def fail_once(node: FakeNode, request: Request) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await node.fail(request, ErrorCode.UNAVAILABLE, "busy")
        else:
            await echo(node, request)

    network.handlers["a:1"] = fail_once
    async with qdb_client.open_client("a:1", **EXACT) as client:
        start = trio.current_time()
        await read(client)  # the retry happens in the first second; the sampler sees it at +1 s
        await trio.sleep_until(start + 30.0)
        summary = client.statistics()["reliability"]
        assert summary["window"] == 60.0
        assert summary["retries"] == {"total": 1, "in_window": 1, "rate": pytest.approx(1 / 30)}
        assert summary["calls"]["in_window"] == 1
        assert summary["ratios"]["retry_rate"] == 1.0
        await trio.sleep_until(start + 60.5)
        assert client.statistics()["reliability"]["retries"]["in_window"] == 1
        await trio.sleep_until(start + 61.0)
        summary = client.statistics()["reliability"]
        assert summary["retries"] == {"total": 1, "in_window": 0, "rate": 0.0}
        assert summary["ratios"]["retry_rate"] is None


async def test_the_request_path_does_no_metrics_work(
    network: FakeNetwork, autojump_clock, monkeypatch
):
    samples = 0
    original = ReliabilityMetrics.sample

    def counting(self: ReliabilityMetrics, now: float, totals) -> None:
        nonlocal samples
        samples += 1
        original(self, now, totals)

    monkeypatch.setattr(ReliabilityMetrics, "sample", counting)
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        before = samples
        for _ in range(500):  # in no virtual time: only the counters move
            await read(client)
        assert samples == before
        assert client.statistics()["reliability"]["calls"]["total"] == 500
        assert samples == before + 1


async def test_the_summary_carries_the_latency_histograms(network: FakeNetwork, autojump_clock):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        await read(client)
        stats = client.statistics()
    assert stats["reliability"]["latency"] == stats["latency"]
    assert stats["latency"]["query"]["a:1"]["count"] == 1


def test_reliability_of_refuses_what_is_not_a_client():
    with pytest.raises(TypeError, match="reliability"):
        reliability_of(object())


# ------------------------------------------------------------------ the docs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"


async def test_docs_name_every_statistics_key(network: FakeNetwork, autojump_clock):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        await read(client)
        stats = client.statistics()
    node = stats["nodes"][0]
    keys = {*stats, *node, *node["connections"], *node["breaker"], *stats["reliability"]}
    keys |= set(stats["reliability"]["ratios"])
    text = DOCS.read_text(encoding="utf-8")
    missing = sorted(key for key in keys if f"`{key}`" not in text)
    assert not missing, f"docs/observability.md does not name these statistics keys: {missing}"


def test_docs_list_every_event_with_its_logger_and_fields():
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in DOCS.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
    }
    classes = [getattr(ev, name) for name in ev.__all__]
    classes += [getattr(saga, name) for name in saga.__all__]
    events = [
        c for c in classes if isinstance(c, type) and attrs.has(c) and issubclass(c, ev.Event)
    ]
    assert len(events) >= 20
    for cls in events:
        row = rows.get(cls.__name__)
        assert row is not None, f"docs/observability.md has no row for {cls.__name__}"
        assert f"`{cls.logger_name}`" in row, cls.__name__
        for field in attrs.fields(cls):
            assert f"`{field.name}`" in row, f"{cls.__name__}.{field.name} is not documented"
