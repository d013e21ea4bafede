"""Gray failures through the whole client, in virtual time against scripted nodes.

Each test is named after the problem of the gray-failures issue it proves
fixed (numbered as there): a stalled node, one reset with many requests in
flight, a write whose lost reply met an open breaker, a GOAWAY drain, and
the smaller defects. Real-node cases (reads are reads, the cancellation
storm, lost replies of committed writes) are in
``tests/integration/test_gray_failures.py``.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import (
    CircuitOpen,
    ConnectionLost,
    HandshakeError,
    RequestTimeout,
    RetryExhausted,
    VersionMismatch,
)
from qdb_client.protocol import GoAway, Member, Request

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
    """Reply as a node does: an execute result for writes, an echo otherwise."""
    if request.method == "execute":
        await node.reply(request, {"rows_affected": 1, "last_insert_id": None})
    else:
        await echo(node, request)


def node_stats(client: qdb_client.Client, address: str) -> dict:
    return next(n for n in client.statistics()["nodes"] if n["address"] == address)


# ------------------------------------------- 2. a stalled node is penalised


async def _reads(client: qdb_client.Client, count: int, *, concurrent: bool) -> list[object]:
    outcomes: list[object] = []

    async def one() -> None:
        try:
            outcomes.append(await client._call("query", {}, 1.0, read_only=True))
        except qdb_client.QdbError as exc:
            outcomes.append(exc)

    if concurrent:
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    else:
        for _ in range(count):
            await one()
    return outcomes


@pytest.mark.parametrize("policy", ["round_robin", "latency_aware"])
@pytest.mark.parametrize("concurrent", [False, True], ids=["sequential", "concurrent"])
@pytest.mark.parametrize("pings", [True, False], ids=["answers-pings", "sigstopped"])
async def test_2_stalled_node_reads_move_away_within_the_deadline(
    network: FakeNetwork, autojump_clock, policy, concurrent, pings
):
    """Two nodes, one stalling every query (answering pings, or not even that):
    40 reads with a 1 s deadline; at least 38 succeed, and the stalled node's
    breaker and latency say what happened."""
    network.handlers["good:1"] = echo
    network.handlers["stalled:2"] = never_answer
    if not pings:
        network.muted.add("stalled:2")  # a SIGSTOPped process answers nothing
    async with qdb_client.open_client(
        ["good:1", "stalled:2"], load_balancing=policy, **EXACT
    ) as client:
        outcomes = await _reads(client, 40, concurrent=concurrent)
        succeeded = [o for o in outcomes if isinstance(o, dict)]
        assert len(succeeded) >= 38, [o for o in outcomes if not isinstance(o, dict)]
        stalled = node_stats(client, "stalled:2")
        good = node_stats(client, "good:1")
        assert stalled["breaker"]["failed_requests"] >= 1
        assert stalled["latency_ewma"] >= 0.25 > good["latency_ewma"]
        assert client.statistics()["attempt_timeouts"] >= 1


async def test_2_attempt_timeout_follows_the_nodes_reply_time_with_a_floor(
    network: FakeNetwork, autojump_clock
):
    """A node that answers in 0.4 s is slow, not stalled: its attempts get
    3 x its reply-time quantile, so they are not cut off at the 0.25 s floor."""
    calls: list[float] = []

    async def slow(node: FakeNode, request: Request) -> None:
        calls.append(trio.current_time())
        await trio.sleep(0.4)
        await echo(node, request)

    network.handlers["slow:1"] = slow
    network.handlers["other:2"] = slow
    async with qdb_client.open_client(["slow:1", "other:2"], **EXACT) as client:
        # First attempts ever: no reply time known, so the floor applies and
        # both nodes time out once; the last node left gets the whole deadline.
        await client._call("query", {}, 5.0, read_only=True)
        for _ in range(6):
            started = trio.current_time()
            await client._call("query", {}, 5.0, read_only=True)
            assert trio.current_time() - started == pytest.approx(0.4)
        assert client.statistics()["attempt_timeouts"] == 1


async def test_2_the_last_node_left_waits_the_whole_deadline(network: FakeNetwork, autojump_clock):
    """With no other node to go to, an attempt is not cut short: a slow answer
    within the deadline still arrives."""

    async def slow(node: FakeNode, request: Request) -> None:
        await trio.sleep(2.0)
        await echo(node, request)

    network.handlers["only:1"] = slow
    async with qdb_client.open_client("only:1", **EXACT) as client:
        started = trio.current_time()
        await client._call("query", {}, 3.0, read_only=True)
        assert trio.current_time() - started == pytest.approx(2.0)
        assert client.statistics()["attempt_timeouts"] == 0


async def test_2_an_unkeyed_write_gets_no_attempt_timeout(network: FakeNetwork, autojump_clock):
    """A write without a key can't be repeated, so it waits for its reply."""

    async def slow(node: FakeNode, request: Request) -> None:
        await trio.sleep(1.5)
        await answer(node, request)

    network.handlers["a:1"] = slow
    network.handlers["b:2"] = slow
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        started = trio.current_time()
        await client.execute("insert into t values (1)", idempotency_key=False, timeout=3.0)
        assert trio.current_time() - started == pytest.approx(1.5)
        assert client.statistics()["attempt_timeouts"] == 0


