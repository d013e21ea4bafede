"""Transactions against real test nodes over loopback TCP (docs/protocol.md section 10.2).

The driver side is scripted in tests/unit/test_transactions.py; here the node
does its part for real: one SQLite connection per transaction, its write lock,
the commit stored under its key in the transaction itself, the fence that makes
a commit asked again elsewhere answer truthfully, and CAS / executemany.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import qdb_client
from qdb_client.errors import (
    Conflict,
    ConstraintViolation,
    OutcomeUnknown,
    ReadOnlyViolation,
    TransactionAborted,
    WriteConflict,
)
from qdb_client.protocol import Error, Response
from qdb_client.testing import FaultProxy, QdbNode, TestCluster, open_node

from ..common.fixtures import node_config, node_rows
from ..common.raw_client import raw_client

FAST = {"heartbeat_interval": 60.0, "slow_start": 0.0, "random_seed": 3}
PROXIED = {**FAST, "discover_members": False, "request_timeout": 2.0}


@asynccontextmanager
async def cluster_and_client(
    n: int = 3, **client_options: Any
) -> AsyncIterator[tuple[TestCluster, qdb_client.Client]]:
    async with (
        TestCluster.start_in_process(n) as cluster,
        qdb_client.open_client(cluster.addresses, **{**FAST, **client_options}) as client,
    ):
        await client.execute("CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER)")
        yield cluster, client


@asynccontextmanager
async def proxied(n: int) -> AsyncIterator[tuple[TestCluster, list[FaultProxy]]]:
    """``n`` in-process nodes on one database, each behind its own fault proxy."""
    async with TestCluster.start_in_process(n) as cluster, trio.open_nursery() as nursery:
        proxies = []
        for address in cluster.addresses:
            proxy = FaultProxy(address, seed=7)
            await nursery.start(proxy.serve)
            proxies.append(proxy)
        yield cluster, proxies
        nursery.cancel_scope.cancel()


async def count(client: qdb_client.Client, table: str = "acct") -> int:
    return (await client.query(f"SELECT count(*) FROM {table}")).scalar()


def totals(cluster: TestCluster, key: str) -> int:
    return sum(server.node.statistics()[key] for server in cluster.nodes if server.node)


def server_of(cluster: TestCluster, address: str) -> QdbNode:
    [node] = [s.node for s in cluster.nodes if s.address == address and s.node is not None]
    return node


class Boom(Exception):
    pass


# ------------------------------------------------------- commit and rollback


async def test_commit_rollback_and_an_exception_in_the_block_on_a_cluster():
    async with cluster_and_client() as (cluster, client):
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO acct VALUES (1, 10)")
            await tx.executemany("INSERT INTO acct VALUES (?, ?)", [[2, 20], [3, 30]])
            assert (await tx.query("SELECT sum(balance) FROM acct")).scalar() == 60
            assert await count(client) == 0  # other connections don't see it yet
        assert await count(client) == 3
        with pytest.raises(Boom):
            async with client.transaction() as tx:
                await tx.execute("UPDATE acct SET balance = 0")
                raise Boom
        assert (await client.query("SELECT sum(balance) FROM acct")).scalar() == 60
        assert totals(cluster, "transactions_committed") == 1
        assert totals(cluster, "transactions_rolled_back") == 1
        assert totals(cluster, "transactions_open") == 0


async def test_a_failing_statement_does_not_end_the_transaction():
    async with cluster_and_client() as (_, client):
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO acct VALUES (1, 10)")
            with pytest.raises(ConstraintViolation):
                await tx.execute("INSERT INTO acct VALUES (1, 11)")
            with pytest.raises(ConstraintViolation) as failed:
                await tx.batch(["INSERT INTO acct VALUES (2, 0)", "INSERT INTO acct VALUES (1, 0)"])
            assert failed.value.details["statement_index"] == 1
            await tx.execute("INSERT INTO acct VALUES (3, 30)")
        rows = (await client.query("SELECT id, balance FROM acct ORDER BY id")).rows
        assert [tuple(r) for r in rows] == [(1, 10), (3, 30)]  # the batch applied nothing


async def test_a_read_only_transaction_refuses_writes_and_goes_on():
    async with cluster_and_client() as (_, client):
        await client.execute("INSERT INTO acct VALUES (1, 10)")
        async with client.transaction(read_only=True) as tx:
            with pytest.raises(ReadOnlyViolation) as refused:
                await tx.execute("UPDATE acct SET balance = 0")
            assert refused.value.details["executed"] is False
            with pytest.raises(ReadOnlyViolation):
                await tx.executemany("INSERT INTO acct VALUES (?, ?)", [[2, 2]])
            assert (await tx.query("SELECT balance FROM acct")).scalar() == 10
            assert (await tx.execute("SELECT 7")).rows == [(7,)]
        assert (await client.query("SELECT balance FROM acct")).scalar() == 10


async def test_one_transaction_per_connection_and_unknown_ids_are_aborted(node: QdbNode):
    async with raw_client(node.address) as client, raw_client(node.address) as other:
        tx = (await client.call("begin", {}))["tx"]
        again = await client.request("begin", {})
        assert isinstance(again, Error) and again.name == "INVALID_REQUEST"
        elsewhere = await other.request("query", {"sql": "SELECT 1", "tx": tx})
        assert isinstance(elsewhere, Error) and elsewhere.name == "TX_ABORTED"
        assert elsewhere.details == {"executed": False, "reason": "unknown transaction"}
        assert await other.call("rollback", {"tx": tx}) == {"rolled_back": True}  # not its own
        keyless = await client.request("commit", {"tx": tx})
        assert isinstance(keyless, Error) and keyless.name == "INVALID_REQUEST"
        assert await client.call("rollback", {"tx": tx}) == {"rolled_back": True}
        assert await client.call("rollback", {"tx": tx}) == {"rolled_back": True}  # idempotent
        gone = await client.request("query", {"sql": "SELECT 1", "tx": tx})
        assert isinstance(gone, Error) and gone.details["reason"] == "rolled back"
    assert node.statistics()["transactions_open"] == 0


async def test_requests_of_a_transaction_run_in_the_order_they_arrived(node: QdbNode):
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "CREATE TABLE log (n INTEGER)"})
        tx = (await client.call("begin", {}))["tx"]
        sent = []
        for n in range(20):  # pipelined: all in flight at once
            insert = {"sql": "INSERT INTO log VALUES (?)", "params": [n], "tx": tx}
            sent.append(await client.send_request("execute", insert))
        replies = [await client.receive() for _ in sent]
        assert all(isinstance(r, Response) for r in replies)
        rows = await client.call("query", {"sql": "SELECT n FROM log ORDER BY rowid", "tx": tx})
        assert [n for (n,) in rows["rows"]] == list(range(20))
        assert await client.call("commit", {"tx": tx}, idempotency_key="order-1") == {
            "committed": True
        }


# ----------------------------------------------------------- ending by itself


async def test_an_idle_transaction_is_rolled_back_and_releases_the_write_lock(tmp_path: Path):
    async with (
        open_node(node_config(tmp_path, transaction_idle_timeout=0.2)) as node,
        qdb_client.open_client(node.address, **FAST) as client,
    ):
        await client.execute("CREATE TABLE t (x INTEGER)")
        with pytest.raises(TransactionAborted) as aborted:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")  # holds the write lock
                with trio.fail_after(5):
                    while node.transactions.open:  # noqa: ASYNC110 - the node's own timer
                        await trio.sleep(0.02)
                # The lock is free again: a write outside the transaction goes through.
                await client.execute("INSERT INTO t VALUES (2)", timeout=1.0)
                await tx.query("SELECT 1")
        assert aborted.value.details["reason"] == "idle timeout"
        assert [tuple(r) for r in (await client.query("SELECT x FROM t")).rows] == [(2,)]
        assert node.statistics()["transactions_aborted"] == 1


async def test_a_statement_past_its_deadline_rolls_the_transaction_back(tmp_path: Path):
    endless = (
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    )
    async with (
        open_node(node_config(tmp_path)) as node,
        qdb_client.open_client(node.address, **FAST) as client,
    ):
        await client.execute("CREATE TABLE t (x INTEGER)")
        with pytest.raises(TransactionAborted):
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                with pytest.raises(qdb_client.QdbError):
                    await tx.query(endless, timeout=0.2)
        assert await count(client, "t") == 0
        assert node.statistics()["transactions_open"] == 0


# ------------------------------------------------------------ write conflicts


async def test_contention_for_the_write_lock_is_a_write_conflict_retried_to_success():
    async with cluster_and_client() as (cluster, client):
        await client.execute("INSERT INTO acct VALUES (1, 100)")
        b_read, a_committed = trio.Event(), trio.Event()
        runs = []

        async def b(tx: Any) -> None:
            runs.append("b")
            balance = (await tx.query("SELECT balance FROM acct WHERE id = 1")).scalar()
            b_read.set()  # B's snapshot is taken
            await a_committed.wait()  # A commits a write after it
            await tx.execute("UPDATE acct SET balance = ? WHERE id = 1", [balance + 1])

        async def a() -> None:
            await b_read.wait()
            async with (
                qdb_client.open_client(cluster.addresses, **FAST) as other,
                other.transaction() as tx,
            ):
                await tx.execute("UPDATE acct SET balance = balance + 10 WHERE id = 1")
            a_committed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(a)
            await client.run_in_transaction(b)
        assert runs == ["b", "b"]  # the first run hit the conflict, the second committed
        assert (await client.query("SELECT balance FROM acct")).scalar() == 111
        assert totals(cluster, "write_conflicts") == 1
        counters = client.statistics()["transactions"]
        assert (counters["begun"], counters["rolled_back"], counters["committed"]) == (2, 1, 1)


async def test_a_write_waiting_for_the_lock_until_its_deadline_is_a_write_conflict():
    async with cluster_and_client(n=2) as (cluster, client):
        async with (
            qdb_client.open_client(cluster.addresses, **FAST) as other,
            other.transaction() as holder,
        ):
            await holder.execute("INSERT INTO acct VALUES (1, 1)")  # takes the write lock
            with pytest.raises(WriteConflict) as conflict:
                async with client.transaction() as tx:
                    await tx.query("SELECT count(*) FROM acct")
                    await tx.execute("INSERT INTO acct VALUES (2, 2)", timeout=0.3)
            assert conflict.value.retryable and conflict.value.details["executed"] is False
        assert [i for (i,) in (await client.query("SELECT id FROM acct")).rows] == [1]


# ------------------------------------------------------ lost connections


async def test_a_node_killed_mid_transaction_aborts_it_and_applies_nothing():
    async with cluster_and_client() as (cluster, client):
        with pytest.raises(TransactionAborted) as aborted:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO acct VALUES (1, 10)")
                await cluster.kill(cluster.addresses.index(tx.node))
                await tx.execute("INSERT INTO acct VALUES (2, 20)")
        assert aborted.value.retryable
        assert await count(client) == 0


async def test_dropped_connections_abort_the_transaction_and_apply_nothing():
    async with cluster_and_client() as (cluster, client):
        with pytest.raises(TransactionAborted):
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO acct VALUES (1, 10)")
                async with cluster.control(cluster.addresses.index(tx.node)) as control:
                    assert await control.drop_connections() >= 1
                await tx.execute("INSERT INTO acct VALUES (2, 20)")
        assert await count(client) == 0
        with trio.fail_after(5):  # the node ends it once its connection's tasks are over
            while totals(cluster, "transactions_open"):  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert totals(cluster, "transactions_aborted") == 1


# --------------------------------------------------------- lost commit replies


async def test_a_lost_commit_reply_is_asked_again_and_answered_committed_once():
    async with cluster_and_client() as (cluster, client):
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO acct VALUES (1, 10)")
            server_of(cluster, tx.node).faults.drop_after_commit(1, methods=["commit"])
        assert await count(client) == 1  # committed, once
        stats = client.statistics()
        assert stats["transactions"]["commits_recovered"] == 1
        assert stats["idempotent_replays"] == 1
        assert totals(cluster, "transactions_committed") == 1
        assert totals(cluster, "idempotent_hits") == 1  # the ask answered from the stored outcome
        assert totals(cluster, "commit_fences") == 0


async def test_a_commit_reply_cut_by_the_proxy_is_reported_truthfully():
    async with proxied(3) as (cluster, proxies):
        hosts = [p.address for p in proxies]
        async with qdb_client.open_client(hosts, **PROXIED) as client:
            await client.execute("CREATE TABLE t (x INTEGER)")
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                # The next bytes to the client (the commit's reply) are cut after 10.
                [proxy] = [p for p in proxies if p.address == tx.node]
                proxy.add_toxic("limit_data", bytes=10)
            proxy.clear()
            assert await count(client, "t") == 1
            assert client.statistics()["transactions"]["commits_recovered"] == 1
        assert totals(cluster, "transactions_committed") == 1


async def test_a_commit_asked_again_waits_for_the_commit_holding_the_lock():
    """The fence takes the write lock: a commit still running on its node (held up
    there by injected latency, the lock held by the transaction's write) is waited
    for by the node asked again, and then its stored outcome answers."""
    async with TestCluster.start_in_process(2) as cluster:
        first, second = (server.node for server in cluster.nodes)
        assert first is not None and second is not None
        async with raw_client(first.address) as owner, raw_client(second.address) as asker:
            await owner.call("execute", {"sql": "CREATE TABLE t (x INTEGER)"})
            tx = (await owner.call("begin", {}))["tx"]
            await owner.call("execute", {"sql": "INSERT INTO t VALUES (1)", "tx": tx})
            first.faults.add_latency("commit", 0.3)
            commit = await owner.send_request("commit", {"tx": tx}, idempotency_key="race-1")
            started = trio.current_time()
            answer = await asker.request(
                "commit", {"tx": tx}, idempotency_key="race-1", deadline_ms=3000
            )
            assert trio.current_time() - started >= 0.25  # it waited for the lock
            assert isinstance(answer, Response) and answer.replayed
            own = await owner.receive()
            assert isinstance(own, Response) and own.request_id == commit and not own.replayed
            assert own.result == answer.result == {"committed": True}
            assert (await asker.call("query", {"sql": "SELECT count(*) FROM t"}))["rows"] == [[1]]
        assert first.statistics()["transactions_committed"] == 1
        assert second.statistics()["commit_fences"] == 0


async def test_a_fenced_key_makes_the_late_commit_roll_back(node: QdbNode):
    """Asked again before the transaction wrote anything: the key is fenced ("not
    committed"), and the transaction's own commit, arriving later, rolls back."""
    async with raw_client(node.address) as owner, raw_client(node.address) as asker:
        await owner.call("execute", {"sql": "CREATE TABLE t (x INTEGER)"})
        tx = (await owner.call("begin", {}))["tx"]
        await owner.call("query", {"sql": "SELECT count(*) FROM t", "tx": tx})  # a snapshot
        fenced = await asker.request("commit", {"tx": tx}, idempotency_key="late-1")
        assert isinstance(fenced, Error) and fenced.name == "TX_ABORTED"
        assert fenced.details == {"executed": False, "reason": "not committed"}
        late = await owner.request("commit", {"tx": tx}, idempotency_key="late-1")
        assert isinstance(late, Error) and late.details["reason"] == "not committed"
        again = await asker.request("commit", {"tx": tx}, idempotency_key="late-1")
        assert isinstance(again, Error) and again.details["reason"] == "not committed"
    stats = node.statistics()
    assert (stats["commit_fences"], stats["transactions_committed"]) == (1, 0)


async def test_a_write_after_a_fence_is_a_write_conflict_not_a_commit(node: QdbNode):
    """The snapshot case: the transaction read before the fence was written, so its
    write can't take the lock (stale snapshot) and nothing applies."""
    async with raw_client(node.address) as owner, raw_client(node.address) as asker:
        await owner.call("execute", {"sql": "CREATE TABLE t (x INTEGER)"})
        tx = (await owner.call("begin", {}))["tx"]
        await owner.call("query", {"sql": "SELECT count(*) FROM t", "tx": tx})
        await asker.request("commit", {"tx": tx}, idempotency_key="snap-1")  # fenced
        write = await owner.request("execute", {"sql": "INSERT INTO t VALUES (1)", "tx": tx})
        assert isinstance(write, Error) and write.name == "WRITE_CONFLICT"
        late = await owner.request("commit", {"tx": tx}, idempotency_key="snap-1")
        assert isinstance(late, Error) and late.details["reason"] == "not committed"
        assert (await asker.call("query", {"sql": "SELECT count(*) FROM t"}))["rows"] == [[0]]


@pytest.mark.slow
@pytest.mark.parametrize("latency_ms", [800, 1000, 1200])
async def test_a_commit_held_up_while_asked_elsewhere_is_reported_as_it_ended(latency_ms):
    """The commit reaches its node late (upstream latency); the driver gives up on
    the reply at half its budget, closes the connection and asks another node.
    Whichever way the race goes, what the client is told is what the database holds."""
    async with proxied(2) as (_, proxies):
        hosts = [p.address for p in proxies]
        async with qdb_client.open_client(hosts, **PROXIED) as client:
            await client.execute("CREATE TABLE t (x INTEGER)")
            try:
                async with client.transaction() as tx:
                    await tx.execute("INSERT INTO t VALUES (1)")
                    [proxy] = [p for p in proxies if p.address == tx.node]
                    proxy.add_toxic("latency", direction="upstream", latency=latency_ms)
                reported: int | None = 1
            except TransactionAborted as exc:
                assert exc.details["reason"]
                reported = 0
            except OutcomeUnknown:
                reported = None  # no node answered in time: either may be true
            for p in proxies:
                p.clear()
            stored = await count(client, "t")
            assert stored == reported if reported is not None else stored in (0, 1)
            if latency_ms > 1000:  # the reply can't come in time: the answer came from asking
                recovered = client.statistics()["transactions"]["commits_recovered"]
                assert recovered == 1 or reported != 1


# --------------------------------------------------- compare-and-set, executemany


async def test_compare_and_set_two_writers_exactly_one_wins():
    async with cluster_and_client() as (_, client):
        await client.execute(
            "CREATE TABLE doc (id INTEGER PRIMARY KEY, body TEXT, version INTEGER)"
        )
        await client.execute("INSERT INTO doc VALUES (1, 'v0', 0)")
        version = (await client.query("SELECT version FROM doc WHERE id = 1")).scalar()
        outcomes: dict[str, Any] = {}

        async def writer(name: str) -> None:  # both saw the same version
            try:
                await client.execute(
                    "UPDATE doc SET body = ?, version = version + 1 WHERE id = 1 AND version = ?",
                    [name, version],
                    expect_rows=1,
                )
                outcomes[name] = "won"
            except Conflict as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, "a")
            nursery.start_soon(writer, "b")
        [winner] = [name for name, o in outcomes.items() if o == "won"]
        [loser] = [o for o in outcomes.values() if isinstance(o, Conflict)]
        assert loser.details == {"expected": 1, "rows_affected": 0, "executed": False}
        assert not loser.retryable and not loser.maybe_applied
        row = (await client.query("SELECT body, version FROM doc")).first()
        assert tuple(row) == (winner, 1)


async def test_expect_rows_rolls_a_batch_back_whole(node: QdbNode):
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "CREATE TABLE t (id INTEGER PRIMARY KEY)"})
        statements = [
            {"sql": "INSERT INTO t VALUES (1)", "expect_rows": 1},
            {"sql": "UPDATE t SET id = 2 WHERE id = 9", "expect_rows": 1},
        ]
        failed = await client.request("batch", {"statements": statements})
        assert isinstance(failed, Error) and failed.name == "CONFLICT"
        assert failed.details == {
            "expected": 1,
            "rows_affected": 0,
            "executed": False,
            "statement_index": 1,
        }
        update = {"sql": "UPDATE t SET id = 2", "expect_rows": 1}
        refused = await client.request("execute", update, idempotency_key="cas-1")
        assert isinstance(refused, Error) and refused.name == "CONFLICT"
        assert (await client.call("query", {"sql": "SELECT count(*) FROM t"}))["rows"] == [[0]]
        # A refused keyed write stores nothing.
        assert node_rows(node, "SELECT count(*) FROM qdb_idempotency") == [[0]]


