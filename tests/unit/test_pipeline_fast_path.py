"""The pipeline's two ways of bounding an attempt (virtual time, scripted nodes).

An attempt that can send at once (a node admits it, its pool has a slot
free) waits for its reply under the client's expiry timer; one that must
wait for a node or a connection runs in a cancel scope. The rest of the
suite runs through both without telling them apart, so these tests check
that the client really takes the first one, and that it keeps the rules of
the second.
"""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

import qdb_client
from qdb_client._request import RequestPipeline
from qdb_client.errors import ProtocolError, QdbError, RequestTimeout, RetryExhausted
from qdb_client.protocol import Request

from .fake_network import FakeNetwork, echo, never_answer
from .fake_peer import FakeNode
from .test_pipeline_attempts import EXACT


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many attempts took each path."""
    taken = {"timer": 0, "scope": 0}
    timed, scoped = RequestPipeline._attempt_now, RequestPipeline._attempt_scoped

    async def counted_timed(self, *args):  # type: ignore[no-untyped-def]
        taken["timer"] += 1
        return await timed(self, *args)

    async def counted_scoped(self, *args):  # type: ignore[no-untyped-def]
        taken["scope"] += 1
        return await scoped(self, *args)

    monkeypatch.setattr(RequestPipeline, "_attempt_now", counted_timed)
    monkeypatch.setattr(RequestPipeline, "_attempt_scoped", counted_scoped)
    return taken


async def test_attempts_that_can_send_at_once_use_the_timer(
    network: FakeNetwork, autojump_clock, paths
):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        await client._call("query", {}, 1.0, read_only=True)  # opens the connection
        assert client._pipeline is not None and client._pipeline.expiries.running
        paths.update(timer=0, scope=0)
        for _ in range(5):
            await client._call("query", {}, 1.0, read_only=True)
        assert paths == {"timer": 5, "scope": 0}
        assert len(client._pipeline.expiries) == 0


async def test_an_attempt_that_must_wait_for_a_slot_takes_the_scope(
    network: FakeNetwork, autojump_clock, paths
):
    arrived: trio.MemorySendChannel[tuple[FakeNode, Request]]
    arrived, held = trio.open_memory_channel(10)

    async def hold(node: FakeNode, request: Request) -> None:
        await arrived.send((node, request))

    network.handlers["a:1"] = hold
    options = {**EXACT, "max_in_flight": 1, "max_connections": 1}
    results: list[object] = []

    async def call() -> None:
        results.append(await client._call("query", {}, 10.0, read_only=True))

    async with qdb_client.open_client("a:1", **options) as client, trio.open_nursery() as calls:
        for _ in range(2):
            calls.start_soon(call)
        node, request = await held.receive()
        await trio.sleep(1.0)
        assert held.statistics().current_buffer_used == 0  # the second waits for the slot
        assert paths["scope"] >= 1
        await node.reply(request, "first")
        node, request = await held.receive()
        await node.reply(request, "second")
    assert sorted(results) == ["first", "second"]


async def test_a_write_whose_deadline_passes_before_its_send_is_not_sent(
    network: FakeNetwork, autojump_clock
):
    # The deadline can pass during the call's own bookkeeping, before any
    # await: the attempt must read the clock afresh and not send (a stale
    # start time sent it, and an unkeyed write could then be applied).
    seen: list[Request] = []

    async def record(node: FakeNode, request: Request) -> None:
        seen.append(request)
        await echo(node, request)

    network.handlers["a:1"] = record
    async with qdb_client.open_client("a:1", **EXACT) as client:
        await client._call("query", {}, 1.0, read_only=True)
        seen.clear()
        autojump_clock.rate = 1e9  # a microsecond of the call's own work is 1000 s
        try:
            with pytest.raises(RequestTimeout) as info:
                await client.execute("INSERT INTO t VALUES (1)", timeout=1.0, idempotency_key=False)
        finally:
            autojump_clock.rate = 0.0
        assert not info.value.request_sent and not info.value.maybe_applied
        await trio.testing.wait_all_tasks_blocked()
        assert [r.method for r in seen] == []


# ------------------------------------------------ the same outcomes either way


def _force_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scoped_only(self, call, args):  # type: ignore[no-untyped-def]
        return await self._attempt_scoped(call, args, trio.current_time(), None)

    monkeypatch.setattr(RequestPipeline, "_attempt", scoped_only)


async def _run(network: FakeNetwork, hosts: list[str], body) -> tuple:  # type: ignore[no-untyped-def]
    events: list[object] = []
    async with qdb_client.open_client(hosts, listeners=[events.append], **EXACT) as client:
        start = trio.current_time()
        try:
            outcome: object = await body(client)
        except QdbError as exc:
            outcome = (
                type(exc).__name__,
                exc.request_sent,
                exc.maybe_applied,
                [(a.node, a.outcome, a.sent, round(a.elapsed, 6)) for a in exc.attempts or ()],
            )
        took = round(trio.current_time() - start, 6)
        timeline = [
            (type(e).__name__, round(e.at - start, 6), getattr(e, "node", None))
            for e in events
            if type(e).__name__.startswith(("Request", "Retry"))
        ]
        assert client._pipeline is not None and len(client._pipeline.expiries) == 0
        counters = attrs.asdict(client._pipeline.counters)
    return outcome, took, timeline, counters


SCENARIOS = {
    "a read on a stalled node, then a good one": (
        {"stalled:1": "never", "good:2": "echo"},
        lambda c: c._call("query", {}, 5.0, read_only=True),
    ),
    "an unkeyed write on stalled nodes": (
        {"stalled:1": "never", "good:2": "never"},
        lambda c: c._call("execute", {}, 1.0, read_only=False, idempotency_key=False),
    ),
    "a keyed write on a stalled node, then a good one": (
        {"stalled:1": "never", "good:2": "echo"},
        lambda c: c._call("execute", {}, 3.0, read_only=False, idempotency_key="k1"),
    ),
    "a read on stalled nodes": (
        {"a:1": "never", "b:2": "never"},
        lambda c: c._call("query", {}, 2.0, read_only=True),
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_the_timer_path_ends_attempts_as_the_scope_path_does(
    network: FakeNetwork, autojump_clock, monkeypatch: pytest.MonkeyPatch, paths, scenario: str
):
    handlers, body = SCENARIOS[scenario]
    runs = []
    for force in (False, True):
        for address, kind in handlers.items():
            network.handlers[address] = echo if kind == "echo" else never_answer
        if force:
            assert paths["timer"] >= 1  # the first run did go through the timer
            _force_scope(monkeypatch)
            paths.update(timer=0)
        runs.append(await _run(network, list(handlers), body))
    assert paths["timer"] == 0
    assert runs[0] == runs[1]
    assert runs[0][1] > 0  # something was waited for: an attempt or a call timed out


async def test_a_write_whose_deadline_passes_while_it_waits_for_a_slot_is_not_sent(
    network: FakeNetwork, autojump_clock, monkeypatch: pytest.MonkeyPatch
):
    # trio checks deadlines once per scheduler pass: a waiter granted its slot in
    # the pass the call's deadline went by resumes uncancelled and must look at
    # the clock itself. Here the time that passes between the grant and the
    # send is a jump of the clock inside the grant.
    writes: list[Request] = []

    async def record(node: FakeNode, request: Request) -> None:
        writes.append(request)
        await echo(node, request)

    network.handlers["a:1"] = record
    async with qdb_client.open_client("a:1", **{**EXACT, "max_retries": 0}) as client:
        await client._call("query", {}, 1.0, read_only=True)
        writes.clear()
        pool = client._cluster.nodes[0].pool
        granted = pool.acquire_slot

        async def slow_grant(**options):  # type: ignore[no-untyped-def]
            connection = await granted(**options)
            autojump_clock.jump(2.0)  # past the write's 1 s deadline, no checkpoint
            return connection

        monkeypatch.setattr(pool, "try_acquire_slot", lambda now: None)  # the waiting path
        monkeypatch.setattr(pool, "acquire_slot", slow_grant)
        with pytest.raises(RequestTimeout) as info:
            await client._call("execute", {}, 1.0, idempotency_key=False)
        assert (info.value.request_sent, info.value.maybe_applied) == (False, False)
        await trio.testing.wait_all_tasks_blocked()
        assert writes == []
        assert all(c.in_flight == 0 for c in pool.connections())  # the slot was given back


@pytest.mark.parametrize("path", ["timer", "scope"])
async def test_a_parser_failing_untyped_is_a_corrupted_reply_on_either_path(
    network: FakeNetwork, autojump_clock, monkeypatch: pytest.MonkeyPatch, path: str
):
    # A result parser that trips on something a node sent (a KeyError, say)
    # must give the caller the ProtocolError of a malformed reply: the error
    # once escaped raw, taken for the caller's own cancellation.
    network.handlers["a:1"] = echo
    if path == "scope":
        _force_scope(monkeypatch)

    def parse(result: object) -> object:
        return {}["missing"]

    async with qdb_client.open_client("a:1", **{**EXACT, "max_retries": 0}) as client:
        with pytest.raises(RetryExhausted, match="corrupted reply") as info:
            await client._call("query", {}, 5.0, read_only=True, parse=parse)
        assert isinstance(info.value.__cause__, ProtocolError)
        assert isinstance(info.value.__cause__.__cause__, KeyError)
