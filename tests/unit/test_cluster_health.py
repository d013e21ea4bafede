"""Node health, reconnection and routing in virtual time, against scripted nodes."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import NoAvailableNode, QdbError
from qdb_client.events import NodeStateChanged
from qdb_client.protocol import GoAway, Member, Request

from .fake_network import FakeNetwork, echo
from .fake_peer import FakeNode

# Jitter off so reconnect times are exact; slow start off so routing is plain round robin.
EXACT = {"reconnect_jitter": 0.0, "slow_start": 0.0, "random_seed": 1}


def states(client: qdb_client.Client) -> dict[str, str]:
    return {n["address"]: n["state"] for n in client.statistics()["nodes"]}


def node_stats(client: qdb_client.Client, address: str) -> dict:
    return next(n for n in client.statistics()["nodes"] if n["address"] == address)


async def wait_for_state(client: qdb_client.Client, address: str, state: str) -> float:
    """Virtual time at which ``address`` reaches ``state`` (polls every 1 ms)."""
    while states(client)[address] != state:  # noqa: ASYNC110 - polling a snapshot API
        await trio.sleep(0.001)
    return trio.current_time()


async def drop_connections(network: FakeNetwork, address: str) -> None:
    """Close every open connection of ``address``'s nodes from the node's side."""
    for node in network.nodes_at(address):
        await node.stream.aclose()


class StateChanges(list[tuple[float, str]]):
    """A listener keeping (trio time, state) of every NodeStateChanged of ``node``."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def __call__(self, event: object) -> None:
        if isinstance(event, NodeStateChanged) and event.node == self.node:
            self.append((trio.current_time(), event.state))

    @property
    def states(self) -> list[str]:
        return [state for _, state in self]


async def test_heartbeats_ping_idle_connections_on_the_interval(network, autojump_clock):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", heartbeat_interval=5.0, **EXACT):
        start = trio.current_time()
        await trio.sleep(16.0)
    [node] = network.nodes
    assert [t - start for t in node.pings] == pytest.approx([5.0, 10.0, 15.0])


async def test_silent_node_goes_down_exactly_at_the_detection_time(network, autojump_clock):
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    options = dict(heartbeat_interval=5.0, ping_timeout=2.0, failures_to_down=3, **EXACT)
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        start = trio.current_time()
        network.muted.add("a:1")
        suspect_at = await wait_for_state(client, "a:1", "SUSPECT")
        down_at = await wait_for_state(client, "a:1", "DOWN")
        # heartbeat at 5 s, no PONG by 7 s; re-probes at 7.5 and 10 fail 2 s later each.
        assert suspect_at - start == pytest.approx(7.0, abs=0.002)
        assert down_at - start == pytest.approx(12.0, abs=0.002)
        assert states(client)["b:2"] == "UP"
        assert "PONG" in node_stats(client, "a:1")["reason"]


async def test_killed_node_is_down_at_once_and_reconnects_on_the_backoff_schedule(
    network: FakeNetwork, autojump_clock
):
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    options = dict(reconnect_initial=1.0, reconnect_multiplier=1.6, reconnect_max=30.0, **EXACT)
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        killed_at = trio.current_time()
        await network.kill("a:1")
        assert await wait_for_state(client, "a:1", "DOWN") == pytest.approx(killed_at, abs=0.002)
        # Reads keep working on the other node meanwhile.
        for _ in range(5):
            await client._call("query", {}, None, read_only=True)
        await trio.sleep(5.5)
        attempts = [
            t - killed_at for t, a in network.connect_times if a == "a:1" and t >= killed_at
        ]
        # Refused at once (that makes it DOWN), then after 1.0, 1.6 and 2.56 s.
        immediate = [t for t in attempts if t < 0.002]
        assert immediate and attempts[len(immediate) :] == pytest.approx(
            [1.0, 2.6, 5.16], abs=0.002
        )
        network.handlers["a:1"] = echo
        up_at = await wait_for_state(client, "a:1", "UP")
        assert up_at - killed_at == pytest.approx(1.0 + 1.6 + 2.56 + 4.096, abs=0.002)
        sent_before = node_stats(client, "a:1")["requests_sent"]
        for _ in range(4):
            await client._call("query", {}, None, read_only=True)
        assert node_stats(client, "a:1")["requests_sent"] == sent_before + 2


