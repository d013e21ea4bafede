"""Idempotency pieces of the test node without a network: key format, request hashes
(and what counts as the same request), the keyed transaction on a bare SQLite
connection, the drop_after_commit fault, and the TTL option.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from qdb_client.errors import ConfigError
from qdb_client.protocol import ErrorCode, Response
from qdb_client.testing import Faults, QdbNode, ServerConfig
from qdb_client.testing._failure import RequestFailed
from qdb_client.testing.cli import build_parser, config_from_args, options_to_args
from qdb_client.testing.idempotency import (
    DEFAULT_TTL,
    SCHEMA,
    IdempotencyKey,
    KeyedOutcome,
    check_key,
    request_hash,
)
from qdb_client.testing.methods import _sql_args
from qdb_client.testing.storage import PURGE_LIMIT, run_keyed

from ..common.raw_client import RawClient

# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("key", ["a", "k" * 128, "AZaz09_-:.", "qdb-0123abcd", "order-42:v1"])
def test_well_formed_keys_are_accepted(key: str):
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "k" * 129, "has space", "ключ", "é", "a/b", "a\n", "tab\t", None, 42, b"k"]
)
def test_malformed_keys_are_invalid_request(key: object):
    with pytest.raises(RequestFailed) as info:
        check_key(key)
    assert info.value.code is ErrorCode.INVALID_REQUEST
    assert info.value.message.startswith("malformed idempotency key")


def test_long_malformed_key_is_shortened_in_the_message():
    with pytest.raises(RequestFailed) as info:
        check_key("x" * 500 + " ")
    assert "(501 characters)" in info.value.message
    assert len(info.value.message) < 200


# --------------------------------------------------------------- hashes


def test_request_hash_covers_method_sql_and_params():
    base = request_hash("execute", ["insert into t values (?)", (1,)])
    assert len(base) == 32
    assert base == request_hash("execute", ["insert into t values (?)", (1,)])
    assert base == request_hash("execute", ["insert into t values (?)", [1]])  # tuple or list
    different = [
        request_hash("batch", ["insert into t values (?)", (1,)]),
        request_hash("execute", ["insert into t values (?) ", (1,)]),
        request_hash("execute", ["insert into t values (?)", (2,)]),
        request_hash("execute", ["insert into t values (?)", (1.0,)]),
        request_hash("execute", ["insert into t values (?)", ("1",)]),
        request_hash("execute", ["insert into t values (?)", (1, None)]),
    ]
    assert base not in different and len(set(different)) == len(different)


def test_request_hash_of_named_params_ignores_their_order():
    sql = "insert into t values (:a, :b)"
    assert request_hash("execute", [sql, {"a": 1, "b": b"x"}]) == request_hash(
        "execute", [sql, {"b": b"x", "a": 1}]
    )


@pytest.mark.parametrize("params", [None, [], {}])
def test_absent_null_and_empty_params_are_one_request(params: object):
    # 8.5: "Absent, null and empty params are the same request."
    args = {"sql": "select 1"} if params is None else {"sql": "select 1", "params": params}
    assert _sql_args(args) == ("select 1", ())
    assert request_hash("execute", list(_sql_args(args))) == request_hash(
        "execute", ["select 1", ()]
    )
    with pytest.raises(RequestFailed, match="'params' must be a list or a map"):
        _sql_args({"sql": "select 1", "params": 0})


@asynccontextmanager
async def memory_node() -> AsyncIterator[tuple[QdbNode, RawClient]]:
    """A test-mode node serving one in-memory connection, and a handshaken client."""
    node = QdbNode(ServerConfig(test_mode=True, client_idle_timeout=600.0, request_timeout=60.0))
    client_end, node_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, node_end)
        client = RawClient(client_end, timeout=1000.0)
        await client.handshake()
        try:
            yield node, client
        finally:
            await client.aclose()
            await node.aclose()


async def test_empty_map_params_are_the_same_request_as_absent_params(autojump_clock):
    async with memory_node() as (_node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        write = "insert into t values (1)"
        first = await client.call("execute", {"sql": write, "params": {}}, idempotency_key="k")
        again = await client.request("execute", {"sql": write}, idempotency_key="k")
        assert isinstance(again, Response), again
        assert again.result == first
        assert (await client.call("query", {"sql": "select count(*) from t"}))["rows"] == [[1]]


async def test_empty_map_params_in_a_batch_are_the_same_as_absent(autojump_clock):
    async with memory_node() as (node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        stmt = "insert into t values (1)"
        batch = {"statements": [{"sql": stmt, "params": {}}]}
        await client.call("batch", batch, idempotency_key="b")
        again = await client.request("batch", {"statements": [{"sql": stmt}]}, idempotency_key="b")
        assert isinstance(again, Response), again
        assert node.statistics()["idempotent_hits"] == 1


# ------------------------------------------------- the keyed transaction


class Clock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(tmp_path / "db.sqlite3", isolation_level=None)
    for statement in SCHEMA:
        connection.execute(statement)
    connection.execute("create table t(x)")
    yield connection
    connection.close()


def insert(x: int):
    def work(conn: sqlite3.Connection) -> dict[str, int]:
        conn.execute("insert into t values (?)", (x,))
        return {"rows": conn.execute("select count(*) from t").fetchone()[0]}

    return work


def key(name: str, request: str = "r", scope: str = "") -> IdempotencyKey:
    return IdempotencyKey(name, request_hash("execute", [request, ()]), scope)


def rows(conn: sqlite3.Connection, sql: str) -> list[tuple]:
    return conn.execute(sql).fetchall()


def test_first_run_stores_the_result_and_a_repeat_replays_it(conn: sqlite3.Connection):
    clock = Clock()
    first = run_keyed(conn, key("k"), insert(1), clock=clock, ttl=60)
    assert (first.outcome, first.result) == (KeyedOutcome.STORED, {"rows": 1})
    clock.now += 59.5
    again = run_keyed(conn, key("k"), insert(1), clock=clock, ttl=60)
    assert (again.outcome, again.result) == (KeyedOutcome.REPLAYED, {"rows": 1})
    conflict = run_keyed(conn, key("k", request="other"), insert(1), clock=clock, ttl=60)
    assert (conflict.outcome, conflict.result) == (KeyedOutcome.CONFLICT, None)
    assert rows(conn, "select x from t") == [(1,)]
    assert rows(conn, "select scope, key, created_at from qdb_idempotency") == [("", "k", 5000.0)]
    assert not conn.in_transaction


def test_scopes_keep_equal_keys_apart(conn: sqlite3.Connection):
    clock = Clock()
    run_keyed(conn, key("k", scope="alice"), insert(1), clock=clock, ttl=60)
    other = run_keyed(conn, key("k", "other", scope="bob"), insert(2), clock=clock, ttl=60)
    assert other.outcome is KeyedOutcome.STORED
    assert rows(conn, "select x from t") == [(1,), (2,)]


def test_expired_entry_counts_as_absent_and_is_replaced(conn: sqlite3.Connection):
    clock = Clock()
    run_keyed(conn, key("k"), insert(1), clock=clock, ttl=60)
    clock.now += 60  # expiry is at created_at + ttl exactly
    again = run_keyed(conn, key("k", request="another request"), insert(2), clock=clock, ttl=60)
    assert (again.outcome, again.result) == (KeyedOutcome.STORED, {"rows": 2})
    assert rows(conn, "select key, created_at from qdb_idempotency") == [("k", 5060.0)]


def test_each_stored_key_purges_a_bounded_number_of_expired_entries(conn: sqlite3.Connection):
    expired = [(f"old-{i}", b"h", b"\xa0", 100.0) for i in range(PURGE_LIMIT + 5)]
    conn.executemany(
        "insert into qdb_idempotency (scope, key, request_hash, result, created_at)"
        " values ('', ?, ?, ?, ?)",
        expired,
    )
    clock = Clock()
    run_keyed(conn, key("live-1"), insert(1), clock=clock, ttl=60)
    assert rows(conn, "select count(*) from qdb_idempotency where key like 'old-%'") == [(5,)]
    run_keyed(conn, key("live-2"), insert(2), clock=clock, ttl=60)
    assert rows(conn, "select key from qdb_idempotency order by key") == [("live-1",), ("live-2",)]
    # A replay writes nothing, so it purges nothing either (its transaction is rolled back).
    conn.execute("insert into qdb_idempotency values ('', 'old', x'00', x'a0', 1.0)")
    run_keyed(conn, key("live-1"), insert(1), clock=clock, ttl=60)
    assert rows(conn, "select count(*) from qdb_idempotency where key = 'old'") == [(1,)]


def test_failing_work_leaves_the_transaction_for_the_caller_to_roll_back(
    conn: sqlite3.Connection,
):
    def fail(conn: sqlite3.Connection) -> None:
        conn.execute("insert into t values (1)")
        raise sqlite3.IntegrityError("boom")

    with pytest.raises(sqlite3.IntegrityError):
        run_keyed(conn, key("k"), fail, clock=Clock(), ttl=60)
    assert conn.in_transaction
    conn.execute("ROLLBACK")
    assert rows(conn, "select count(*) from t") == [(0,)]
    assert rows(conn, "select count(*) from qdb_idempotency") == [(0,)]
    retry = run_keyed(conn, key("k"), insert(1), clock=Clock(), ttl=60)
    assert retry.outcome is KeyedOutcome.STORED


# ------------------------------------------------------- drop_after_commit


def make_faults() -> Faults:
    return Faults(
        refuse=lambda enabled: None, drop=lambda: 0, stats=dict, reset_counters=lambda: None
    )


def test_drop_after_commit_defaults_to_writes_and_counts_down():
    faults = make_faults()
    assert faults.describe()["drop_after_commit"] == {
        "remaining": 0,
        "methods": ["batch", "execute"],
    }
    assert not faults.take_drop_after_commit("execute")
    faults.drop_after_commit(2)
    assert not faults.take_drop_after_commit("query")
    assert faults.take_drop_after_commit("execute")
    assert faults.take_drop_after_commit("batch")
    assert not faults.take_drop_after_commit("execute")


def test_drop_after_commit_methods_replacement_and_clearing():
    faults = make_faults()
    faults.drop_after_commit(5, methods="query")
    assert faults.describe()["drop_after_commit"] == {"remaining": 5, "methods": ["query"]}
    assert not faults.take_drop_after_commit("execute")
    faults.drop_after_commit(1)  # replaces, with the default methods again
    assert faults.describe()["drop_after_commit"]["remaining"] == 1
    faults.drop_after_commit(0)
    assert not faults.take_drop_after_commit("execute")
    faults.drop_after_commit(3, methods=["execute"])
    faults.reset()
    assert faults.describe()["drop_after_commit"] == {
        "remaining": 0,
        "methods": ["batch", "execute"],
    }


@pytest.mark.parametrize(
    ("count", "methods"), [(-1, None), (True, None), (1.5, None), (1, []), (1, [""]), (1, [3])]
)
def test_drop_after_commit_rejects_bad_arguments(count: object, methods: object):
    with pytest.raises(ValueError):
        make_faults().drop_after_commit(count, methods=methods)  # type: ignore[arg-type]


# --------------------------------------------------------------- config


def test_idempotency_ttl_option():
    assert ServerConfig().idempotency_ttl == DEFAULT_TTL == 3600.0
    assert ServerConfig(idempotency_ttl=0.5).idempotency_ttl == 0.5
    for bad in (0, -1, float("inf"), "60", True):
        with pytest.raises(ConfigError, match="idempotency_ttl"):
            ServerConfig(idempotency_ttl=bad)
    ns = build_parser().parse_args(["--idempotency-ttl", "90"])
    assert config_from_args(ns).idempotency_ttl == 90.0
    assert config_from_args(build_parser().parse_args([])).idempotency_ttl == 3600.0
    assert options_to_args({"idempotency_ttl": 90.0}) == ["--idempotency-ttl", "90.0"]
