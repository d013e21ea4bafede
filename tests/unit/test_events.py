"""Event listeners and log lines: exact event sequences in virtual time.

Scripted nodes over in-memory streams; every ``at``, delay and duration is
exact. A listener that raises is contained; with nobody listening, request
events are not even built.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client import events as ev
from qdb_client._request import attempt as attempt_module
from qdb_client._request import pipeline as pipeline_module
from qdb_client.protocol import ErrorCode, Request

from .fake_network import FakeNetwork, echo
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


class Recorder:
    """A listener keeping every event."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def __call__(self, event: ev.Event) -> None:
        self.events.append(event)

    def of(self, *classes: type[ev.Event]) -> list[ev.Event]:
        return [e for e in self.events if isinstance(e, classes)]


REQUEST_EVENTS = (ev.RequestStarted, ev.RequestSucceeded, ev.RequestFailed, ev.RetryScheduled)


async def test_a_read_is_started_then_succeeded_with_its_exact_duration(
    network: FakeNetwork, autojump_clock
):
    async def slow_echo(node: FakeNode, request: Request) -> None:
        await trio.sleep(0.25)
        await echo(node, request)

    network.handlers["a:1"] = slow_echo
    recorder = Recorder()
    async with qdb_client.open_client("a:1", listeners=[recorder], **EXACT) as client:
        started = trio.current_time()
        await client._call("query", {}, None, read_only=True)
        serial = client._cluster.find("a:1").pool.connections()[0].serial
    got = recorder.of(*REQUEST_EVENTS)
    assert [type(e) for e in got] == [ev.RequestStarted, ev.RequestSucceeded]
    first, done = got
    assert (first.method, first.node, first.attempt, first.at) == ("query", "a:1", 1, started)
    assert done.request_id == first.request_id > 0
    assert done.duration == pytest.approx(0.25) and done.at == pytest.approx(started + 0.25)
    assert first.connection_id == serial


async def test_a_retried_read_shows_the_failure_the_backoff_and_the_second_attempt(
    network: FakeNetwork, autojump_clock
):
    calls = 0

    async def fail_once(node: FakeNode, request: Request) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await node.fail(request, ErrorCode.UNAVAILABLE, "busy")
        else:
            await echo(node, request)

    network.handlers["a:1"] = fail_once
    recorder = Recorder()
    async with qdb_client.open_client("a:1", listeners=[recorder], **EXACT) as client:
        start = trio.current_time()
        await client._call("query", {}, None, read_only=True)
    got = recorder.of(*REQUEST_EVENTS)
    assert [type(e).__name__ for e in got] == [
        "RequestStarted",
        "RequestFailed",
        "RetryScheduled",
        "RequestStarted",
        "RequestSucceeded",
    ]
    failed, retry, second = got[1], got[2], got[3]
    assert (failed.outcome, failed.retried, failed.attempt) == ("node unavailable", True, 1)
    assert "Unavailable" in failed.error and "busy" in failed.error
    assert (retry.attempt, retry.delay) == (2, pytest.approx(0.1))
    assert second.attempt == 2 and second.at == pytest.approx(start + 0.1)


async def test_a_node_that_dies_and_comes_back_tells_its_story(
    network: FakeNetwork, autojump_clock
):
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    recorder = Recorder()
    async with qdb_client.open_client(["a:1", "b:2"], listeners=[recorder], **EXACT) as client:
        await trio.testing.wait_all_tasks_blocked()
        killed = trio.current_time()
        await network.kill("a:1")
        await trio.sleep(0.5)
        network.handlers["a:1"] = echo
        while client._cluster.find("a:1").state.value != "UP":  # noqa: ASYNC110
            await trio.sleep(0.1)
    cluster_events = [
        (type(e).__name__, getattr(e, "previous", None), getattr(e, "state", None))
        for e in recorder.of(ev.NodeStateChanged, ev.PoolCleared, ev.ConnectionClosed)
        if getattr(e, "node", "") == "a:1" and e.at >= killed
    ]
    assert cluster_events[0] == ("ConnectionClosed", None, None)
    states = [(p, s) for name, p, s in cluster_events if name == "NodeStateChanged"]
    assert states == [("UP", "SUSPECT"), ("SUSPECT", "DOWN"), ("DOWN", "UP")]
    assert ("PoolCleared", None, None) in cluster_events
    closed = recorder.of(ev.ConnectionClosed)[0]
    assert closed.node == "a:1" and closed.reason.startswith("lost:")
    ready = [e for e in recorder.of(ev.ConnectionReady) if e.node == "a:1"]
    assert len(ready) >= 2 and ready[-1].node_id == "fake-a:1"


