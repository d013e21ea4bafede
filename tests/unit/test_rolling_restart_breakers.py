"""Breakers during a rolling restart (TC-TR-013), in virtual time against scripted nodes.

A rolling restart under load on a busy host (tests/integration/test_rolling_restart.py)
showed the application CircuitOpen for the rest of a node's restart: while one
node was down, a host-wide stall made the in-flight requests of both other
nodes miss their attempt timeouts at once, and silence opened both their
breakers for ``breaker_open_timeout``. Silence is judged beside the other
nodes, so it must never eject the last node left, and breakers that silence
alone opened are probed again once no other node is left.
"""

from __future__ import annotations

import pytest
import trio

import qdb_client
from qdb_client.errors import CircuitOpen
from qdb_client.protocol import GoAway, Request

from .fake_network import FakeNetwork, echo
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


def node_stats(client: qdb_client.Client, address: str) -> dict:
    return next(n for n in client.statistics()["nodes"] if n["address"] == address)


async def reads(client: qdb_client.Client, count: int) -> list[object]:
    """``count`` concurrent reads with a 5 s deadline: results or errors."""
    outcomes: list[object] = []

    async def one() -> None:
        try:
            outcomes.append(await client._call("query", {}, 5.0, read_only=True))
        except qdb_client.QdbError as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return outcomes


async def test_tc_tr_013_a_host_wide_stall_never_opens_the_last_admitting_nodes_breaker(
    network: FakeNetwork, autojump_clock
):
    """The third node is away (restarting) when the host stalls: a holds every
    reply until 0.45 s, b until 0.4 s. 20 reads in flight, 10 on each, miss the
    0.25 s attempt timeout and are retried on the other node. a's retries are
    answered by b first, so a is blamed 10 times in a row and ejected; then b's
    retries are answered by a, and b, now the last node whose breaker admits,
    is blamed as often but not ejected: later reads succeed."""
    stalled_until: dict[str, float] = {}
    send_locks: dict[FakeNode, trio.Lock] = {}

    async def host(node: FakeNode, request: Request) -> None:
        async def reply() -> None:
            await trio.sleep_until(stalled_until.get(node.node_id, 0.0))
            async with send_locks.setdefault(node, trio.Lock()):
                await echo(node, request)

        network.nursery.start_soon(reply)

    network.handlers["a:1"] = host
    network.handlers["b:2"] = host
    async with qdb_client.open_client(["a:1", "b:2", "c:3"], **EXACT) as client:
        assert [await client._call("query", {}, 5.0, read_only=True) for _ in range(6)]
        now = trio.current_time()
        stalled_until = {"fake-a:1": now + 0.45, "fake-b:2": now + 0.4}
        stalled = await reads(client, 20)
        assert all(isinstance(o, dict) for o in stalled), stalled
        assert client.statistics()["attempt_timeouts"] == 20
        a, b = (node_stats(client, address)["breaker"] for address in ("a:1", "b:2"))
        assert a["failed_requests"] == b["failed_requests"] == 10
        # b's silence, with no CLOSED node beside it, sent a (shut out by silence
        # alone) back to HALF_OPEN: it is probed again rather than waiting 30 s.
        assert (a["current_state"], b["current_state"]) == ("HALF_OPEN", "CLOSED")

        after = await reads(client, 20)
        assert all(isinstance(o, dict) for o in after), after
        assert client.statistics()["circuit_rejections"] == 0


async def shut_down(network: FakeNetwork, address: str) -> None:
    """A graceful shutdown as a node does it: GOAWAY, close, refuse new connections."""
    network.handlers[address] = "refuse"
    for node in network.nodes_at(address):
        await node.send(GoAway("shutdown", 0))
        await node.stream.aclose()


@pytest.mark.parametrize(
    ("cause", "probed"), [("slow", True), ("overload", False)], ids=["silence", "overload"]
)
async def test_tc_tr_013_when_the_last_admitting_node_shuts_down_silence_opened_breakers_are_probed(
    network: FakeNetwork, autojump_clock, cause, probed
):
    """a and b were ejected while c answered; then c shuts down (the next step of
    the rolling restart). Ejected for silence, a and b are probed again at once
    and serve every read; ejected for refusing work (overload), they are not:
    the call fails fast with CircuitOpen, as before."""
    for address in ("a:1", "b:2", "c:3"):
        network.handlers[address] = echo
    async with qdb_client.open_client(["a:1", "b:2", "c:3"], **EXACT) as client:
        await client._call("query", {}, 5.0, read_only=True)
        now = trio.current_time()
        for address in ("a:1", "b:2"):
            breaker = client._cluster.find(address).breaker
            for _ in range(5):
                breaker.record_failure(now, cause=cause)
            assert breaker.state(now).value == "OPEN"
        await shut_down(network, "c:3")
        with trio.fail_after(5):
            while node_stats(client, "c:3")["state"] != "DOWN":  # noqa: ASYNC110
                await trio.sleep(0.01)

        outcomes = await reads(client, 10)
        if probed:
            assert all(isinstance(o, dict) for o in outcomes), outcomes
            for address in ("a:1", "b:2"):
                transitions = node_stats(client, address)["breaker"]["transitions"]
                assert transitions == ["OPEN", "HALF_OPEN", "CLOSED"]
        else:
            assert all(isinstance(o, CircuitOpen) for o in outcomes), outcomes


