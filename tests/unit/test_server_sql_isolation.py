"""Requests of a test node are isolated from each other, over in-memory streams.

Every request runs on one of ``sqlite_pool_size`` pooled SQLite connections,
in turn, and nodes of a cluster share one file. So a request must not leave
its pooled connection different for the next one (another client's,
perhaps): settings, TEMP objects and ``last_insert_rowid()`` stay with the
request. A batch (or keyed write) is one transaction whatever its
statements say, and a result the client can't take is refused with the
facts (``details.executed``). docs/protocol.md sections 8.5 and 10,
docs/testing.md "Methods on the wire".

Virtual time (``autojump_clock``): SQL runs inline, so every test is
deterministic.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from qdb_client.errors import ConfigError
from qdb_client.protocol import Error, Response
from qdb_client.testing import QdbNode, ServerConfig
from qdb_client.testing.cli import build_parser, config_from_args, options_to_args

from ..common.raw_client import RawClient


@asynccontextmanager
async def memory_node(**config: Any) -> AsyncIterator[tuple[QdbNode, RawClient]]:
    """A test-mode node serving one in-memory connection, and a handshaken client."""
    config.setdefault("client_idle_timeout", 600.0)
    config.setdefault("request_timeout", 60.0)
    node = QdbNode(ServerConfig(test_mode=True, **config))
    async with trio.open_nursery() as nursery:
        client = await connect(node, nursery)
        try:
            yield node, client
        finally:
            await client.aclose()
            await node.aclose()


async def connect(node: QdbNode, nursery: trio.Nursery, **hello: Any) -> RawClient:
    """One more in-memory connection to ``node`` (a second client)."""
    client_end, node_end = trio.testing.memory_stream_pair()
    nursery.start_soon(node.serve_connection, node_end)
    client = RawClient(client_end, timeout=1000.0)
    await client.handshake(**hello)
    return client


async def rows(client: RawClient, sql: str) -> list[list[Any]]:
    return (await client.call("query", {"sql": sql}))["rows"]


def node_rows(node: QdbNode, sql: str) -> list[list[Any]]:
    """Rows of ``sql`` read straight from the node's file (the client's SQL can't reach
    the node's internal tables)."""
    assert node.storage.path is not None
    conn = sqlite3.connect(node.storage.path)
    try:
        return [list(row) for row in conn.execute(sql)]
    finally:
        conn.close()


def refused(reply: Any, what: str) -> None:
    assert isinstance(reply, Error) and reply.name == "SQL_ERROR", reply
    assert reply.message.startswith(f"{what} is not allowed here"), reply.message
    assert reply.details["executed"] is False and reply.details["sqlite_error"] == "SQLITE_AUTH"


# ---------------------------------------------------- one transaction per batch


