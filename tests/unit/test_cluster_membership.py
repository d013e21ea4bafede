"""Membership and selection: forgetting a member fails nothing as ClientClosed, a SUSPECT
node that admits beats CircuitOpen (virtual time)."""

from __future__ import annotations

import trio
import trio.testing

import qdb_client
from qdb_client.protocol import Member, Request

from .fake_network import FakeNetwork, echo, never_answer
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


async def answer(node: FakeNode, request: Request) -> None:
    if request.method == "execute":
        await node.reply(request, {"rows_affected": 1, "last_insert_id": None})
    else:
        await echo(node, request)


async def test_forgetting_a_member_does_not_fail_its_in_flight_requests_as_client_closed(
    network: FakeNetwork, autojump_clock
):
    """A keyed write is in flight on a discovered member that stops answering
    and goes DOWN; forget_members_after later the member is forgotten and
    Cluster._forget closes its pool with aclose(): the write fails with
    ClientClosed ("closed by the client"), which is never retried, although
    the client is open, the write is keyed and a healthy node is there."""
    network.handlers["a:1"] = answer
    network.handlers["b:2"] = never_answer
    network.members = (Member("fake-b:2", "b:2"),)
    options = dict(
        EXACT,
        heartbeat_interval=1.0,
        ping_timeout=0.5,
        failures_to_down=1,
        forget_members_after=2.0,
        attempt_timeout_factor=0,
    )
    async with qdb_client.open_client("a:1", **options) as client:
        await trio.testing.wait_all_tasks_blocked()
        cluster = client._cluster
        b = cluster.find("b:2")
        assert b.pool.connections(), "precondition: b:2 joined and holds a connection"
        network.members = ()  # nobody announces b:2 any more
        client.mark_node_unhealthy("a:1")  # the write goes to b:2
        outcome: list[object] = []

        async def write() -> None:
            try:
                outcome.append(await client.execute("insert into t values (1)", timeout=30.0))
            except qdb_client.QdbError as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            assert b.in_flight == 1
            client.mark_node_healthy("a:1")
            network.muted.add("b:2")  # b:2 now answers nothing: DOWN, then forgotten
        assert client.statistics()["members_forgotten"] == 1
        assert not isinstance(outcome[0], qdb_client.errors.ClientClosed), (
            outcome[0],
            getattr(outcome[0], "attempts", None),
        )


async def test_an_open_breaker_on_the_only_up_node_does_not_hide_a_suspect_node_that_admits(
    network: FakeNetwork, autojump_clock
):
    """A is UP but its breaker is OPEN (it went silent); B missed one heartbeat
    and is SUSPECT for a while, its breaker CLOSED and its connection fine.
    docs/resilience.md: "with at least one node whose breaker admits, reads and
    keyed writes never see CircuitOpen". Cluster._admit only falls back to the
    UP candidates, so the read fails with CircuitOpen instead of going to B."""
    from qdb_client._cluster.health_state import HealthEvent

    network.handlers["a:1"] = never_answer
    network.handlers["b:2"] = echo
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        cluster = client._cluster
        a, b = cluster.find("a:1"), cluster.find("b:2")
        now = trio.current_time()
        for _ in range(5):
            assert a.breaker.allow(now)
            a.breaker.record_failure(now, a.breaker.generation, cause="slow")
        assert a.breaker.state(now).value == "OPEN"
        cluster._monitors["b:2"].report(HealthEvent.HEARTBEAT_FAILED, "one missed PONG")
        assert b.state.value == "SUSPECT"
        result = await client._call("query", {}, 2.0, read_only=True)
        assert result["method"] == "query"
