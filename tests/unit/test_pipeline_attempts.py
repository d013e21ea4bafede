"""Attempt timeouts, their errors and judgments, write truth, and probe accounting in the
pipeline (virtual time, scripted nodes)."""

from __future__ import annotations

import cbor2
import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import ProtocolError, QdbError, RetryExhausted
from qdb_client.protocol import Request

from .fake_network import FakeNetwork, echo, never_answer
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


async def test_attempt_timeout_on_the_last_allowed_attempt_raises_a_qdb_error(
    network: FakeNetwork, autojump_clock
):
    """A read whose last permitted attempt ends in an attempt timeout (no
    retries left) must raise RetryExhausted with a last_error, not a raw
    AssertionError from _final."""
    network.handlers["stalled:1"] = never_answer
    network.handlers["good:2"] = echo
    async with qdb_client.open_client(["stalled:1", "good:2"], max_retries=0, **EXACT) as client:
        with pytest.raises(QdbError) as info:
            await client._call("query", {}, 5.0, read_only=True)
        assert isinstance(info.value, RetryExhausted)
        assert info.value.last_error is not None


async def test_attempt_timeout_when_the_deadline_cannot_fit_a_retry_raises_a_qdb_error(
    network: FakeNetwork, autojump_clock
):
    """Same with the default retries: the attempt timeout (0.25 s floor) fires
    with 5 ms of a 0.255 s deadline left, too little for another attempt."""
    network.handlers["stalled:1"] = never_answer
    network.handlers["good:2"] = echo
    async with qdb_client.open_client(["stalled:1", "good:2"], **EXACT) as client:
        with pytest.raises(QdbError) as info:
            await client._call("query", {}, 0.255, read_only=True)
        assert info.value.attempts


async def test_attempt_timeout_of_a_frame_still_queued_behind_a_stalled_write_is_retried(
    network: FakeNetwork, autojump_clock, monkeypatch
):
    """A node that stops reading (SIGSTOPped, TCP window full): frames queue in
    the connection's outbox. When a read's attempt timeout fires while its
    frame is still queued, the call's deadline has NOT passed: it must be
    retried on the healthy node, not fail with RequestTimeout("not sent")
    after 0.25 s of a 5 s deadline."""
    from . import fake_network as fake_network_module
    from .fake_peer import stream_pair

    monkeypatch.setattr(fake_network_module, "stream_pair", lambda: stream_pair(lockstep=True))

    async def stop_reading(node: FakeNode, request: Request) -> None:
        await trio.sleep_forever()  # the serving loop no longer reads

    network.handlers["stalled:1"] = stop_reading
    network.handlers["good:2"] = echo
    async with qdb_client.open_client(["stalled:1", "good:2"], **EXACT) as client:
        outcomes: list[object] = []

        async def read() -> None:
            try:
                outcomes.append(await client._call("query", {}, 5.0, read_only=True))
            except QdbError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(read)
            # The stalled node's writer is now stuck in send_all: later frames
            # for that node wait in the outbox, unsent.
            for _wave in range(3):
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(4):
                    nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            stalled = client._cluster.find("stalled:1").pool.connections()[0]
            assert stalled._outbox, "precondition: a frame waits unsent in the outbox"
        failures = [o for o in outcomes if isinstance(o, QdbError)]
        assert not failures, [
            (type(f).__name__, str(f).splitlines()[0], f.attempts) for f in failures
        ]


async def test_deadline_before_the_write_releases_a_half_open_probe_once(
    network: FakeNetwork, autojump_clock
):
    """HALF_OPEN with 2 probes: probe B is on the node, probe A waits for a pool
    slot and its call deadline passes. A's probe slot must be released once,
    not twice (the pipeline feeds the breaker in the except branch and again
    after the scope), else a third concurrent probe is let through."""
    release = trio.Event()

    async def slow(node: FakeNode, request: Request) -> None:
        await release.wait()
        await echo(node, request)

    network.handlers["a:1"] = slow
    async with qdb_client.open_client(
        "a:1",
        max_connections=1,
        max_in_flight=1,
        breaker_failure_threshold=1,
        breaker_half_open_probes=2,
        **EXACT,
    ) as client:
        node = client._cluster.find("a:1")
        breaker = node.breaker
        now = trio.current_time()
        breaker.record_failure(now)  # threshold 1: OPEN
        breaker.probe_now(now)  # HALF_OPEN, 2 probes
        assert breaker.state(now).value == "HALF_OPEN"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._call, "query", {}, 30.0)  # probe B: holds the slot
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(qdb_client.errors.RequestTimeout):
                await client._call("query", {}, 1.0, read_only=True)  # probe A: waits, deadline
            # B is still a probe in flight: exactly one more may be admitted.
            now = trio.current_time()
            admitted = [breaker.allow(now), breaker.allow(now)]
            assert admitted == [True, False], breaker._probes
            release.set()