async def test_a_failed_batch_applies_nothing_even_with_a_commit_inside(autojump_clock):
    # 10: batch runs "in one transaction: either all of them apply or none
    # does. If statement i fails, nothing is applied". A COMMIT among the
    # statements must not end the node's transaction early.
    async with memory_node() as (_node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        batch = {
            "statements": [
                {"sql": "insert into t values (1)"},
                {"sql": "commit"},
                {"sql": "insert into no_such_table values (2)"},
            ]
        }
        reply = await client.request("batch", batch)
        assert isinstance(reply, Error) and reply.details["statement_index"] == 2, reply
        assert await rows(client, "select count(*) from t") == [[0]]


async def test_a_keyed_write_that_failed_stores_nothing(autojump_clock):
    # 8.5: "Failures are not stored" and "a keyed write is never applied without
    # its key being stored, nor the other way round". A keyed execute of COMMIT
    # would end the key's transaction: it is refused before it runs.
    async with memory_node() as (node, client):
        reply = await client.request("execute", {"sql": "commit"}, idempotency_key="k-1")
        assert isinstance(reply, Error), reply
        assert node_rows(node, "select key from qdb_idempotency") == []


async def test_begin_and_commit_in_a_batch_are_the_batchs_own_transaction(autojump_clock):
    async with memory_node() as (_node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        statements = ["begin immediate", "insert into t values (1)", "end", "commit"]
        result = await client.call("batch", {"statements": [{"sql": s} for s in statements]})
        nothing = {"rows_affected": 0, "last_insert_id": None}
        assert (
            result["results"]
            == [nothing, {"rows_affected": 1, "last_insert_id": 1}] + [nothing] * 2
        )
        # Savepoints nest inside the batch's transaction.
        savepoints = [
            "savepoint a",
            "insert into t values (2)",
            "rollback to a",
            "release a",
            "insert into t values (3)",
        ]
        await client.call("batch", {"statements": [{"sql": s} for s in savepoints]})
        assert await rows(client, "select x from t order by x") == [[1], [3]]


async def test_a_rollback_in_a_batch_is_refused_and_nothing_applies(autojump_clock):
    async with memory_node() as (_node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        batch = [{"sql": "insert into t values (1)"}, {"sql": "rollback"}]
        reply = await client.request("batch", {"statements": batch})
        refused(reply, "ROLLBACK")
        assert isinstance(reply, Error) and reply.details["statement_index"] == 1
        assert await rows(client, "select count(*) from t") == [[0]]


@pytest.mark.parametrize("sql", ["begin", "commit", "end", "rollback", "savepoint a", "release a"])
async def test_transaction_statements_through_execute_are_refused(autojump_clock, sql: str):
    # A transaction can't span requests: each may land on another pooled connection.
    async with memory_node() as (node, client):
        for key in (None, "k"):
            reply = await client.request("execute", {"sql": sql}, idempotency_key=key)
            assert isinstance(reply, Error) and reply.name == "SQL_ERROR", reply
            assert reply.details["executed"] is False and "batch" in reply.message
        assert node_rows(node, "select key from qdb_idempotency") == []


# ---------------------------------------------------- pooled connection state


async def test_a_pragma_set_through_execute_applies_to_every_later_request(autojump_clock):
    # A connection setting set through execute must not stick to one pooled
    # connection only, so that later requests see it or not depending on which
    # connection they land on: it lasts for its own request, and
    # ServerConfig.foreign_keys sets it for all.
    async with memory_node(sqlite_pool_size=4) as (_node, client):
        await client.call("execute", {"sql": "pragma foreign_keys = on"})
        await client.call("execute", {"sql": "create table p(id integer primary key)"})
        await client.call("execute", {"sql": "create table c(p integer references p(id))"})
        outcomes = []
        for _ in range(4):
            reply = await client.request("execute", {"sql": "insert into c values (99)"})
            outcomes.append(reply.name if isinstance(reply, Error) else "applied")
        assert len(set(outcomes)) == 1, outcomes  # the same statement, the same answer


async def test_query_only_set_through_execute_does_not_break_other_clients_writes(
    autojump_clock,
):
    async with memory_node(sqlite_pool_size=2) as (node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        await client.call("execute", {"sql": "pragma query_only = on"})
        async with trio.open_nursery() as nursery:
            other = await connect(node, nursery)
            replies = [
                await other.request("execute", {"sql": "insert into t values (1)"})
                for _ in range(2)
            ]
            await other.aclose()
        assert all(isinstance(r, Response) for r in replies), replies


async def test_a_temp_table_of_one_client_does_not_shadow_another_clients_table(
    autojump_clock,
):
    async with memory_node(sqlite_pool_size=2) as (node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        await client.call("execute", {"sql": "insert into t values ('real')"})
        await client.call("execute", {"sql": "create temp table t(x)"})
        async with trio.open_nursery() as nursery:
            other = await connect(node, nursery)
            seen = [await rows(other, "select x from t") for _ in range(2)]
            await other.aclose()
        assert seen == [[["real"]], [["real"]]], seen


async def test_one_clients_locking_mode_pragma_does_not_lock_out_every_other_writer(
    autojump_clock,
):
    # "PRAGMA locking_mode = EXCLUSIVE" kept by a pooled connection would hold
    # the file's lock after its next write, for good: every other writer (of
    # every node of the cluster) would wait out its deadline.
    async with memory_node(sqlite_pool_size=2) as (node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        await client.call("execute", {"sql": "pragma locking_mode = exclusive"})
        async with trio.open_nursery() as nursery:
            other = await connect(node, nursery)
            replies = [
                await other.request("execute", {"sql": "insert into t values (1)"}, deadline_ms=200)
                for _ in range(4)
            ]
            await other.aclose()
        assert [type(r).__name__ for r in replies] == ["Response"] * 4, replies


async def test_settings_and_temp_tables_last_for_their_batch(autojump_clock):
    async with memory_node(sqlite_pool_size=1) as (_node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        batch = [
            "create temp table scratch(x)",
            "insert into scratch values (1), (2)",
            "pragma recursive_triggers = on",
            "insert into t select x from scratch",
        ]
        await client.call("batch", {"statements": [{"sql": s} for s in batch]})
        assert await rows(client, "select count(*) from t") == [[2]]
        assert await rows(client, "pragma recursive_triggers") == [[0]]
        missing = await client.request("query", {"sql": "select * from scratch"})
        assert isinstance(missing, Error) and "no such table" in missing.message


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        ("attach ':memory:' as m", "ATTACH"),
        ("detach main", "DETACH"),
        ("pragma journal_mode = delete", "PRAGMA journal_mode"),
        ("pragma writable_schema = on", "PRAGMA writable_schema"),
    ],
)
async def test_what_would_change_the_shared_file_or_attach_one_is_refused(
    autojump_clock, sql: str, what: str
):
    async with memory_node(sqlite_pool_size=1) as (_node, client):
        refused(await client.request("execute", {"sql": sql}), what)
        batch = await client.request("batch", {"statements": [{"sql": "select 1"}, {"sql": sql}]})
        refused(batch, what)
        assert isinstance(batch, Error) and batch.details["statement_index"] == 1
        assert await rows(client, "pragma journal_mode") == [["wal"]]
        attached = "select name from pragma_database_list where name not in ('main', 'temp')"
        assert await rows(client, attached) == []


async def test_file_level_pragmas_and_vacuum_still_work_through_execute(autojump_clock):
    async with memory_node(sqlite_pool_size=2) as (_node, client):
        await client.call("execute", {"sql": "pragma user_version = 7"})
        await client.call("execute", {"sql": "create table t(x)"})
        await client.call("execute", {"sql": "vacuum"})
        await client.call("execute", {"sql": "pragma wal_checkpoint(truncate)"})
        assert [await rows(client, "pragma user_version") for _ in range(2)] == [[[7]]] * 2


async def test_foreign_keys_option_applies_to_every_pooled_connection(autojump_clock):
    async with memory_node(sqlite_pool_size=3, foreign_keys=True) as (_node, client):
        await client.call("execute", {"sql": "create table p(id integer primary key)"})
        await client.call("execute", {"sql": "create table c(p integer references p(id))"})
        # A request that changed its connection gets it replaced: set up the same way.
        await client.call("execute", {"sql": "pragma foreign_keys = off"})
        for _ in range(4):
            reply = await client.request("execute", {"sql": "insert into c values (99)"})
            assert isinstance(reply, Error) and reply.name == "CONSTRAINT_VIOLATION", reply


def test_foreign_keys_option_config_and_command_line():
    assert ServerConfig().foreign_keys is False
    assert ServerConfig(foreign_keys=True).foreign_keys is True
    with pytest.raises(ConfigError, match="foreign_keys"):
        ServerConfig(foreign_keys="yes")
    assert config_from_args(build_parser().parse_args(["--foreign-keys"])).foreign_keys is True
    assert config_from_args(build_parser().parse_args([])).foreign_keys is False
    assert options_to_args({"foreign_keys": True}) == ["--foreign-keys"]
    assert options_to_args({"foreign_keys": False}) == []


# ------------------------------------------------------------ last_insert_id


async def test_an_upsert_that_updated_reports_no_insert_id(autojump_clock):
    # 10: last_insert_id is "the id of the inserted row for an INSERT statement
    # that inserted one, otherwise null". An upsert that took the DO UPDATE
    # branch inserted nothing, whatever the pooled SQLite connection inserted
    # last (here another client's row in another table).
    async with memory_node(sqlite_pool_size=1) as (node, client):
        await client.call("execute", {"sql": "create table u(k text primary key, n)"})
        await client.call("execute", {"sql": "create table other(id integer primary key)"})
        await client.call("execute", {"sql": "insert into u values ('k', 1)"})
        async with trio.open_nursery() as nursery:
            someone_else = await connect(node, nursery)
            inserted = await someone_else.call(
                "execute", {"sql": "insert into other(id) values (4242)"}
            )
            assert inserted["last_insert_id"] == 4242
            await someone_else.aclose()
        upsert = "insert into u values ('k', 1) on conflict(k) do update set n = n + 1"
        result = await client.call("execute", {"sql": upsert})
        assert result == {"rows_affected": 1, "last_insert_id": None}, result


async def test_an_insert_into_a_without_rowid_table_reports_no_stale_id(autojump_clock):
    # WITHOUT ROWID tables have no rowid; SQLite's last_insert_rowid() is not
    # changed by them, so "the inserted row's id" can only be null.
    async with memory_node(sqlite_pool_size=1) as (_node, client):
        await client.call("execute", {"sql": "create table a(id integer primary key)"})
        await client.call("execute", {"sql": "create table w(k text primary key) without rowid"})
        await client.call("execute", {"sql": "insert into a(id) values (77)"})
        result = await client.call("execute", {"sql": "insert into w values ('x')"})
        assert result["last_insert_id"] is None, result


async def test_an_insert_reusing_the_rowid_of_a_rolled_back_one_reports_it(autojump_clock):
    # The rolled-back insert left last_insert_rowid() at 1 on the connection;
    # the retry gets rowid 1 again, and it is a new insert all the same.
    async with memory_node(sqlite_pool_size=1) as (_node, client):
        await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
        failed = [{"sql": "insert into t(x) values (1)"}, {"sql": "insert into missing values (1)"}]
        assert isinstance(await client.request("batch", {"statements": failed}), Error)
        again = await client.call("execute", {"sql": "insert into t(x) values (1)"})
        assert again == {"rows_affected": 1, "last_insert_id": 1}
        returning = await client.call(
            "execute", {"sql": "insert into t(x) values (2) returning id"}
        )
        assert returning["last_insert_id"] == 2 and returning["rows"] == [[2]]


# ------------------------------------------------- a write's reply too large


async def test_a_write_whose_reply_is_too_large_says_whether_it_was_applied(autojump_clock):
    # "Errors carry facts": FRAME_TOO_LARGE for a write's RETURNING rows must say
    # whether the write took effect; here it is rolled back, so a keyed retry is
    # not stuck replaying a result that can never be sent.
    async with memory_node() as (_, client):
        await client.call("execute", {"sql": "create table t(b)"})
        write = {"sql": "insert into t values (zeroblob(2000000)) returning b"}
        reply = await client.request("execute", write, idempotency_key="big")
        assert isinstance(reply, Error) and reply.name == "FRAME_TOO_LARGE", reply
        applied = await rows(client, "select count(*) from t") == [[1]]
        assert reply.details.get("executed") is applied, (applied, reply.details)


@pytest.mark.parametrize("key", [None, "k"])
async def test_returning_rows_past_the_frame_roll_the_write_back(autojump_clock, key):
    async with memory_node() as (node, client):
        await client.call("execute", {"sql": "create table t(b)"})
        twenty = "with recursive r(n) as (select 1 union all select n + 1 from r limit 20)"
        write = {
            "sql": f"insert into t select zeroblob(100000) from ({twenty} select n from r)"
            " returning b"
        }
        reply = await client.request("execute", write, idempotency_key=key)
        assert isinstance(reply, Error) and reply.name == "FRAME_TOO_LARGE", reply
        assert reply.details["executed"] is False and reply.details["max_frame"] == 1 << 20
        assert reply.details["frame_size"] > 1 << 20
        batch = await client.request("batch", {"statements": [write]}, idempotency_key=key)
        assert isinstance(batch, Error) and batch.details["statement_index"] == 0, batch
        assert await rows(client, "select count(*) from t") == [[0]]
        assert node_rows(node, "select count(*) from qdb_idempotency") == [[0]]


async def test_a_replayed_result_too_large_for_this_client_says_it_was_applied(autojump_clock):
    async with memory_node() as (node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        write = {"sql": "insert into t values (?) returning x", "params": ["x" * 3000]}
        await client.call("execute", write, idempotency_key="k")
        async with trio.open_nursery() as nursery:
            small = await connect(node, nursery, max_frame_size=1024)
            reply = await small.request("execute", write, idempotency_key="k")
            await small.aclose()
        assert isinstance(reply, Error) and reply.name == "FRAME_TOO_LARGE", reply
        assert reply.details["executed"] is True
        assert node.statistics()["idempotent_hits"] == 1
