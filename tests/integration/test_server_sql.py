"""SQL methods of the test node: results, structured errors, batch atomicity, shared storage."""

from __future__ import annotations

import pytest

from qdb_client.protocol import Error
from qdb_client.testing import QdbNode, open_node

from ..common.fixtures import node_config
from ..common.raw_client import raw_client


async def test_execute_and_query_round_trip_every_value_type(node: QdbNode):
    async with raw_client(node.address) as client:
        created = await client.call(
            "execute", {"sql": "create table t(id integer primary key, i, f, s, b, n)"}
        )
        assert created == {"rows_affected": 0, "last_insert_id": None}
        row = [-(2**63), 1.5, "héllo", b"\x00\xff", None]
        inserted = await client.call(
            "execute", {"sql": "insert into t(i, f, s, b, n) values (?, ?, ?, ?, ?)", "params": row}
        )
        assert inserted == {"rows_affected": 1, "last_insert_id": 1}
        named = await client.call(
            "execute",
            {"sql": "insert into t(i, s) values (:i, :s)", "params": {"i": True, "s": "x"}},
        )
        assert named == {"rows_affected": 1, "last_insert_id": 2}
        updated = await client.call("execute", {"sql": "update t set n = 0"})
        assert updated == {"rows_affected": 2, "last_insert_id": None}
        result = await client.call(
            "query", {"sql": "select id, i, f, s, b, n from t where id = ?", "params": [1]}
        )
        columns = ["id", "i", "f", "s", "b", "n"]
        types = ["INTEGER", None, None, None, None, None]
        assert result == {"columns": columns, "rows": [[1, *row[:4], 0]], "types": types}
        empty = await client.call("query", {"sql": "select * from t where id < 0"})
        assert empty == {"columns": columns, "rows": [], "types": types}


async def test_storage_is_sqlite_in_wal_mode(node: QdbNode):
    async with raw_client(node.address) as client:
        result = await client.call("query", {"sql": "pragma journal_mode"})
        assert result["rows"] == [["wal"]]


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ({"sql": "selec 1"}, "SQL_ERROR"),
        ({"sql": "select * from missing"}, "SQL_ERROR"),
        ({"sql": "select 1; select 2"}, "SQL_ERROR"),
        ({"sql": "select ?", "params": [1, 2]}, "SQL_ERROR"),
        ({"sql": "insert into u values (1, 'b')"}, "CONSTRAINT_VIOLATION"),
        ({"sql": "insert into u values (2, null)"}, "CONSTRAINT_VIOLATION"),
        ({"sql": "update u set y = ''"}, "CONSTRAINT_VIOLATION"),
        ({}, "INVALID_REQUEST"),
        ({"sql": "  "}, "INVALID_REQUEST"),
        ({"sql": 7}, "INVALID_REQUEST"),
        ({"sql": "select ?", "params": "x"}, "INVALID_REQUEST"),
        ({"sql": "select ?", "params": [[1]]}, "INVALID_REQUEST"),
        ({"sql": "select ?", "params": [2**64]}, "INVALID_REQUEST"),
    ],
)
async def test_sql_failures_are_structured_errors(node: QdbNode, args, name):
    async with raw_client(node.address) as client:
        await client.call(
            "execute",
            {"sql": "create table u(x integer primary key, y text not null check (y != ''))"},
        )
        await client.call("execute", {"sql": "insert into u values (1, 'a')"})
        for method in ("execute", "query"):
            reply = await client.request(method, args)
            assert isinstance(reply, Error), reply
            if method == "query" and name == "CONSTRAINT_VIOLATION":  # writes: refused by query
                assert (reply.name, reply.code) == ("READ_ONLY", 403)
                continue
            assert reply.name == name
            assert reply.code == (400 if name == "INVALID_REQUEST" else 422)
            assert reply.retryable is False
            assert reply.message
        assert (await client.call("query", {"sql": "select count(*) from u"}))["rows"] == [[1]]


async def test_batch_is_atomic(node: QdbNode):
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "create table t(k text unique)"})
        ok = await client.call(
            "batch",
            {
                "statements": [
                    {"sql": "insert into t values (?)", "params": ["a"]},
                    {"sql": "insert into t values (:k)", "params": {"k": "b"}},
                    {"sql": "update t set k = k || '!' where k = 'a'"},
                ]
            },
        )
        assert ok == {
            "results": [
                {"rows_affected": 1, "last_insert_id": 1},
                {"rows_affected": 1, "last_insert_id": 2},
                {"rows_affected": 1, "last_insert_id": None},
            ]
        }
        reply = await client.request(
            "batch",
            {
                "statements": [
                    {"sql": "insert into t values ('c')"},
                    {"sql": "delete from t where k = 'b'"},
                    {"sql": "insert into t values ('a!')"},
                    {"sql": "insert into t values ('d')"},
                ]
            },
        )
        assert isinstance(reply, Error) and reply.name == "CONSTRAINT_VIOLATION"
        assert reply.details["statement_index"] == 2
        rows = await client.call("query", {"sql": "select k from t order by k"})
        assert rows["rows"] == [["a!"], ["b"]]  # nothing of the failed batch applied
        bad_arg = await client.request(
            "batch", {"statements": [{"sql": "select 1"}, {"sql": "select ?", "params": 3}]}
        )
        assert isinstance(bad_arg, Error) and bad_arg.name == "INVALID_REQUEST"
        assert bad_arg.details == {"statement_index": 1}
        not_a_list = await client.request("batch", {"statements": "insert"})
        assert isinstance(not_a_list, Error) and not_a_list.name == "INVALID_REQUEST"
        assert await client.call("batch", {"statements": []}) == {"results": []}


async def test_two_nodes_on_one_database_see_each_others_writes(tmp_path):
    config = node_config(tmp_path)
    async with open_node(config) as a, open_node(config) as b:
        assert a.address != b.address
        async with raw_client(a.address) as via_a, raw_client(b.address) as via_b:
            await via_a.call("execute", {"sql": "create table kv(k primary key, v)"})
            await via_a.call("execute", {"sql": "insert into kv values ('x', 1)"})
            assert (await via_b.call("query", {"sql": "select v from kv"}))["rows"] == [[1]]
            await via_b.call(
                "batch",
                {
                    "statements": [
                        {"sql": "update kv set v = 2"},
                        {"sql": "insert into kv values ('y', 3)"},
                    ]
                },
            )
            rows = await via_a.call("query", {"sql": "select k, v from kv order by k"})
            assert rows["rows"] == [["x", 2], ["y", 3]]
            reply = await via_a.request("execute", {"sql": "insert into kv values ('y', 4)"})
            assert isinstance(reply, Error) and reply.name == "CONSTRAINT_VIOLATION"