async def test_down_node_gets_no_requests(network, autojump_clock):
    for address in ("a:1", "b:2", "c:3"):
        network.handlers[address] = echo
    async with qdb_client.open_client(["a:1", "b:2", "c:3"], **EXACT) as client:
        client.mark_node_unhealthy("b:2")
        for _ in range(30):
            await client._call("query", {}, None, read_only=True)
        counts = {n["address"]: n["requests_sent"] for n in client.statistics()["nodes"]}
        assert counts == {"a:1": 15, "b:2": 0, "c:3": 15}
        # Marked unhealthy by an operator: no automatic recovery, however long.
        await trio.sleep(120)
        assert states(client)["b:2"] == "DOWN"
        client.mark_node_healthy("fake-b:2")
        for _ in range(30):
            await client._call("query", {}, None, read_only=True)
        counts = {n["address"]: n["requests_sent"] for n in client.statistics()["nodes"]}
        assert counts == {"a:1": 25, "b:2": 10, "c:3": 25}


async def test_unknown_node_name_is_a_config_error(network):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1") as client:
        with pytest.raises(qdb_client.ConfigError, match="no node"):
            client.mark_node_unhealthy("z:9")


async def test_all_nodes_down_waits_the_selection_timeout_then_explains(network, autojump_clock):
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    options = dict(node_selection_timeout=1.5, request_timeout=10.0, **EXACT)
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        client.mark_node_unhealthy("a:1")
        await network.kill("b:2")
        await wait_for_state(client, "b:2", "DOWN")
        started = trio.current_time()
        with pytest.raises(NoAvailableNode) as info:
            await client.query("select 1")
        assert trio.current_time() - started == pytest.approx(1.5)
        assert "marked unhealthy by operator" in info.value.reasons["a:1"]
        assert info.value.reasons["b:2"].startswith("DOWN (connect failed")
        assert "next reconnect in" in info.value.reasons["b:2"]


async def test_request_waiting_for_a_node_proceeds_when_one_comes_back(network, autojump_clock):
    network.handlers["a:1"] = echo
    options = dict(node_selection_timeout=5.0, **EXACT)
    async with qdb_client.open_client("a:1", **options) as client:
        client.mark_node_unhealthy("a:1")

        async def heal_later() -> None:
            await trio.sleep(0.7)
            client.mark_node_healthy("a:1")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heal_later)
            started = trio.current_time()
            await client._call("query", {}, None, read_only=True)
            assert trio.current_time() - started == pytest.approx(0.7)


async def test_goaway_is_not_a_node_failure(network, autojump_clock):
    async def goaway_then_echo(node: FakeNode, request: Request) -> None:
        if len(network.nodes) == 1:
            await node.reply(request, {"first": True})
            await node.send(GoAway(reason="idle_timeout", last_request_id=request.request_id))
            await node.stream.aclose()
        else:
            await echo(node, request)

    network.handlers["a:1"] = goaway_then_echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        assert await client._call("query", {}, None, read_only=True) == {"first": True}
        await trio.testing.wait_all_tasks_blocked()
        assert states(client) == {"a:1": "UP"}
        assert node_stats(client, "a:1")["failures"] == 0
        result = await client._call("query", {}, None, read_only=True)
        assert result["method"] == "query"
        assert len(network.nodes) == 2


async def test_members_announced_in_welcome_join_the_rotation(network, autojump_clock):
    network.members = (Member("fake-a:1", "a:1"), Member("fake-b:2", "b:2"))
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        await trio.testing.wait_all_tasks_blocked()
        assert states(client) == {"a:1": "UP", "b:2": "UP"}
        for _ in range(10):
            await client._call("query", {}, None, read_only=True)
        counts = {n["address"]: n["requests_sent"] for n in client.statistics()["nodes"]}
        assert counts == {"a:1": 5, "b:2": 5}