# ------------------------------------- 3. one reset is one failure of the node


async def test_3_one_reset_with_many_in_flight_is_one_breaker_failure(
    network: FakeNetwork, autojump_clock
):
    """A reset fails 8 requests in flight on one connection: one failure for
    the breaker (which stays CLOSED, threshold 5), and every read is retried."""
    first_connection: list[FakeNode] = []

    async def reset_after_eight(node: FakeNode, request: Request) -> None:
        if not first_connection:
            first_connection.append(node)
        if node is first_connection[0]:
            if request.request_id >= 8:
                await node.stream.aclose()
            return  # the first connection never answers: 8 requests pile up
        await echo(node, request)

    network.handlers["a:1"] = reset_after_eight
    network.handlers["b:2"] = echo
    async with qdb_client.open_client(
        ["a:1", "b:2"], load_balancing="latency_aware", **EXACT
    ) as client:
        client.mark_node_unhealthy("b:2")  # everything goes to a:1 first
        results: list[object] = []

        async def read() -> None:
            results.append(await client._call("query", {}, 10.0, read_only=True))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            client.mark_node_healthy("b:2")
        assert len(results) == 8
        breaker = node_stats(client, "a:1")["breaker"]
        assert breaker["current_state"] == "CLOSED"
        assert breaker["failed_requests"] == 8  # all counted in the metrics...
        assert client._cluster.find("a:1").breaker._consecutive_failures == 1  # ...once


async def test_3_an_answered_heartbeat_lets_a_breaker_opened_by_resets_probe(
    network: FakeNetwork, autojump_clock
):
    """Five resets in a row open the breaker; the node still answers pings, so
    the next heartbeat moves the breaker to HALF_OPEN instead of 30 s OPEN."""
    resets = 0

    async def reset_five_times(node: FakeNode, request: Request) -> None:
        nonlocal resets
        if resets < 5:
            resets += 1
            await node.stream.aclose()
            return
        await echo(node, request)

    network.handlers["a:1"] = reset_five_times
    network.handlers["b:2"] = echo
    options = dict(EXACT, heartbeat_interval=2.0, breaker_open_timeout=30.0, max_retries=0)
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        a = client._cluster.find("a:1")
        for _ in range(5):
            a.breaker.record_failure(trio.current_time(), cause="connection", correlation=object())
        assert a.breaker.state(trio.current_time()).value == "OPEN"
        assert a.breaker.opened_by == frozenset({"connection"})
        opened = trio.current_time()
        while a.breaker.state(trio.current_time()).value == "OPEN":  # noqa: ASYNC110
            await trio.sleep(0.1)  # virtual time: polls the pure breaker
        assert trio.current_time() - opened <= 2.0 + 0.2  # one heartbeat, not 30 s
        assert a.breaker.state(trio.current_time()).value == "HALF_OPEN"


async def test_3_an_answered_heartbeat_does_not_reopen_a_stalled_nodes_breaker(
    network: FakeNetwork, autojump_clock
):
    """Opened by silence, a breaker waits out its timeout: answering pings proves
    nothing about a node that doesn't answer queries."""
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = echo
    options = dict(EXACT, heartbeat_interval=2.0, breaker_open_timeout=30.0)
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        a = client._cluster.find("a:1")
        for _ in range(5):
            a.breaker.record_failure(trio.current_time(), cause="slow")
        await trio.sleep(10.0)
        assert a.breaker.state(trio.current_time()).value == "OPEN"