def _breaker(client: qdb_client.Client, address: str) -> dict:
    return next(n for n in client.statistics()["nodes"] if n["address"] == address)["breaker"]


async def test_when_the_last_admitting_node_stalls_the_node_silence_shut_out_is_probed(
    network: FakeNetwork, autojump_clock
):
    # a is shut out for silence while b answers; then a recovers and b stalls. b is
    # the last node admitting, so its silence does not open it, but the node that
    # silence alone shut out must be tried again at once, not after 30 s.
    silent = {"fake-a:1"}

    async def handler(node, request):
        if node.node_id not in silent:
            await echo(node, request)

    network.handlers["a:1"] = handler
    network.handlers["b:2"] = handler
    options = dict(
        retry_jitter="none",
        reconnect_jitter=0.0,
        slow_start=0.0,
        random_seed=7,
        heartbeat_interval=1000.0,
    )
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        for _ in range(12):
            await client._call("query", {}, 5.0, read_only=True)
        assert _breaker(client, "a:1")["current_state"] == "OPEN"
        assert _breaker(client, "a:1")["opened_by"] == ["slow"]
        silent.clear()
        silent.add("fake-b:2")
        failures = []
        for _ in range(10):
            try:
                await client._call("query", {}, 1.0, read_only=True)
            except qdb_client.QdbError as exc:
                failures.append(exc)
        # Finding out costs a call or two; then a, healthy, takes the reads.
        assert len(failures) <= 2, failures
        assert _breaker(client, "a:1")["current_state"] == "CLOSED"


async def test_has_alternative_for_a_node_outside_the_cached_candidates(
    network: FakeNetwork, autojump_clock
):
    for address in ("a:1", "b:2", "c:3"):
        network.handlers[address] = echo
    async with qdb_client.open_client(
        ["a:1", "b:2", "c:3"], heartbeat_interval=1.0, retry_jitter="none", slow_start=0.0
    ) as client:
        cluster = client._cluster
        await client._call("query", {}, 5.0, read_only=True)
        network.muted.add("c:3")
        c = cluster.find("c:3")
        with trio.fail_after(30):
            while c.state.value != "SUSPECT":  # noqa: ASYNC110 - a state, no event
                await trio.sleep(0.1)
        now = trio.current_time()
        first, other = cluster.candidates(())
        for _ in range(5):
            first.breaker.record_failure(now, cause="overload")
        assert not first.breaker.would_allow(now) and other.breaker.would_allow(now)
        assert cluster.has_alternative(c, (), now)  # the shortcut once looked at only one


async def test_has_alternative_with_every_breaker_closed(network: FakeNetwork, autojump_clock):
    """The shortcut taken while no breaker is open must answer as the full search:
    another candidate exists for each of two live nodes, and for the last live
    node none does, while a node outside the candidates still has one."""
    for address in ("a:1", "b:2", "c:3"):
        network.handlers[address] = echo
    async with qdb_client.open_client(
        ["a:1", "b:2", "c:3"], heartbeat_interval=1.0, retry_jitter="none", slow_start=0.0
    ) as client:
        cluster = client._cluster
        await client._call("query", {}, 5.0, read_only=True)
        now = trio.current_time()
        a, b, c = (cluster.find(address) for address in ("a:1", "b:2", "c:3"))
        assert all(cluster.has_alternative(n, (), now) for n in (a, b, c))
        network.muted.update({"b:2", "c:3"})
        with trio.fail_after(30):
            while cluster.candidates(()) != [a]:  # noqa: ASYNC110 - a state, no event
                await trio.sleep(0.1)
        now = trio.current_time()
        assert not cluster._not_closed  # the shortcut's case: every breaker CLOSED
        assert not cluster.has_alternative(a, (), now)
        assert cluster.has_alternative(b, (), now)