async def test_a_breaker_that_opens_says_why(network: FakeNetwork, autojump_clock):
    async def unavailable(node: FakeNode, request: Request) -> None:
        await node.fail(request, ErrorCode.OVERLOADED, "shedding")

    network.handlers["a:1"] = unavailable
    recorder = Recorder()
    options = dict(EXACT, max_retries=0, breaker_failure_threshold=2)
    async with qdb_client.open_client("a:1", listeners=[recorder], **options) as client:
        for _ in range(2):
            with pytest.raises(qdb_client.RetryExhausted):
                await client._call("query", {}, None, read_only=True)
    (opened,) = recorder.of(ev.BreakerStateChanged)
    assert (opened.node, opened.previous, opened.state) == ("a:1", "CLOSED", "OPEN")
    assert opened.opened_by == ("overload",)
    assert opened.level == logging.WARNING


async def test_a_listener_that_raises_is_logged_and_never_breaks_the_driver(
    network: FakeNetwork, autojump_clock, caplog
):
    network.handlers["a:1"] = echo
    recorder = Recorder()

    def broken(event: ev.Event) -> None:
        raise RuntimeError("listener bug")

    with caplog.at_level(logging.WARNING, logger="qdb_client.events"):
        async with qdb_client.open_client("a:1", listeners=[broken, recorder], **EXACT) as client:
            for _ in range(3):
                await client._call("query", {}, None, read_only=True)
            assert client.events.listener_errors >= 6
    assert len(recorder.of(ev.RequestSucceeded)) == 3  # the next listener still got them
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_events_become_log_lines_without_parameters(
    network: FakeNetwork, autojump_clock, caplog
):
    async def rows(node: FakeNode, request: Request) -> None:
        await node.reply(request, {"columns": ["x"], "rows": [[1]]})

    network.handlers["a:1"] = rows
    with caplog.at_level(logging.DEBUG, logger="qdb_client"):
        async with qdb_client.open_client("a:1", **EXACT) as client:
            await client.query("SELECT * FROM t WHERE secret = ?", ["hunter2"])
    names = {r.name for r in caplog.records}
    assert {"qdb_client.request", "qdb_client.connection"} <= names
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "RequestStarted" in text and "RequestSucceeded" in text
    assert "hunter2" not in text and "secret" not in text


async def test_with_nobody_listening_request_events_are_not_built(
    network: FakeNetwork, autojump_clock, monkeypatch
):
    built: list[type] = []

    def counting(cls):
        class Counting(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):
                built.append(cls)
                super().__init__(*args, **kwargs)

        return Counting

    for name in ("RequestStarted", "RequestSucceeded", "RetryScheduled"):
        for module in (attempt_module, pipeline_module):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, counting(getattr(ev, name)))
    network.handlers["a:1"] = echo
    logging.getLogger("qdb_client").setLevel(logging.WARNING)
    try:
        async with qdb_client.open_client("a:1", **EXACT) as client:
            for _ in range(5):
                await client._call("query", {}, None, read_only=True)
        assert built == []
        async with qdb_client.open_client("a:1", listeners=[Recorder()], **EXACT) as client:
            await client._call("query", {}, None, read_only=True)
        assert built == [ev.RequestStarted, ev.RequestSucceeded]
    finally:
        logging.getLogger("qdb_client").setLevel(logging.NOTSET)


def test_bad_listeners_are_config_errors():
    with pytest.raises(qdb_client.ConfigError):
        qdb_client.ClientConfig(hosts="a:1", listeners=[42])
    with pytest.raises(qdb_client.ConfigError):
        qdb_client.ClientConfig(hosts="a:1", listeners=print)  # one callable, not a list


async def test_a_write_answered_from_its_stored_outcome_is_reported_as_a_replay(
    network: FakeNetwork, autojump_clock
):
    from qdb_client.protocol import Response

    async def stored(node: FakeNode, request: Request) -> None:
        result = {"rows_affected": 1, "last_insert_id": 7}
        await node.send(Response(request.request_id, result, replayed=True))

    network.handlers["a:1"] = stored
    recorder = Recorder()
    async with qdb_client.open_client("a:1", listeners=[recorder], **EXACT) as client:
        result = await client.execute("INSERT INTO t VALUES (1)", idempotency_key="order-7")
        assert client.statistics()["idempotent_replays"] == 1
    assert result.last_insert_id == 7
    (replay,) = recorder.of(ev.IdempotentReplay)
    assert (replay.method, replay.node, replay.idempotency_key) == ("execute", "a:1", "order-7")


def test_replayed_travels_only_when_true():
    from qdb_client.protocol import Response, decode_message, encode_message
    from qdb_client.protocol.frames import FrameDecoder

    for replayed in (False, True):
        data = encode_message(Response(3, {"n": 1}, replayed=replayed))
        decoder = FrameDecoder(1 << 20)
        decoder.feed(data)
        message = decode_message(decoder.next_frame())
        assert message == Response(3, {"n": 1}, replayed=replayed)
        assert (b"replayed" in data) is replayed
