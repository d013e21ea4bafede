"""The node's transactions without sockets: the commit and its fence on two SQLite
connections, and the session's side in virtual time over memory streams.

The SQL part (qdb_client.testing.txsql) runs on plain sqlite3 connections to one
WAL file, as two nodes' connections would be: the key row is inserted in the
transaction, a stale snapshot can't take the write lock, a fence is always seen.
The trio part runs a node on ``serve_connection`` with an autojump clock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from qdb_client.protocol import Cancel, Error, Response
from qdb_client.testing import QdbNode, ServerConfig
from qdb_client.testing.idempotency import SCHEMA, IdempotencyKey, KeyedOutcome, request_hash
from qdb_client.testing.statements import Control
from qdb_client.testing.txsql import NOT_COMMITTED, begin, commit, in_savepoint
from qdb_client.testing.writes import run_keyed

from ..common.raw_client import RawClient

TTL = 3600.0


def key(name: str = "k-1", tx: str = "tx-1") -> IdempotencyKey:
    return IdempotencyKey(name, request_hash("commit", [tx]))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[sqlite3.Connection, sqlite3.Connection]]:
    """Two connections to one WAL database: a transaction's, and another node's."""
    path = tmp_path / "db.sqlite3"
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.05)
    first.execute("PRAGMA journal_mode = WAL")
    for statement in SCHEMA:
        first.execute(statement)
    first.execute("CREATE TABLE t (x INTEGER)")
    second = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0.05)
    yield first, second
    first.close()
    second.close()


def stored(conn: sqlite3.Connection) -> list[str]:
    return [k for (k,) in conn.execute("SELECT key FROM qdb_idempotency")]


def commit_tx(conn: sqlite3.Connection, k: IdempotencyKey, *, wrote: bool):
    return commit(conn, k, wrote=wrote, clock=lambda: 1000.0, ttl=TTL, control=Control())


def fence(conn: sqlite3.Connection, k: IdempotencyKey):
    return run_keyed(conn, k, lambda c: dict(NOT_COMMITTED), clock=lambda: 1000.0, ttl=TTL)


def test_a_commit_stores_its_key_with_the_writes(pair):
    tx, other = pair
    begin(tx, read_only=False)
    in_savepoint(tx, lambda c: c.execute("INSERT INTO t VALUES (1)"))
    assert commit_tx(tx, key(), wrote=True).outcome is KeyedOutcome.STORED
    assert not tx.in_transaction
    assert other.execute("SELECT x FROM t").fetchall() == [(1,)] and stored(other) == ["k-1"]


def test_a_failed_savepoint_leaves_the_transaction_as_it_was(pair):
    tx, other = pair
    begin(tx, read_only=False)
    in_savepoint(tx, lambda c: c.execute("INSERT INTO t VALUES (1)"))
    with pytest.raises(sqlite3.OperationalError):
        in_savepoint(tx, lambda c: (c.execute("INSERT INTO t VALUES (2)"), c.execute("nope")))
    assert tx.in_transaction
    assert commit_tx(tx, key(), wrote=True).outcome is KeyedOutcome.STORED
    assert other.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_a_key_fenced_before_the_commit_rolls_the_transaction_back(pair):
    tx, other = pair
    begin(tx, read_only=False)
    tx.execute("SELECT count(*) FROM t").fetchone()  # snapshot taken before the fence
    assert fence(other, key()).outcome is KeyedOutcome.STORED
    ended = commit_tx(tx, key(), wrote=False)  # it only read: the key is looked up anew
    assert ended.outcome is KeyedOutcome.REPLAYED and ended.result == NOT_COMMITTED
    assert not tx.in_transaction


def test_a_stale_snapshot_can_not_write_past_a_fence(pair):
    tx, other = pair
    begin(tx, read_only=False)
    tx.execute("SELECT count(*) FROM t").fetchone()
    fence(other, key())
    with pytest.raises(sqlite3.OperationalError) as busy:
        tx.execute("INSERT INTO t VALUES (1)")
    assert busy.value.sqlite_errorname == "SQLITE_BUSY_SNAPSHOT"
    tx.execute("ROLLBACK")
    assert other.execute("SELECT count(*) FROM t").fetchone() == (0,)


def test_a_fence_waits_for_the_writer_and_then_sees_its_commit(pair):
    tx, other = pair
    begin(tx, read_only=False)
    tx.execute("INSERT INTO t VALUES (1)")  # holds the write lock
    with pytest.raises(sqlite3.OperationalError):  # the fence can't have it meanwhile
        fence(other, key())
    assert not other.in_transaction
    assert commit_tx(tx, key(), wrote=True).outcome is KeyedOutcome.STORED
    asked = fence(other, key())
    assert asked.outcome is KeyedOutcome.REPLAYED and asked.result == {"committed": True}


def test_a_key_of_another_transaction_is_a_conflict_and_rolls_back(pair):
    tx, other = pair
    begin(other, read_only=False)
    other.execute("INSERT INTO t VALUES (1)")
    commit_tx(other, key("shared", "tx-a"), wrote=True)
    begin(tx, read_only=False)
    tx.execute("INSERT INTO t VALUES (2)")
    assert commit_tx(tx, key("shared", "tx-b"), wrote=True).outcome is KeyedOutcome.CONFLICT
    assert other.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_an_expired_key_counts_as_absent(pair):
    tx, other = pair
    run_keyed(other, key(), lambda c: dict(NOT_COMMITTED), clock=lambda: 0.0, ttl=TTL)
    begin(tx, read_only=False)
    tx.execute("INSERT INTO t VALUES (1)")
    late = commit(tx, key(), wrote=True, clock=lambda: TTL + 1, ttl=TTL, control=Control())
    assert late.outcome is KeyedOutcome.STORED
    assert other.execute("SELECT count(*) FROM t").fetchone() == (1,)


def test_a_read_only_transaction_still_stores_its_commit(pair):
    tx, other = pair
    begin(tx, read_only=True)
    with pytest.raises(sqlite3.OperationalError):
        tx.execute("INSERT INTO t VALUES (1)")
    assert commit_tx(tx, key(), wrote=False).outcome is KeyedOutcome.STORED
    assert stored(other) == ["k-1"]


# ----------------------------------------------------------- in virtual time


@asynccontextmanager
async def memory_node(tmp_path: Path, **config) -> AsyncIterator[tuple[QdbNode, RawClient]]:
    node = QdbNode(ServerConfig(test_mode=True, database=tmp_path / "db.sqlite3", **config))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, server_stream)
        client = RawClient(client_stream, timeout=1000.0)
        await client.handshake()
        try:
            yield node, client
        finally:
            await client.aclose()
            await node.aclose()


async def test_the_idle_timeout_rolls_back_exactly_on_time(tmp_path, autojump_clock):
    async with memory_node(tmp_path, transaction_idle_timeout=30.0) as (node, client):
        await client.call("execute", {"sql": "CREATE TABLE t (x)"})
        tx = (await client.call("begin", {"timeout_ms": 2500}))["tx"]
        await client.call("execute", {"sql": "INSERT INTO t VALUES (1)", "tx": tx})
        await trio.sleep(2.4999)
        assert node.transactions.open == 1
        await client.call("query", {"sql": "SELECT 1", "tx": tx})  # restarts the countdown
        await trio.sleep(2.4999)
        assert node.transactions.open == 1
        await trio.sleep(0.0002)
        assert node.transactions.open == 0
        late = await client.request("query", {"sql": "SELECT 1", "tx": tx})
        assert isinstance(late, Error) and late.details == {
            "executed": False,
            "reason": "idle timeout",
        }
        assert (await client.call("query", {"sql": "SELECT count(*) FROM t"}))["rows"] == [[0]]


async def test_begin_caps_its_idle_timeout_at_the_nodes(tmp_path, autojump_clock):
    async with memory_node(tmp_path, transaction_idle_timeout=1.0) as (node, client):
        await client.call("begin", {"timeout_ms": 60_000})
        await trio.sleep(1.0001)
        assert node.transactions.open == 0
        assert node.statistics()["transactions_aborted"] == 1


async def test_the_node_bounds_its_open_transactions(tmp_path, autojump_clock):
    async with memory_node(tmp_path, max_transactions=1) as (node, client):
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.serve_connection, server_stream)
            other = RawClient(client_stream, timeout=1000.0)
            await other.handshake()
            tx = (await client.call("begin", {}))["tx"]
            refused = await other.request("begin", {})
            assert isinstance(refused, Error) and refused.name == "CAPACITY_EXCEEDED"
            assert refused.retryable
            assert await client.call("rollback", {"tx": tx}) == {"rolled_back": True}
            assert "tx" in await other.call("begin", {})
            await other.aclose()  # its open transaction ends with its connection
        assert node.transactions.open == 0


async def test_a_cancelled_request_rolls_its_transaction_back(tmp_path, autojump_clock):
    async with memory_node(tmp_path, request_timeout=60.0) as (node, client):
        await client.call("execute", {"sql": "CREATE TABLE t (x)"})
        tx = (await client.call("begin", {}))["tx"]
        await client.call("execute", {"sql": "INSERT INTO t VALUES (1)", "tx": tx})
        node.faults.add_latency("execute", 5.0)  # cancelled before it reaches the transaction
        rid = await client.send_request("execute", {"sql": "INSERT INTO t VALUES (2)", "tx": tx})
        await trio.sleep(1.0)
        await client.send(Cancel(rid))
        cancelled = await client.receive()
        assert isinstance(cancelled, Error) and cancelled.name == "CANCELLED"
        node.faults.reset()
        gone = await client.request("commit", {"tx": tx}, idempotency_key="c-1")
        assert isinstance(gone, Error) and gone.details["reason"] == "not committed"
        assert (await client.call("query", {"sql": "SELECT count(*) FROM t"}))["rows"] == [[0]]


async def test_replayed_is_set_only_on_answers_from_a_stored_outcome(tmp_path, autojump_clock):
    async with memory_node(tmp_path) as (_, client):
        await client.call("execute", {"sql": "CREATE TABLE t (x)"})
        insert = {"sql": "INSERT INTO t VALUES (1)"}
        first = await client.request("execute", insert, idempotency_key="r-1")
        again = await client.request("execute", insert, idempotency_key="r-1")
        assert isinstance(first, Response) and not first.replayed
        assert isinstance(again, Response) and again.replayed and again.result == first.result
        many = {"sql": "INSERT INTO t VALUES (?)", "rows": [[2], [3]]}
        assert not (await client.request("executemany", many, idempotency_key="r-2")).replayed
        assert (await client.request("executemany", many, idempotency_key="r-2")).replayed
        assert (await client.call("query", {"sql": "SELECT count(*) FROM t"}))["rows"] == [[3]]
