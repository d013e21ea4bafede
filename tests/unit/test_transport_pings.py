"""Pings and orphans on the connection: GOAWAY spares pings, our own close is no node
failure, orphans expire with room to spare (virtual time, in-memory streams)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.protocol import GoAway, Ping, Pong

from .fake_network import FakeNetwork, echo
from .test_transport_connection import connected

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


async def test_a_ping_in_flight_survives_a_goaway(autojump_clock):
    """protocol.md 11: a PING is not a request and does not appear in GOAWAY
    last_request_id accounting; the node still answers PONG. Connection._on_goaway
    fails every waiter above last_request_id, pings included, with
    ConnectionDraining, although the PONG is on its way."""
    async with connected() as (conn, node, nursery):
        result: list[object] = []

        async def ping() -> None:
            try:
                result.append(await conn.ping())
            except qdb_client.QdbError as exc:
                result.append(exc)

        nursery.start_soon(ping)
        message = await node.receive()
        assert isinstance(message, Ping)
        await node.send(GoAway("max_lifetime", 0))
        await node.send(Pong(message.request_id))
        await trio.testing.wait_all_tasks_blocked()
        assert result and isinstance(result[0], float), result


async def test_a_goaway_during_a_heartbeat_does_not_make_the_node_suspect(
    network: FakeNetwork, autojump_clock
):
    """A node rotates a connection (GOAWAY max_lifetime) while a heartbeat PING
    is in flight on it, then answers the PONG as it must: the node is healthy,
    yet the failed ping makes it SUSPECT (DOWN with failures_to_down=1, which
    disables the whole pool)."""
    network.handlers["a:1"] = echo
    network.muted.add("a:1")  # the test answers the PING itself
    options = dict(EXACT, heartbeat_interval=1.0, failures_to_down=1)
    async with qdb_client.open_client("a:1", **options) as client:
        node = client._cluster.find("a:1")
        connection = node.pool.connections()[0]
        fake = network.nodes_at("a:1")[0]
        await trio.sleep(1.0)  # the first heartbeat PING is out, unanswered
        await trio.testing.wait_all_tasks_blocked()
        assert fake.pings
        (ping_id,) = connection._waiting
        await fake.send(GoAway("max_lifetime", 0))
        await fake.send(Pong(ping_id))
        await trio.testing.wait_all_tasks_blocked()
        assert node.state.value == "UP", node.reason


async def test_an_unconfirmed_orphan_is_forgotten_even_when_the_connection_has_room(
    network: FakeNetwork, autojump_clock
):
    """docs/resilience.md: "An orphan a node never confirms is forgotten once
    its deadline plus 2 s has passed." Connection._expire_orphans only runs
    from has_room() when the connection is at its limit, so on a connection
    with room the orphan stays forever: statistics report it, node.in_flight
    counts it, and the latency-aware balancer weighs the node by
    (in_flight + 1) * latency for good."""
    from qdb_client.protocol import Request

    from .fake_peer import FakeNode

    async def first_silent(node: FakeNode, request: Request) -> None:
        if request.request_id == 1:
            return  # never answered; the CANCEL is ignored
        await echo(node, request)

    network.handlers["a:1"] = first_silent
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(qdb_client.errors.RequestTimeout):
            await client._call("query", {}, 0.5, read_only=True)
        await trio.sleep(60.0)
        await client._call("query", {}, 1.0, read_only=True)  # the connection is used again
        stats = client.statistics()["nodes"][0]
        assert (stats["in_flight"], stats["orphaned"]) == (0, 0), stats


async def test_the_pool_closing_an_idle_connection_under_a_heartbeat_is_no_node_failure(
    network: FakeNetwork, autojump_clock
):
    """A heartbeat PING is in flight on an idle connection when the pool closes
    that connection for its idle timeout (a PING holds no request slot, so the
    connection counts as idle). The ping fails with ClientClosed, our own
    doing, and HealthMonitor._heartbeat reports HEARTBEAT_FAILED: the healthy
    node turns SUSPECT (DOWN with failures_to_down=1)."""
    network.handlers["a:1"] = echo
    network.muted.add("a:1")  # PONGs come from the test, 0.5 s late
    options = dict(
        EXACT,
        heartbeat_interval=1.0,
        ping_timeout=2.0,
        failures_to_down=1,
        min_connections=0,
        idle_timeout=4.2,  # pings go out at 1.0, 2.5, 4.0 (answered 4.5)...
    )
    async with qdb_client.open_client("a:1", **options) as client:
        node = client._cluster.find("a:1")
        fake = network.nodes_at("a:1")[0]
        connection = node.pool.connections()[0]

        async def answer_pings_late() -> None:
            answered: set[int] = set()
            while connection.error is None:
                pending = [rid for rid in connection._waiting if rid not in answered]
                for rid in pending:
                    answered.add(rid)
                    await trio.sleep(0.5)
                    if connection.error is None:
                        await fake.send(Pong(rid))
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_pings_late)
            await trio.sleep(5.0)
            nursery.cancel_scope.cancel()
        assert node.pool.state.connections == {}, "precondition: the idle connection was closed"
        assert node.state.value == "UP", node.reason