async def test_3_with_a_healthy_node_reads_and_keyed_writes_see_no_circuit_open(
    network: FakeNetwork, autojump_clock
):
    """One node's breaker is open: reads and keyed writes go to the other node."""
    network.handlers["a:1"] = answer
    network.handlers["b:2"] = answer
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        a = client._cluster.find("a:1")
        for _ in range(5):
            a.breaker.record_failure(trio.current_time(), cause="overload")
        for _ in range(10):
            await client._call("query", {}, None, read_only=True)
            await client.execute("insert into t values (1)")
        assert node_stats(client, "a:1")["requests_sent"] == 0


# ------------------------- 4. a write that was applied is never CircuitOpen


async def test_4_keyed_write_whose_retry_meets_an_open_breaker_says_it_may_be_applied(
    network: FakeNetwork, autojump_clock
):
    """The reply of a keyed write is lost and the loss opens the only node's
    breaker: the error is not CircuitOpen ("not sent") but says the write may
    have been applied and carries the key, so calling again with it is safe."""
    seen: list[str | None] = []

    async def drop_first(node: FakeNode, request: Request) -> None:
        seen.append(request.idempotency_key)
        if len(seen) == 1:
            await node.stream.aclose()  # applied, reply lost
        else:
            await answer(node, request)

    network.handlers["a:1"] = drop_first
    network.muted.add("a:1")  # no PONG: nothing proves the node reachable again
    options = dict(EXACT, breaker_failure_threshold=1, breaker_open_timeout=30.0)
    async with qdb_client.open_client("a:1", **options) as client:
        with pytest.raises(RetryExhausted) as info:
            await client.execute("insert into t values (1)", timeout=2.0)
        error = info.value
        assert not isinstance(error, CircuitOpen)
        assert isinstance(error.last_error, CircuitOpen)
        assert error.request_sent and error.maybe_applied
        assert error.idempotency_key is not None and error.idempotency_key == seen[0]
        assert error.attempts[0].sent and error.attempts[0].maybe_applied
        assert isinstance(error.attempts[0], qdb_client.Attempt)
        network.muted.discard("a:1")
        while node_stats(client, "a:1")["state"] != "UP":  # noqa: ASYNC110 - virtual time
            await trio.sleep(0.5)
        await trio.sleep(31.0)
        await client.execute("insert into t values (1)", idempotency_key=error.idempotency_key)
        assert seen == [error.idempotency_key, error.idempotency_key]


async def test_4_a_lost_reply_that_opens_the_breaker_of_a_reachable_node_is_retried(
    network: FakeNetwork, autojump_clock
):
    """The same loss on a node that answers pings: the probe after the loss
    proves it reachable, its breaker half-opens, and the keyed write is retried
    there with its key and succeeds (applied once, by the node's dedup)."""
    seen: list[str | None] = []

    async def drop_first(node: FakeNode, request: Request) -> None:
        seen.append(request.idempotency_key)
        if len(seen) == 1:
            await node.stream.aclose()
        else:
            await answer(node, request)

    network.handlers["a:1"] = drop_first
    options = dict(EXACT, breaker_failure_threshold=1, breaker_open_timeout=30.0)
    async with qdb_client.open_client("a:1", **options) as client:
        started = trio.current_time()
        await client.execute("insert into t values (1)", timeout=2.0)
        assert trio.current_time() - started < 1.0
        assert len(seen) == 2 and seen[0] == seen[1]


async def test_4_every_error_of_a_read_says_nothing_was_applied(
    network: FakeNetwork, autojump_clock
):
    network.handlers["a:1"] = never_answer
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(RequestTimeout) as info:
            await client.query("select 1", timeout=1.0)
        assert info.value.request_sent and not info.value.maybe_applied
        assert info.value.idempotency_key is None