async def test_closing_the_client_closes_every_connection_and_task(network, autojump_clock):
    for address in ("a:1", "b:2"):
        network.handlers[address] = echo
    async with trio.open_nursery() as outer:
        async with (
            qdb_client.open_client(["a:1", "b:2"], min_connections=2, **EXACT) as client,
            trio.open_nursery() as callers,
        ):
            for _ in range(20):
                callers.start_soon(client.ping)
        await trio.testing.wait_all_tasks_blocked()
        stats = client.statistics()
        assert stats["closed"]
        for node in stats["nodes"]:
            assert node["connections"] == dict.fromkeys(
                ("open", "idle", "leased", "opening", "retiring"), 0
            )
            assert node["in_flight"] == 0
        # Every scripted node saw its connection end.
        assert len(network.nodes) >= 4 and all(node.finished for node in network.nodes)
        outer.cancel_scope.cancel()


async def test_one_node_under_two_addresses_is_counted_once(network, autojump_clock):
    # "localhost:1" is configured; "a:1" is how the cluster announces the same
    # node. b:2 answers first and announces a:1 before localhost:1 says who it is.
    network.node_ids["localhost:1"] = network.node_ids["a:1"] = "node-a"
    network.members = (Member("node-a", "a:1"), Member("fake-b:2", "b:2"))
    network.connect_delay["localhost:1"] = 0.5
    for address in ("localhost:1", "a:1", "b:2"):
        network.handlers[address] = echo
    async with qdb_client.open_client(["localhost:1", "b:2"], **EXACT) as client:
        await trio.sleep(1.0)
        assert "a:1" in network.connects  # the alias was added, then merged away
        assert sorted(states(client)) == ["b:2", "localhost:1"]
        for _ in range(10):
            await client._call("query", {}, None, read_only=True)
        counts = {n["address"]: n["requests_sent"] for n in client.statistics()["nodes"]}
        assert counts == {"localhost:1": 5, "b:2": 5}
        client.mark_node_unhealthy("a:1")  # the alias still names the node
        assert states(client)["localhost:1"] == "DOWN"


async def test_an_unreachable_alias_merged_away_does_not_disturb_the_client(
    network, autojump_clock
):
    # The cluster announces an internal address the client can't reach; its
    # connect attempt fails only after the alias was merged away.
    network.node_ids["localhost:1"] = network.node_ids["a:1"] = "node-a"
    network.members = (Member("node-a", "a:1"), Member("fake-b:2", "b:2"))
    network.connect_delay["localhost:1"] = 0.5
    network.connect_delay["a:1"] = 1.0
    network.handlers["localhost:1"] = echo
    network.handlers["b:2"] = echo
    network.handlers["a:1"] = "refuse"
    async with qdb_client.open_client(["localhost:1", "b:2"], **EXACT) as client:
        await trio.sleep(2.0)
        assert states(client) == {"localhost:1": "UP", "b:2": "UP"}
        for _ in range(4):
            await client._call("query", {}, None, read_only=True)


async def test_a_node_the_cluster_dropped_no_longer_reports_its_breaker(network, autojump_clock):
    # Attempts still in flight on a node merged away (or forgotten) may fail
    # after it left: its breaker must not mark the cluster as having a breaker
    # open, which would make every selection ask every breaker again.
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        cluster = client._cluster
        dropped = cluster.find("b:2")
        cluster._remove(dropped, cluster.find("a:1"))
        now = trio.current_time()
        for _ in range(10):
            dropped.breaker.record_failure(now, cause="connection")
        assert dropped.breaker.state(now).value == "OPEN"
        assert not cluster._not_closed


