"""Idempotency keys on the test node over loopback TCP (docs/protocol.md section 8.5).

Keyed writes run at most once per key, across the nodes sharing one
database file; a reused key with another request is CONFLICT; failures
store nothing; entries expire after the TTL. ``drop_after_commit`` loses
the reply of a committed write, which is what a retry with the same key
must survive (reliability seed 003, idempotency section), on in-process
nodes and on node processes sharing the file. Also: a reply too large for
the client's HELLO ``max_frame`` is FRAME_TOO_LARGE for that request only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import qdb_client
from qdb_client.protocol import Error, Response
from qdb_client.testing import QdbNode, TestCluster, open_node, open_node_control

from ..common.fixtures import node_config, node_rows
from ..common.raw_client import RawClient, raw_client

Pair = tuple[QdbNode, QdbNode]
ENDLESS = "with recursive r(n) as (select 1 union all select n + 1 from r)"
CLIENT_OPTIONS: dict[str, Any] = {"heartbeat_interval": 60.0, "slow_start": 0.0, "random_seed": 7}


def insert(x: Any) -> dict[str, Any]:
    return {"sql": "insert into t(x) values (?)", "params": [x]}


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """Two nodes sharing one database file, which has ``t(id integer primary key, x)``."""
    async with open_node(node_config(tmp_path)) as a, open_node(node_config(tmp_path)) as b:
        async with raw_client(a.address) as client:
            await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
        yield a, b


async def rows(address: str, sql: str, params: Any = None) -> list[list[Any]]:
    async with raw_client(address) as client:
        return (await client.call("query", {"sql": sql, "params": params}))["rows"]


async def count(address: str, x: Any = None) -> int:
    if x is None:
        return (await rows(address, "select count(*) from t"))[0][0]
    return (await rows(address, "select count(*) from t where x = ?", [x]))[0][0]


async def stored_keys(node: QdbNode) -> list[str]:
    await trio.lowlevel.checkpoint()
    return [r[0] for r in node_rows(node, "select key from qdb_idempotency order by key")]


def total(nodes: Pair | tuple[QdbNode, ...], counter: str) -> int:
    return sum(node.statistics()[counter] for node in nodes)


def assert_error(reply: Response | Error, name: str) -> Error:
    assert isinstance(reply, Error), reply
    assert reply.name == name, reply
    return reply


# ------------------------------------------------------------- exactly once


async def test_same_key_twice_executes_once_and_returns_the_same_result(pair: Pair):
    a, _ = pair
    async with raw_client(a.address) as client:
        first = await client.call("execute", insert(1), idempotency_key="k-1")
        again = await client.call("execute", insert(1), idempotency_key="k-1")
    assert first == again == {"rows_affected": 1, "last_insert_id": 1}
    assert await count(a.address, 1) == 1
    stats = a.statistics()
    assert (stats["idempotent_stored"], stats["idempotent_hits"]) == (1, 1)
    assert stats["idempotent_conflicts"] == 0
    # Without a key the same write runs every time.
    async with raw_client(a.address) as client:
        await client.call("execute", insert(2))
        await client.call("execute", insert(2))
    assert await count(a.address, 2) == 2
    assert a.statistics()["idempotent_stored"] == 1


async def test_the_other_node_replays_a_key_stored_through_the_first(pair: Pair):
    a, b = pair
    batch = {
        "statements": [
            {"sql": "insert into t(x) values (?)", "params": [10]},
            {"sql": "update t set x = x + 1 where x = :x", "params": {"x": 10}},
        ]
    }
    async with raw_client(a.address) as on_a, raw_client(b.address) as on_b:
        first = await on_a.call("execute", insert(1), idempotency_key="order-42:v1")
        assert await on_b.call("execute", insert(1), idempotency_key="order-42:v1") == first
        first_batch = await on_a.call("batch", batch, idempotency_key="batch.1")
        assert await on_b.call("batch", batch, idempotency_key="batch.1") == first_batch
    assert first_batch == {
        "results": [
            {"rows_affected": 1, "last_insert_id": 2},
            {"rows_affected": 1, "last_insert_id": None},
        ]
    }
    assert await rows(a.address, "select x from t order by id") == [[1], [11]]
    assert (a.statistics()["idempotent_stored"], a.statistics()["idempotent_hits"]) == (2, 0)
    assert (b.statistics()["idempotent_stored"], b.statistics()["idempotent_hits"]) == (0, 2)
    assert await stored_keys(b) == ["batch.1", "order-42:v1"]


async def test_same_key_with_another_request_is_conflict_and_runs_nothing(pair: Pair):
    a, b = pair
    named = {"sql": "insert into t(x) values (:a + :b)"}
    async with raw_client(a.address) as on_a, raw_client(b.address) as on_b:
        await on_a.call("execute", insert(1), idempotency_key="k")
        others = [
            ("execute", insert(2)),  # other params
            ("execute", {"sql": "insert into t(x) values (1)"}),  # other SQL
            ("batch", {"statements": [insert(1)]}),  # other method
        ]
        for method, args in others:
            error = assert_error(await on_b.request(method, args, idempotency_key="k"), "CONFLICT")
            assert error.code == 409 and error.retryable is False
            assert error.message == "idempotency key reused for a different request"
        # Named parameters are compared as a map: their order does not matter.
        await on_a.call("execute", {**named, "params": {"a": 1, "b": 2}}, idempotency_key="n")
        await on_b.call("execute", {**named, "params": {"b": 2, "a": 1}}, idempotency_key="n")
    assert await rows(a.address, "select x from t order by id") == [[1], [3]]
    assert total(pair, "idempotent_conflicts") == 3
    assert b.statistics()["errors_sent"] == {"CONFLICT": 3}
    assert (total(pair, "idempotent_stored"), total(pair, "idempotent_hits")) == (2, 1)


async def test_five_concurrent_calls_with_one_key_on_two_nodes_execute_once(pair: Pair):
    a, b = pair
    # 20 000 rows: long enough that the five transactions really contend for the lock.
    bulk = {"sql": f"insert into t(x) {ENDLESS} select n from r limit 20000"}
    results: list[Any] = []
    clients = [await RawClient.connect((a, b)[i % 2].address) for i in range(5)]
    try:
        for client in clients:
            await client.handshake()

        async def call(client: RawClient) -> None:
            results.append(await client.call("execute", bulk, idempotency_key="concurrent"))

        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(call, client)
    finally:
        for client in clients:
            await client.aclose()
    assert len(results) == 5
    assert all(result == results[0] for result in results)
    assert results[0] == {"rows_affected": 20000, "last_insert_id": 20000}
    assert await count(a.address) == 20000
    assert total(pair, "idempotent_stored") == 1
    assert total(pair, "idempotent_hits") == 4


async def test_keys_are_scoped_to_the_authenticated_user(tmp_path: Path):
    users = {"alice": "a-pw", "bob": "b-pw"}
    async with open_node(node_config(tmp_path, credentials=users)) as node:
        async with raw_client(node.address, handshake=False) as alice:
            await alice.handshake(credentials={"user": "alice", "password": "a-pw"})
            await alice.call("execute", {"sql": "create table t(x)"})
            await alice.call("execute", insert(1), idempotency_key="k")
            async with raw_client(node.address, handshake=False) as bob:
                await bob.handshake(credentials={"user": "bob", "password": "b-pw"})
                await bob.call("execute", insert(2), idempotency_key="k")  # bob's own "k"
                await bob.call("execute", insert(2), idempotency_key="k")
            await alice.call("execute", insert(1), idempotency_key="k")
            assert (await alice.call("query", {"sql": "select x from t"}))["rows"] == [[1], [2]]
        stats = node.statistics()
        assert (stats["idempotent_stored"], stats["idempotent_hits"]) == (2, 2)


# --------------------------------------------------------- malformed keys


@pytest.mark.parametrize("key", ["has space", "k" * 129, "", "ключ", "a/b", "tab\tkey"], ids=repr)
async def test_malformed_key_is_invalid_request_and_nothing_runs(node: QdbNode, key: str):
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "create table t(x)"})
        for method, args in [("execute", insert(1)), ("batch", {"statements": [insert(1)]})]:
            error = assert_error(
                await client.request(method, args, idempotency_key=key), "INVALID_REQUEST"
            )
            assert error.message.startswith("malformed idempotency key")
            assert error.code == 400 and error.retryable is False
        # Reads need no key: whatever is sent is ignored.
        assert (await client.call("query", {"sql": "select count(*) from t"}, idempotency_key=key))[
            "rows"
        ] == [[0]]
        assert await client.call("ping", idempotency_key=key) == {"node_id": node.node_id}
    assert node.statistics()["idempotent_stored"] == 0


async def test_longest_key_and_every_allowed_character_are_accepted(node: QdbNode):
    keys = ["k" * 128, "AZaz09_-:.", "x"]
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "create table t(x)"})
        for key in keys:
            await client.call("execute", insert(key), idempotency_key=key)
            await client.call("execute", insert(key), idempotency_key=key)
        assert (await client.call("query", {"sql": "select count(*) from t"}))["rows"] == [[3]]
    assert node.statistics()["idempotent_hits"] == 3


# ---------------------------------------------------------------- TTL


async def test_key_expires_after_the_ttl_and_the_write_runs_again(tmp_path: Path):
    now = [1_000_000.0]
    async with open_node(node_config(tmp_path, idempotency_ttl=60.0)) as node:
        node.storage.clock = lambda: now[0]
        async with raw_client(node.address) as client:
            await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
            first = await client.call("execute", insert(1), idempotency_key="ttl")
            await client.call("execute", insert(2), idempotency_key="other")
            now[0] += 59.9
            assert await client.call("execute", insert(1), idempotency_key="ttl") == first
            now[0] += 0.1  # 60 s after the first execution: expired
            second = await client.call("execute", insert(1), idempotency_key="ttl")
            assert second == {"rows_affected": 1, "last_insert_id": 3} != first
            # The re-execution stored a fresh entry; "other" expired and was purged.
            assert await client.call("execute", insert(1), idempotency_key="ttl") == second
            assert (await client.call("query", {"sql": "select x from t"}))["rows"] == [
                [1],
                [2],
                [1],
            ]
            stored = node_rows(node, "select key, created_at from qdb_idempotency")
            assert stored == [["ttl", 1_000_060.0]]
    stats = node.statistics()
    assert (stats["idempotent_stored"], stats["idempotent_hits"]) == (3, 2)


# ------------------------------------------------------------ failures


async def test_failed_keyed_write_stores_nothing_and_the_key_works_later(pair: Pair):
    a, b = pair
    async with raw_client(a.address) as on_a, raw_client(b.address) as on_b:
        await on_a.call("execute", {"sql": "create table u(x unique)"})
        await on_a.call("execute", {"sql": "insert into u values (1)"})
        write = {"sql": "insert into u values (?)", "params": [1]}
        for client in (on_a, on_b):  # the failure repeats: nothing was stored
            assert_error(
                await client.request("execute", write, idempotency_key="u-1"),
                "CONSTRAINT_VIOLATION",
            )
        failing_batch = {"statements": [insert(5), write]}
        error = assert_error(
            await on_a.request("batch", failing_batch, idempotency_key="u-2"),
            "CONSTRAINT_VIOLATION",
        )
        assert error.details["statement_index"] == 1
        assert await stored_keys(a) == []
        assert await count(a.address) == 0  # the batch's first insert was rolled back
        await on_a.call("execute", {"sql": "delete from u"})
        result = await on_b.call("execute", write, idempotency_key="u-1")
        assert await on_a.call("execute", write, idempotency_key="u-1") == result
        # u-2 was never stored either, so another request may use it now.
        await on_a.call("batch", {"statements": [insert(5)]}, idempotency_key="u-2")
    assert await stored_keys(a) == ["u-1", "u-2"]
    assert total(pair, "idempotent_stored") == 2
    assert total(pair, "idempotent_hits") == 1
    assert total(pair, "idempotent_conflicts") == 0


async def test_deadline_interrupt_of_a_keyed_write_applies_and_stores_nothing(pair: Pair):
    a, _ = pair
    endless_insert = {"sql": f"insert into t(x) {ENDLESS} select n from r limit 100000000"}
    async with raw_client(a.address) as client:
        start = trio.current_time()
        reply = await client.request(
            "execute", endless_insert, idempotency_key="slow", deadline_ms=200
        )
        error = assert_error(reply, "TIMEOUT")
        assert error.details["executed"] is False
        reply = await client.request(
            "batch",
            {"statements": [insert(1), endless_insert]},
            idempotency_key="slow-batch",
            deadline_ms=200,
        )
        error = assert_error(reply, "TIMEOUT")
        assert error.details["executed"] is False and error.details["statement_index"] == 1
        assert trio.current_time() - start < 3.0
        assert await count(a.address) == 0
        assert await stored_keys(a) == []
        # Nothing was stored under the key: a retry executes (here a quick one).
        await client.call("execute", insert(1), idempotency_key="slow")
    assert await count(a.address) == 1
    assert a.statistics()["idempotent_stored"] == 1


# ------------------------------------------------------ drop_after_commit


async def test_drop_after_commit_then_the_same_key_on_the_other_node_gets_the_result(pair: Pair):
    a, b = pair
    async with open_node_control(a.address) as ctl:
        described = await ctl.drop_after_commit(1)
        assert described["drop_after_commit"] == {"remaining": 1, "methods": ["batch", "execute"]}
    async with raw_client(a.address) as client:
        await client.call("query", {"sql": "select 1"})  # reads are not affected
        await client.send_request("execute", insert(42), idempotency_key="lost-reply")
        with pytest.raises(EOFError):
            await client.receive()
    assert a.faults.describe()["drop_after_commit"]["remaining"] == 0
    assert await count(b.address, 42) == 1  # committed although the reply was lost
    async with raw_client(b.address) as client:
        result = await client.call("execute", insert(42), idempotency_key="lost-reply")
    [[row_id]] = await rows(b.address, "select id from t where x = 42")
    assert result == {"rows_affected": 1, "last_insert_id": row_id}
    assert await count(b.address, 42) == 1
    assert a.statistics()["idempotent_stored"] == 1
    assert b.statistics()["idempotent_hits"] == 1


async def test_drop_after_commit_is_limited_to_its_methods_and_cleared_by_reset(node: QdbNode):
    async with open_node_control(node.address) as ctl:
        await ctl.drop_after_commit(2, methods=["batch"])
        async with raw_client(node.address) as client:
            await client.call("execute", {"sql": "create table t(x)"})  # not a batch
            await client.send_request("batch", {"statements": [insert(1)]})
            with pytest.raises(EOFError):
                await client.receive()
        assert (await ctl.stats())["faults"]["drop_after_commit"]["remaining"] == 1
        await ctl.reset()
        assert (await ctl.stats())["faults"]["drop_after_commit"] == {
            "remaining": 0,
            "methods": ["batch", "execute"],
        }
        async with raw_client(node.address) as client:
            await client.call("batch", {"statements": [insert(2)]})
            assert (await client.call("query", {"sql": "select x from t"}))["rows"] == [[1], [2]]


async def test_driver_retries_a_write_whose_reply_was_lost_and_it_applies_once(pair: Pair):
    a, b = pair
    a.faults.drop_after_commit(1)
    async with open_node_control(b.address) as ctl:
        await ctl.drop_after_commit(1)
    async with qdb_client.open_client([a.address, b.address], **CLIENT_OPTIONS) as client:
        result = await client.execute("insert into t(x) values (?)", [7])
        assert result.rows_affected == 1
        assert (await client.query("select id from t where x = 7")).rows == [
            [result.last_insert_id]
        ]
    assert await count(a.address, 7) == 1
    assert total(pair, "idempotent_hits") == 1
    assert total(pair, "idempotent_stored") == 1
    # Exactly one node lost a reply; the replay was answered, not dropped.
    remaining = [n.faults.describe()["drop_after_commit"]["remaining"] for n in pair]
    assert sorted(remaining) == [0, 1]


async def test_driver_write_without_a_key_has_an_unknown_outcome_after_a_lost_reply(pair: Pair):
    a, b = pair
    for node in pair:
        node.faults.drop_after_commit(1)
    async with qdb_client.open_client([a.address, b.address], **CLIENT_OPTIONS) as client:
        with pytest.raises(qdb_client.OutcomeUnknown):
            await client.execute("insert into t(x) values (8)", idempotency_key=False)
    assert await count(a.address, 8) == 1  # it did run, once; nobody retried it
    assert total(pair, "idempotent_stored") == 0


# ---------------------------------------------------------- result size


async def test_result_above_the_clients_max_frame_is_frame_too_large_for_that_request(
    node: QdbNode,
):
    client = await RawClient.connect(node.address)
    try:
        await client.handshake(max_frame_size=64 * 1024)
        big = f"{ENDLESS} select n, 'padding-padding' from r limit 10000"
        error = assert_error(await client.request("query", {"sql": big}), "FRAME_TOO_LARGE")
        assert error.code == 413 and error.retryable is False
        # The node stops fetching once the result is past the limit: frame_size is
        # what it had counted by then (so at least that much), nothing more was held.
        size = error.details["frame_size"]
        assert size > 64 * 1024 and error.details["max_frame"] == 64 * 1024
        assert error.message == (
            f"result of more than {size} bytes exceeds the client's maximum frame of"
            " 65536 bytes; use a LIMIT or a result stream"
        )
        # The same connection goes on serving, results just under the limit included.
        assert (await client.call("query", {"sql": "select 2"}))["rows"] == [[2]]
        fits = await client.call("query", {"sql": f"{ENDLESS} select n from r limit 5000"})
        assert len(fits["rows"]) == 5000
    finally:
        await client.aclose()
    assert node.statistics()["errors_sent"] == {"FRAME_TOO_LARGE": 1}


# ------------------------------------------------------ separate processes


async def test_keys_are_shared_by_node_processes_and_survive_a_lost_reply():
    async with TestCluster.start_subprocesses(n=2, idempotency_ttl=600.0) as cluster:
        a, b = cluster.addresses
        async with raw_client(a) as client:
            await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
        bulk = {"sql": f"insert into t(x) {ENDLESS} select n from r limit 5000"}
        results: list[Any] = []

        async def call(address: str) -> None:
            async with raw_client(address) as client:
                results.append(await client.call("execute", bulk, idempotency_key="multi"))

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(call, (a, b)[i % 2])
        assert len(results) == 6 and all(result == results[0] for result in results)
        async with cluster.control(0) as ctl:
            await ctl.drop_after_commit(1)
        async with raw_client(a) as client:
            await client.send_request("execute", insert(-1), idempotency_key="lost")
            with pytest.raises(EOFError):
                await client.receive()
        async with raw_client(b) as client:
            assert (await client.call("execute", insert(-1), idempotency_key="lost"))[
                "rows_affected"
            ] == 1
        assert await count(a) == 5001
        stats = []
        for i in range(2):
            async with cluster.control(i) as ctl:
                stats.append(await ctl.stats())
        assert sum(s["idempotent_stored"] for s in stats) == 2
        assert sum(s["idempotent_hits"] for s in stats) == 6
