"""``execute`` and ``batch`` return the rows of ``... RETURNING``; ``last_insert_id`` stays linear.

Over loopback TCP with raw clients, on two nodes sharing one database file
where a keyed write's replay matters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qdb_client.protocol import encode_body
from qdb_client.testing import QdbNode, open_node

from ..common.fixtures import node_config
from ..common.raw_client import raw_client

Pair = tuple[QdbNode, QdbNode]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """Two nodes sharing one database file, which has ``t(id integer primary key, x)``."""
    async with open_node(node_config(tmp_path)) as a, open_node(node_config(tmp_path)) as b:
        async with raw_client(a.address) as client:
            await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
        yield a, b


async def test_execute_returns_the_rows_of_insert_update_delete_returning(pair: Pair):
    a, _ = pair
    async with raw_client(a.address) as client:
        inserted = await client.call(
            "execute",
            {
                "sql": "insert into t(x) values (?), (?), (?) returning id, x",
                "params": [1.5, b"\x00\xff", None],
            },
        )
        assert inserted == {
            "rows_affected": 3,
            "last_insert_id": 3,
            "columns": ["id", "x"],
            "rows": [[1, 1.5], [2, b"\x00\xff"], [3, None]],
            "types": ["INTEGER", None],
        }
        updated = await client.call(
            "execute", {"sql": "update t set x = id * 10 where id < 3 returning id, x as tens"}
        )
        assert updated["columns"] == ["id", "tens"] and updated["types"] == ["INTEGER", None]
        assert sorted(updated["rows"]) == [[1, 10], [2, 20]]
        assert (updated["rows_affected"], updated["last_insert_id"]) == (2, None)
        deleted = await client.call("execute", {"sql": "delete from t where id = 3 returning *"})
        assert deleted == {
            "rows_affected": 1,
            "last_insert_id": None,
            "columns": ["id", "x"],
            "rows": [[3, None]],
            "types": ["INTEGER", None],
        }
        none = await client.call("execute", {"sql": "delete from t where id > 99 returning id"})
        assert none == {
            "rows_affected": 0,
            "last_insert_id": None,
            "columns": ["id"],
            "rows": [],
            "types": ["INTEGER"],
        }


async def test_results_without_returning_are_byte_identical_to_before(pair: Pair):
    a, _ = pair
    async with raw_client(a.address) as client:
        inserted = await client.call("execute", {"sql": "insert into t(x) values (1)"})
        assert encode_body(inserted) == encode_body({"rows_affected": 1, "last_insert_id": 1})
        batch = await client.call(
            "batch", {"statements": [{"sql": "update t set x = 2"}, {"sql": "delete from t"}]}
        )
        assert encode_body(batch) == encode_body(
            {
                "results": [
                    {"rows_affected": 1, "last_insert_id": None},
                    {"rows_affected": 1, "last_insert_id": None},
                ]
            }
        )


async def test_batch_results_carry_returning_rows_per_statement(pair: Pair):
    a, _ = pair
    async with raw_client(a.address) as client:
        statements = [
            {"sql": "insert into t(x) values ('a') returning id"},
            {"sql": "insert into t(x) values ('b')"},
            {"sql": "update t set x = upper(x) returning x"},
        ]
        result = await client.call("batch", {"statements": statements})
    first, second, third = result["results"]
    assert first == {
        "rows_affected": 1,
        "last_insert_id": 1,
        "columns": ["id"],
        "rows": [[1]],
        "types": ["INTEGER"],
    }
    assert second == {"rows_affected": 1, "last_insert_id": 2}
    assert third["columns"] == ["x"] and sorted(third["rows"]) == [["A"], ["B"]]


async def test_keyed_returning_write_is_replayed_identically_by_the_other_node(pair: Pair):
    a, b = pair
    write = {
        "sql": "insert into t(x) values (?), (?) returning id, x, typeof(x)",
        "params": [-0.0, b"\x01"],
    }
    batch = {"statements": [write, {"sql": "update t set x = 1 where id = 1 returning id"}]}
    async with raw_client(a.address) as on_a, raw_client(b.address) as on_b:
        first = await on_a.call("execute", write, idempotency_key="ret-1")
        assert first["rows"] == [[1, -0.0, "real"], [2, b"\x01", "blob"]]
        replayed = await on_b.call("execute", write, idempotency_key="ret-1")
        assert encode_body(replayed) == encode_body(first)
        first_batch = await on_b.call("batch", batch, idempotency_key="ret-2")
        replayed_batch = await on_a.call("batch", batch, idempotency_key="ret-2")
        assert encode_body(replayed_batch) == encode_body(first_batch)
        count = await on_a.call("query", {"sql": "select count(*) from t"})
        assert count["rows"] == [[4]]  # each write applied once
    assert a.statistics()["idempotent_hits"] + b.statistics()["idempotent_hits"] == 2


async def test_crafted_comments_before_a_statement_complete(pair: Pair):
    # Each one would keep the former regular expression of last_insert_id
    # backtracking for seconds (118 bytes) to forever (20 000 comments).
    a, _ = pair
    async with raw_client(a.address) as client:
        await client.call("execute", {"sql": "insert into t(x) values (1)"})
        sql = "/**/" * 26 + " delete from t"
        assert len(sql) == 118
        assert await client.call("execute", {"sql": sql}) == {
            "rows_affected": 1,
            "last_insert_id": None,
        }
        many = "/**/" * 20_000
        inserted = await client.call("execute", {"sql": many + "insert into t(x) values (2)"})
        assert inserted == {"rows_affected": 1, "last_insert_id": 1}  # the table was empty
        updated = await client.call("execute", {"sql": many + "update t set x = 3"})
        assert updated == {"rows_affected": 1, "last_insert_id": None}