async def test_a_suspect_probe_gives_a_hanging_connect_only_twice_the_ping_timeout(
    network: FakeNetwork, autojump_clock
):
    # The node's connection went silent and new connections hang in their
    # handshake (their replies lost, as behind a middlebox that black-holed
    # them). Each SUSPECT probe must give up after twice ping_timeout (a login
    # may wait half of it for another), not hold the node SUSPECT for all of
    # connect_timeout.
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    options = dict(
        heartbeat_interval=5.0, ping_timeout=2.0, failures_to_down=3, connect_timeout=30.0, **EXACT
    )
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        start = trio.current_time()
        network.muted.add("a:1")
        network.handlers["a:1"] = "hang"
        suspect_at = await wait_for_state(client, "a:1", "SUSPECT")
        down_at = await wait_for_state(client, "a:1", "DOWN")
        # heartbeat at 5 s, no PONG by 7 s; probes at 7.5 and 12 connect in vain 4 s each.
        assert suspect_at - start == pytest.approx(7.0, abs=0.002)
        assert down_at - start == pytest.approx(16.0, abs=0.002)
        assert "no connection within 4 s" in node_stats(client, "a:1")["reason"]


async def test_a_node_that_goes_down_abandons_the_connects_it_had_under_way(
    network: FakeNetwork, autojump_clock
):
    # A connect that hangs when its node goes DOWN is abandoned: it would hold
    # its place in the pool (no other connect starts) for all of
    # connect_timeout after the node is back, then fail and knock it out.
    network.handlers["a:1"] = echo
    options = dict(
        heartbeat_interval=5.0,
        ping_timeout=0.5,
        failures_to_down=3,
        connect_timeout=30.0,
        reconnect_initial=1.0,
        **EXACT,
    )
    async with qdb_client.open_client("a:1", **options) as client, trio.open_nursery() as calls:
        network.handlers["a:1"] = "hang"
        await drop_connections(network, "a:1")  # the connection dies; reopening it hangs
        await wait_for_state(client, "a:1", "SUSPECT")

        async def read() -> None:
            with contextlib.suppress(QdbError):
                await client._call("query", {}, 10.0, read_only=True)

        calls.start_soon(read)  # the pool opens a connection for it: the connect hangs
        with trio.fail_after(1.0):
            while node_stats(client, "a:1")["connections"]["opening"] == 0:  # noqa: ASYNC110
                await trio.sleep(0.001)
        await wait_for_state(client, "a:1", "DOWN")
        await trio.testing.wait_all_tasks_blocked()
        assert node_stats(client, "a:1")["connections"]["opening"] == 0  # abandoned
        network.handlers["a:1"] = echo
        up_at = await wait_for_state(client, "a:1", "UP")
        assert await client._call("query", {}, 1.0, read_only=True)
        await trio.sleep(35.0)  # past the old attempt's connect_timeout
        assert states(client)["a:1"] == "UP"
        assert trio.current_time() - up_at >= 35.0


async def test_a_node_back_from_suspect_gives_up_the_connects_that_hung(
    network: FakeNetwork, autojump_clock
):
    # While the node was SUSPECT its pool's connects hung (their handshake
    # replies lost). Once a probe connects at once, those are given up: calls
    # get new connections, and the hung ones can't time out later and call
    # the node DOWN again.
    network.handlers["a:1"] = echo
    options = dict(
        heartbeat_interval=5.0, ping_timeout=2.0, failures_to_down=3, connect_timeout=20.0, **EXACT
    )
    changes = StateChanges("a:1")

    async with (
        qdb_client.open_client("a:1", listeners=[changes], **options) as client,
        trio.open_nursery() as calls,
    ):
        network.handlers["a:1"] = "hang"
        await drop_connections(network, "a:1")  # the connection dies; new handshakes hang
        await wait_for_state(client, "a:1", "SUSPECT")

        async def read() -> None:
            with contextlib.suppress(QdbError):
                await client._call("query", {}, 8.0, read_only=True)

        for _ in range(3):
            calls.start_soon(read)  # the pool opens connections for them: they hang
        with trio.fail_after(1.0):
            while node_stats(client, "a:1")["connections"]["opening"] == 0:  # noqa: ASYNC110
                await trio.sleep(0.001)
        network.handlers["a:1"] = echo  # the node answers again
        up_at = await wait_for_state(client, "a:1", "UP")
        with trio.fail_after(1.0):
            await client._call("query", {}, 8.0, read_only=True)
        await trio.sleep(25.0)  # past the hung connects' connect_timeout
        assert states(client)["a:1"] == "UP"
    assert changes[-1][1] == "UP" and changes[-1][0] <= up_at  # and it stayed UP


