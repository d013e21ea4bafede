"""``query`` is read-only: a statement that writes is READ_ONLY and changes nothing.

Checked through a second node sharing the database file, so "nothing
changed" is what any node of the cluster sees, not what one connection
believes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from qdb_client.protocol import Cancel, Error
from qdb_client.testing import QdbNode, open_node

from ..common.fixtures import node_config
from ..common.raw_client import RawClient, raw_client

Pair = tuple[QdbNode, QdbNode]
ENDLESS = "with recursive r(n) as (select 1 union all select n + 1 from r)"

WRITES = [
    "insert into t(x) values (7)",
    "insert into t(x) values (7) returning id, x",
    "replace into t(id, x) values (1, 7)",
    "update t set x = 7",
    "update t set x = 7 returning *",
    "delete from t",
    "delete from t returning id",
    "with v(y) as (select 7) insert into t(x) select y from v",
    "with v(y) as (select 1) update t set x = 7 where id in (select y from v)",
    "create table u(y)",
    "create temp table u(y)",
    "create view w as select 7",
    "create index tx2 on t(x, id)",
    "drop index tx",
    "drop table t",
    "alter table t add column z",
    "reindex",
    "analyze",
    "vacuum",
    "begin immediate",
    "pragma user_version = 7",
    "pragma journal_mode = delete",
    "pragma wal_checkpoint(truncate)",
    "pragma foreign_keys = on",
    "pragma query_only = off",
]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """Two nodes on one database file with ``t`` holding two rows."""
    async with open_node(node_config(tmp_path)) as a, open_node(node_config(tmp_path)) as b:
        async with raw_client(a.address) as client:
            await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
            await client.call("execute", {"sql": "create index tx on t(x)"})
            await client.call("execute", {"sql": "insert into t(x) values (1), (2)"})
        yield a, b


async def snapshot(address: str) -> dict[str, Any]:
    """What a fresh connection to ``address`` sees of the database."""
    async with raw_client(address) as client:

        async def rows(sql: str) -> list[list[Any]]:
            return (await client.call("query", {"sql": sql}))["rows"]

        return {
            "t": await rows("select id, x from t order by id"),
            "schema": await rows("select type, name, sql from sqlite_master order by name"),
            "user_version": await rows("pragma user_version"),
            "journal_mode": await rows("pragma journal_mode"),
        }


def assert_read_only(reply: Any) -> None:
    assert isinstance(reply, Error), reply
    assert (reply.name, reply.code, reply.retryable) == ("READ_ONLY", 403, False)
    assert reply.details == {"executed": False}
    assert "use execute" in reply.message


@pytest.mark.parametrize("sql", WRITES)
async def test_a_write_through_query_is_read_only_and_changes_nothing(pair: Pair, sql: str):
    a, b = pair
    before = await snapshot(b.address)
    assert before["journal_mode"] == [["wal"]]
    async with raw_client(a.address) as client:
        assert_read_only(await client.request("query", {"sql": sql}))
        # The same pooled connections serve writes afterwards.
        await client.call("execute", {"sql": "insert into t(x) values (3)"})
    after = await snapshot(b.address)
    assert after["t"] == [*before["t"], [3, 3]]
    assert {k: v for k, v in after.items() if k != "t"} == {
        k: v for k, v in before.items() if k != "t"
    }
    assert a.statistics()["errors_sent"] == {"READ_ONLY": 1}


async def test_attach_through_query_creates_no_file(pair: Pair, tmp_path: Path):
    a, _ = pair
    other = tmp_path / "other.sqlite3"
    async with raw_client(a.address) as client:
        assert_read_only(await client.request("query", {"sql": f"attach '{other}' as o"}))
        assert_read_only(await client.request("query", {"sql": "detach main"}))
    assert not other.exists()


async def test_reads_still_work_through_query(pair: Pair):
    a, _ = pair
    async with raw_client(a.address) as client:
        for sql, rows in [
            ("select x from t order by id", [[1], [2]]),
            ("pragma table_info(t)", [[0, "id", "INTEGER", 0, None, 1], [1, "x", "", 0, None, 0]]),
            ("pragma index_list(t)", [[0, "tx", 0, "c", 0]]),
            ("pragma journal_mode", [["wal"]]),
            (f"{ENDLESS} select n from r limit 3", [[1], [2], [3]]),
        ]:
            assert (await client.call("query", {"sql": sql}))["rows"] == rows, sql


async def test_execute_and_batch_are_not_read_only(pair: Pair):
    a, b = pair
    async with raw_client(a.address) as client:
        await client.call("execute", {"sql": "pragma user_version = 5"})
        statements = [
            {"sql": "update t set x = 9 where id = 1"},
            {"sql": "delete from t where id = 2"},
        ]
        await client.call("batch", {"statements": statements})
    seen = await snapshot(b.address)
    assert seen["t"] == [[1, 9]] and seen["user_version"] == [[5]]


async def test_every_way_a_query_ends_leaves_its_connection_writable(tmp_path: Path):
    # One pooled connection: each query below runs on the connection the next write uses.
    config = node_config(tmp_path, sqlite_pool_size=1, request_timeout=60.0)
    async with open_node(config) as node, raw_client(node.address) as client:
        await client.call("execute", {"sql": "create table t(x)"})
        # A statement the connection already prepared for execute is checked again.
        await client.call("execute", {"sql": "pragma user_version = 3"})
        assert_read_only(await client.request("query", {"sql": "pragma user_version = 3"}))
        assert_read_only(await client.request("query", {"sql": "insert into t values (1)"}))
        sql_error = await client.request("query", {"sql": "select * from missing"})
        assert isinstance(sql_error, Error) and sql_error.name == "SQL_ERROR"
        endless = {"sql": f"{ENDLESS} select count(*) from r"}
        timeout = await client.request("query", endless, deadline_ms=200)
        assert isinstance(timeout, Error) and timeout.name == "TIMEOUT"
        await cancel_running_query(client, endless)
        for i in range(3):
            written = await client.call(
                "execute", {"sql": "insert into t values (?)", "params": [i]}
            )
            assert written == {"rows_affected": 1, "last_insert_id": i + 1}
        assert (await client.call("query", {"sql": "select count(*) from t"}))["rows"] == [[3]]


async def cancel_running_query(client: RawClient, args: dict[str, Any]) -> None:
    rid = await client.send_request("query", args)
    await trio.sleep(0.2)
    await client.send(Cancel(rid))
    ack = await client.receive(within=10.0)
    assert isinstance(ack, Error) and ack.name == "CANCELLED", ack