async def test_4_keyed_writes_interrupted_by_a_connection_loss_all_succeed(
    network: FakeNetwork, autojump_clock
):
    """8 keyed writes in flight when the node drops their connection: one
    failure for the breaker, not 8, so all 8 are retried on a new connection to
    the same (healthy) node with their keys, and succeed."""
    first: list[FakeNode] = []
    keys: list[str] = []

    async def drop_after_eight(node: FakeNode, request: Request) -> None:
        keys.append(request.idempotency_key or "")
        if not first:
            first.append(node)
        if node is first[0]:
            if len(keys) == 8:
                await node.stream.aclose()
            return
        await answer(node, request)

    network.handlers["a:1"] = drop_after_eight
    async with qdb_client.open_client("a:1", **EXACT) as client:
        done: list[object] = []

        async def write(n: int) -> None:
            done.append(await client.execute(f"insert into t values ({n})", timeout=10.0))

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(write, n)
        assert len(done) == 8
        assert len(set(keys[:8])) == 8 and sorted(keys[8:]) == sorted(keys[:8])
        assert node_stats(client, "a:1")["breaker"]["current_state"] == "CLOSED"


# ------------------------------------------------------ 6. smaller defects


async def test_6_version_mismatch_and_handshake_errors_are_not_retried(network, autojump_clock):
    """Their classes say not retryable; the retry policy agrees."""
    from qdb_client._policies import RetryPolicy, classify

    policy = RetryPolicy()
    for error in (
        VersionMismatch("no common version", supported_versions=[9]),
        HandshakeError("bad welcome"),
    ):
        decision = policy.decide(
            0,
            classify(error, sent=False),
            idempotent=True,
            remaining=5.0,
            rng=__import__("random").Random(1),
            error=error,
        )
        assert not decision.retry and "not retryable" in decision.reason
        assert type(error).retryable is False


async def test_6_goaway_drain_requeues_without_breaker_failure_or_retry(
    network: FakeNetwork, autojump_clock
):
    """GOAWAY with a last request id below an in-flight request: that request is
    sent again at once on a new connection, as if nothing happened; it is no
    retry and no failure of the node."""
    connections: list[FakeNode] = []

    async def goaway_once(node: FakeNode, request: Request) -> None:
        if node not in connections:
            connections.append(node)
        if node is connections[0]:
            await node.send(GoAway("max_lifetime", request.request_id - 1))
            return
        await answer(node, request)

    network.handlers["a:1"] = goaway_once
    async with qdb_client.open_client("a:1", **EXACT) as client:
        started = trio.current_time()
        await client.execute("insert into t values (1)")
        assert trio.current_time() == started  # no backoff
        stats = client.statistics()
        assert stats["retries"] == 0 and stats["requeues"] == 1
        breaker = node_stats(client, "a:1")["breaker"]
        assert breaker["failed_requests"] == 0
        assert node_stats(client, "a:1")["state"] == "UP"


async def test_6_departed_members_are_forgotten_and_the_member_list_is_capped(
    network: FakeNetwork, autojump_clock
):
    """Announced members join; one that no WELCOME names any more and that stays
    DOWN is forgotten after forget_members_after; announcements beyond
    max_members are skipped."""
    network.handlers["a:1"] = echo
    network.handlers["gone:9"] = "refuse"
    network.members = (
        Member("fake-gone:9", "gone:9"),
        *(Member(f"n{i}", f"n{i}:1") for i in range(20)),
    )
    options = dict(EXACT, max_members=5, forget_members_after=30.0)
    async with qdb_client.open_client("a:1", **options) as client:
        await trio.testing.wait_all_tasks_blocked()
        stats = client.statistics()
        assert len(stats["nodes"]) == 5
        assert stats["members_skipped"] == 17  # 21 announced, 4 taken
        assert "gone:9" in {n["address"] for n in stats["nodes"]}
        network.members = ()  # the cluster no longer announces anyone
        client._cluster.find("a:1").pool.retire(client._cluster.find("a:1").pool.connections()[0])
        await client._call("query", {}, None, read_only=True)  # a new WELCOME, without members
        await trio.sleep(120.0)
        addresses = {n["address"] for n in client.statistics()["nodes"]}
        assert addresses == {"a:1"}
        assert client.statistics()["members_forgotten"] == 4


async def test_6_configured_hosts_are_never_forgotten(network: FakeNetwork, autojump_clock):
    network.handlers["a:1"] = echo
    network.handlers["b:2"] = "refuse"
    async with qdb_client.open_client(["a:1", "b:2"], forget_members_after=1.0, **EXACT) as client:
        await trio.sleep(300.0)
        assert {n["address"] for n in client.statistics()["nodes"]} == {"a:1", "b:2"}