async def test_a_node_whose_handshakes_are_slow_is_not_called_down_by_its_probes(
    network: FakeNetwork, autojump_clock
):
    # Its handshake takes longer than ping_timeout (TLS far away, say), as it
    # always has: a probe that connects gets twice the last connect's time.
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    network.connect_delay["a:1"] = 1.5
    options = dict(heartbeat_interval=5.0, ping_timeout=1.0, connect_timeout=10.0, **EXACT)
    changes = StateChanges("a:1")

    async with qdb_client.open_client(["a:1", "b:2"], listeners=[changes], **options) as client:
        with trio.fail_after(5.0):
            while node_stats(client, "a:1")["connections"]["open"] == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
        await drop_connections(network, "a:1")  # one connection lost: SUSPECT, then probes
        await wait_for_state(client, "a:1", "SUSPECT")
        await wait_for_state(client, "a:1", "UP")
    assert changes.states == ["SUSPECT", "UP"]


async def test_a_node_whose_handshakes_became_slow_still_gets_back(
    network: FakeNetwork, autojump_clock
):
    # Its handshakes suddenly take 4.5 s, more than the probes' bound (twice
    # ping_timeout): its SUSPECT probes give up on them and it goes DOWN, but
    # each reconnect cut short doubles the next one's bound, so it gets back.
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    options = dict(
        heartbeat_interval=5.0,
        ping_timeout=2.0,
        connect_timeout=10.0,
        reconnect_initial=0.5,
        reconnect_max=1.0,
        **EXACT,
    )
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        network.connect_delay["a:1"] = 4.5
        await drop_connections(network, "a:1")
        await wait_for_state(client, "a:1", "DOWN")
        with trio.fail_after(15.0):  # reconnects cut short at 4 s, then given 8 s
            await wait_for_state(client, "a:1", "UP")
        await trio.sleep(10.0)
        assert states(client)["a:1"] == "UP"


async def test_a_probe_whose_connect_times_out_is_a_failed_probe_not_a_refusal(
    network: FakeNetwork, autojump_clock
):
    # With ping_timeout above half of connect_timeout, the probe's own bound is
    # longer than connect_timeout, so a lost WELCOME ends in ConnectTimeout:
    # slow, not refused. It must count as one failed probe, not make the node
    # DOWN at once (disabling its pool); the next probe gets through.
    network.handlers["a:1"] = echo
    options = dict(heartbeat_interval=5.0, ping_timeout=3.0, connect_timeout=5.0, **EXACT)
    changes = StateChanges("a:1")

    async with qdb_client.open_client("a:1", listeners=[changes], **options) as client:
        await trio.testing.wait_all_tasks_blocked()
        network.silent_handshakes["a:1"] = {network.connections_made("a:1")}
        await drop_connections(network, "a:1")  # lost; the probe's first new one loses its WELCOME
        await wait_for_state(client, "a:1", "SUSPECT")
        with trio.fail_after(10.0):
            await wait_for_state(client, "a:1", "UP")
    assert changes.states == ["SUSPECT", "UP"]


async def test_a_mark_healthy_during_a_reconnect_ends_its_doubling(
    network: FakeNetwork, autojump_clock
):
    # A reconnect cut short after the operator marked the node healthy must not
    # leave the next DOWN episode's first reconnect a doubled bound.
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    options = dict(
        heartbeat_interval=5.0,
        ping_timeout=1.0,
        connect_timeout=30.0,
        reconnect_initial=0.5,
        reconnect_max=0.5,
        **EXACT,
    )
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        assert client._cluster is not None
        monitor = client._cluster._monitors["a:1"]
        await network.kill("a:1")
        await wait_for_state(client, "a:1", "DOWN")
        network.handlers["a:1"] = "hang"
        with trio.fail_after(5.0):  # a reconnect starts, and hangs
            while node_stats(client, "a:1")["next_reconnect_in"] is not None:  # noqa: ASYNC110
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        network.handlers["a:1"] = echo
        client.mark_node_healthy("a:1")
        await trio.sleep(10.0)
        assert states(client)["a:1"] == "UP"
        assert monitor._reconnects_cut_short == 0