async def test_unkeyed_write_answered_internal_is_not_repeated_nor_called_unapplied(
    network: FakeNetwork, autojump_clock
):
    """protocol.md section 9: "Retryable ... does not say whether a failed write
    was applied (see details.executed)". The test node itself answers INTERNAL
    (500, retryable) for a committed write whose reply can't be encoded
    (testing/session.py _send_reply). An unkeyed write answered INTERNAL without
    details.executed=false must not be sent again (it may run twice), and if
    the call fails its error must say maybe_applied."""
    from qdb_client.protocol import ErrorCode

    executions: list[int] = []

    async def internal_after_commit(node: FakeNode, request: Request) -> None:
        executions.append(request.request_id)
        await node.fail(request, ErrorCode.INTERNAL, "the reply can't be encoded")

    network.handlers["a:1"] = internal_after_commit
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(QdbError) as info:
            await client.execute("insert into t values (1)", idempotency_key=False)
        assert len(executions) == 1, f"an unkeyed write was sent {len(executions)} times"
        assert info.value.maybe_applied


async def test_a_write_whose_reply_is_malformed_says_it_was_sent_and_may_be_applied(
    network: FakeNetwork, autojump_clock
):
    """The node executed the write and answered, but its result is malformed:
    ExecuteResult.from_wire raises ProtocolError outside the pipeline, so the
    error carries the defaults request_sent=False, maybe_applied=False, no
    attempts and no idempotency_key, although the write was applied."""

    async def bad_result(node: FakeNode, request: Request) -> None:
        await node.reply(request, {"rows_affected": "lots"})

    network.handlers["a:1"] = bad_result
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(QdbError) as info:
            await client.execute("insert into t values (1)", idempotency_key="order-1")
        error = info.value
        facts = (error.request_sent, error.maybe_applied, error.idempotency_key, error.attempts)
        assert facts[:3] == (True, True, "order-1"), (type(error).__name__, facts)


async def test_a_query_reply_whose_column_cannot_be_hashed_is_a_protocol_error(
    network: FakeNetwork, autojump_clock
):
    """A column name that is a tag around a list: hashing it (to find the shape
    among those seen before) raises RuntimeError, which once escaped
    client.query untyped instead of the ProtocolError of a malformed reply."""
    column = cbor2.CBORTag(4000, cbor2.CBORTag(262, b"[1]"))

    async def bad_columns(node: FakeNode, request: Request) -> None:
        await node.reply(request, {"columns": [column], "rows": []})

    network.handlers["a:1"] = bad_columns
    async with qdb_client.open_client("a:1", **{**EXACT, "max_retries": 0}) as client:
        with pytest.raises(RetryExhausted, match="corrupted reply") as info:
            await client.query("SELECT 1")
        assert isinstance(info.value.__cause__, ProtocolError)


async def test_a_stalled_node_under_load_spending_the_retry_budget_raises_qdb_errors_only(
    network: FakeNetwork, autojump_clock
):
    """The scenario the attempt timeouts were built for, with default settings:
    one of two nodes stalls under 400 concurrent reads. Once the retry budget
    (10/s x 10 s + 20%) is spent, an attempt timeout that may not be retried
    reaches _final's RetryExhausted branch with error=None: an AssertionError
    escapes the client call instead of a QdbError."""
    network.handlers["good:1"] = echo
    network.handlers["stalled:2"] = never_answer
    async with qdb_client.open_client(["good:1", "stalled:2"], **EXACT) as client:
        outcomes: list[object] = []

        async def read() -> None:
            try:
                outcomes.append(await client._call("query", {}, 1.0, read_only=True))
            except QdbError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(400):
                nursery.start_soon(read)
        assert len(outcomes) == 400


async def test_queries_slow_on_every_node_do_not_open_healthy_nodes_breakers(
    network: FakeNetwork, autojump_clock
):
    """Three healthy nodes answer light reads in 10 ms and a heavy report query
    in 1 s, every one of them. The attempt timeout is per node (3 x its light
    reply time, floor 0.25 s), so each heavy query times out on every node but
    the last one left and succeeds there: each success costs two healthy nodes
    a breaker failure (cause slow). Ten heavy queries, all successful, open
    two of the three breakers for 30 s, and the cluster runs on one node."""

    async def serve(node: FakeNode, request: Request) -> None:
        await trio.sleep(1.0 if request.args.get("heavy") else 0.01)
        await echo(node, request)

    for address in ("a:1", "b:2", "c:3"):
        network.handlers[address] = serve
    async with qdb_client.open_client(["a:1", "b:2", "c:3"], **EXACT) as client:
        for _ in range(30):
            await client._call("query", {}, 5.0, read_only=True)
        for _ in range(10):
            await client._call("query", {"heavy": True}, 5.0, read_only=True)
        states = {n["address"]: n["breaker"]["current_state"] for n in client.statistics()["nodes"]}
        assert set(states.values()) == {"CLOSED"}, states