async def test_6_connection_losses_carry_their_connection_as_failure_id(
    network: FakeNetwork, autojump_clock
):
    """Every request one connection's death failed carries the same failure id."""
    network.handlers["a:1"] = never_answer
    async with qdb_client.open_client("a:1", **EXACT) as client:
        connection = client._cluster.find("a:1").pool.connections()[0]
        pendings = []
        for n in range(3):
            connection.reserve()
            pendings.append(connection.send_reserved("execute", {"n": n}))
        await trio.testing.wait_all_tasks_blocked()
        await network.nodes_at("a:1")[0].stream.aclose()
        ids = set()
        for pending in pendings:
            with pytest.raises(ConnectionLost) as info:
                await pending.wait()
            ids.add(info.value.failure_id)
        assert ids == {connection.serial}


# ------------------------------------------- findings of the soak (seeds 3, 11, 551045)


async def test_a_node_that_never_completes_a_connection_costs_one_attempt_timeout(
    network: FakeNetwork, autojump_clock
):
    """A node accepts connections but never answers the handshake (a black hole):
    an attempt waiting for its connection is cut at the attempt timeout and the
    request, never sent, goes to the other node (an unkeyed write too)."""
    network.handlers["good:1"] = answer
    network.handlers["hole:2"] = answer
    async with qdb_client.open_client(["good:1", "hole:2"], min_connections=0, **EXACT) as client:
        network.handlers["hole:2"] = "hang"
        hole = client._cluster.find("hole:2")
        for connection in hole.pool.connections():
            hole.pool.retire(connection)
        for _ in range(6):
            started = trio.current_time()
            await client.execute("insert into t values (1)", idempotency_key=False, timeout=2.0)
            assert trio.current_time() - started <= 0.25 + 1e-9


async def test_a_node_that_slows_by_degrees_is_judged_beside_the_others(
    network: FakeNetwork, autojump_clock
):
    """Node b's replies slow from 10 ms to 1.5 s while a stays at 10 ms: b's attempt
    timeout is capped by a's reply time (3 x 2 x a's quantile, floor 0.25 s), so reads
    that land on b move to a after 0.25 s instead of waiting b's own growing timeout."""
    delays = {"a:1": 0.01, "b:2": 0.01}

    async def serve(node: FakeNode, request: Request) -> None:
        await trio.sleep(delays[node.node_id.removeprefix("fake-")])
        await echo(node, request)

    network.handlers["a:1"] = serve
    network.handlers["b:2"] = serve
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        for delay in (0.05, 0.1, 0.2, 0.4, 0.8, 1.5):
            delays["b:2"] = delay
            for _ in range(4):
                await client._call("query", {}, 5.0, read_only=True)
        b = client._cluster.find("b:2")
        assert b.latency.reply_quantile is not None and b.latency.reply_quantile < 1.0
        slowest = 0.0
        for _ in range(10):
            started = trio.current_time()
            await client._call("query", {}, 5.0, read_only=True)
            slowest = max(slowest, trio.current_time() - started)
        assert slowest <= 0.25 + 0.01 + 1e-9  # at worst one cut attempt on b, then a


async def test_a_half_open_breaker_with_its_probe_out_makes_callers_wait_not_fail(
    network: FakeNetwork, autojump_clock
):
    """The only node is HALF_OPEN and its one probe is in flight: other calls wait
    for the probe (within node_selection_timeout) instead of failing at once with
    CircuitOpen ("reopens in 0.00 s")."""
    release = trio.Event()

    async def slow_first(node: FakeNode, request: Request) -> None:
        await release.wait()
        await echo(node, request)

    network.handlers["a:1"] = slow_first
    options = dict(EXACT, breaker_failure_threshold=1, breaker_success_threshold=1)
    async with qdb_client.open_client("a:1", **options) as client:
        breaker = client._cluster.find("a:1").breaker
        now = trio.current_time()
        breaker.record_failure(now, cause="overload")
        breaker.probe_now(now)
        results: list[object] = []

        async def read() -> None:
            results.append(await client._call("query", {}, 5.0, read_only=True))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)  # the probe
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(read)  # waits for the probe's outcome
            await trio.sleep(0.5)
            release.set()
        assert len(results) == 2
        assert breaker.state(trio.current_time()).value == "CLOSED"