async def test_executemany_is_all_or_none_and_names_the_failing_row():
    async with cluster_and_client() as (_, client):
        rows = [[i, i * 10] for i in range(5)] + [[2, 0]] + [[9, 90]]
        with pytest.raises(ConstraintViolation) as failed:
            await client.executemany("INSERT INTO acct VALUES (?, ?)", rows)
        assert failed.value.details["row_index"] == 5
        assert await count(client) == 0
        assert await client.executemany("INSERT INTO acct VALUES (?, ?)", rows[:5]) == 5
        assert await count(client) == 5


async def test_a_keyed_executemany_retried_after_a_lost_reply_applies_once():
    async with cluster_and_client() as (cluster, client):
        for server in cluster.nodes:
            assert server.node is not None
            server.node.faults.drop_after_commit(1, methods=["executemany"])
        affected = await client.executemany(
            "INSERT INTO acct VALUES (?, ?)", [[i, i] for i in range(100)]
        )
        assert affected == 100 and await count(client) == 100
        assert client.statistics()["idempotent_replays"] == 1
        assert totals(cluster, "idempotent_hits") == 1


async def test_a_read_only_transaction_ends_without_losing_its_connection(node: QdbNode):
    # It applies nothing, so it ends with a rollback: no key, nothing stored, no error.
    async with qdb_client.open_client(node.address, discover_members=False, **FAST) as client:
        for _ in range(3):
            async with client.transaction(read_only=True) as tx:
                assert (await tx.query("SELECT 1")).scalar() == 1
        stats = node.statistics()
        assert stats["errors_sent"].get("INVALID_REQUEST", 0) == 0
        assert stats["transactions_rolled_back"] == 3
        assert stats["connections_accepted"] == 1
