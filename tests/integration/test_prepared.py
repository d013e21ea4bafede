"""Prepared statements against real test nodes (docs/protocol.md section 10.3).

The driver prepares once per connection and sends the id afterwards; the node
keeps statements per session, at most ``max_prepared`` (least recently used
dropped), and answers UNPREPARED for ids it does not hold, which the driver
handles by sending the text again. Wire-level details (what the node answers
by itself) are checked with a raw client.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import qdb_client
from qdb_client.errors import InvalidArgument
from qdb_client.protocol import Error, Response
from qdb_client.testing import QdbNode, TestCluster, open_node

from ..common.fixtures import node_config
from ..common.raw_client import raw_client

FAST = {"heartbeat_interval": 60.0, "slow_start": 0.0, "random_seed": 5}


async def test_prepare_then_query_and_execute_with_the_statement(node: QdbNode):
    async with qdb_client.open_client(node.address, discover_members=False, **FAST) as client:
        await client.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        insert = await client.prepare("INSERT INTO users (id, name) VALUES (:id, :name)")
        assert (insert.params, set(insert.names), insert.columns) == (2, {"id", "name"}, None)
        for i in range(5):
            result = await insert.execute({"id": i, "name": f"u{i}"})
            assert result.rows_affected == 1 and result.last_insert_id == i
        select = await client.prepare("SELECT id, name FROM users WHERE id >= ? ORDER BY id")
        assert (select.params, select.names, select.columns) == (1, (), ("id", "name"))
        rows = await select.query([3])
        assert [tuple(r) for r in rows.rows] == [(3, "u3"), (4, "u4")]
        assert rows.types == ("INTEGER", "TEXT")
        assert client.statistics()["requeues"] == 0  # the ids held: nothing sent twice
    stats = node.statistics()
    assert stats["statements_prepared"] == 2
    assert stats["errors_sent"] == {}


async def test_wrong_parameters_fail_before_anything_is_sent(node: QdbNode):
    async with qdb_client.open_client(node.address, discover_members=False, **FAST) as client:
        stmt = await client.prepare("SELECT ? + ?")
        before = dict(node.statistics()["requests_by_method"])
        with pytest.raises(InvalidArgument):
            await stmt.query([1])
        with pytest.raises(InvalidArgument):
            await stmt.query({"a": 1, "b": 2})
        named = await client.prepare("SELECT :a")
        with pytest.raises(InvalidArgument):
            await named.query({"b": 1})
        assert node.statistics()["requests_by_method"] == {**before, "prepare": 2}
        assert (await stmt.query([1, 2])).scalar() == 3


async def test_a_statement_is_prepared_again_on_another_node():
    async with (
        TestCluster.start_in_process(3) as cluster,
        qdb_client.open_client(cluster.addresses, load_balancing="round_robin", **FAST) as client,
    ):
        stmt = await client.prepare("SELECT ? * 2")
        for i in range(9):  # round robin: every node sees it, each prepares it once
            assert (await stmt.query([i])).scalar() == 2 * i
        served = []
        for server in cluster.nodes:
            assert server.node is not None
            stats = server.node.statistics()
            served.append(stats["requests_by_method"].get("query", 0))
            assert stats["errors_sent"] == {}  # no UNPREPARED: each node got the text first
        assert served == [3, 3, 3]


async def test_a_statement_the_node_dropped_is_prepared_again(tmp_path: Path):
    """``max_prepared=1``: preparing a second statement drops the first from the
    session; its next call is UNPREPARED, and the driver sends the text again."""
    async with (
        open_node(node_config(tmp_path, max_prepared=1)) as node,
        qdb_client.open_client(
            node.address, discover_members=False, max_connections=1, **FAST
        ) as client,
    ):
        first = await client.prepare("SELECT 1 + ?")
        second = await client.prepare("SELECT 2 + ?")
        assert (await first.query([1])).scalar() == 2  # prepares it on the connection
        assert (await second.query([1])).scalar() == 3  # drops the first from the session
        assert (await first.query([2])).scalar() == 3  # UNPREPARED, then the text again
        assert node.statistics()["errors_sent"] == {"UNPREPARED": 1}
        assert client.statistics()["requeues"] == 1


async def test_the_node_side_of_prepare_unprepare_and_unknown_ids(node: QdbNode):
    async with raw_client(node.address) as client, raw_client(node.address) as other:
        await client.call("execute", {"sql": "CREATE TABLE t (a INTEGER, b TEXT)"})
        prepared = await client.call("prepare", {"sql": "SELECT a, b FROM t WHERE a = $a"})
        assert prepared == {"stmt": 1, "params": 1, "names": ["a"], "columns": ["a", "b"]}
        again = await client.call("prepare", {"sql": "SELECT a, b FROM t WHERE a = $a"})
        assert again["stmt"] == 1  # the same text keeps its id
        insert = await client.call(
            "execute", {"sql": "INSERT INTO t VALUES (?, ?)", "params": [1, "x"], "prepare": True}
        )
        assert insert["stmt"] == 2 and insert["rows_affected"] == 1
        by_id = await client.call("execute", {"stmt": 2, "params": [2, "y"]})
        assert "stmt" not in by_id and by_id["rows_affected"] == 1
        rows = await client.call("query", {"stmt": 1, "params": {"a": 2}})
        assert rows == {"columns": ["a", "b"], "rows": [[2, "y"]], "types": ["INTEGER", "TEXT"]}
        wrong = await client.request("query", {"stmt": 1, "params": [2]})
        assert isinstance(wrong, Error) and wrong.name == "INVALID_REQUEST"
        elsewhere = await other.request("query", {"stmt": 1, "params": {"a": 2}})
        assert isinstance(elsewhere, Error) and elsewhere.name == "UNPREPARED"  # per session
        assert await client.call("unprepare", {"stmt": 1}) == {}
        gone = await client.request("query", {"stmt": 1, "params": {"a": 2}})
        assert isinstance(gone, Error) and gone.name == "UNPREPARED"
        assert await client.call("unprepare", {"stmt": 1}) == {}  # idempotent
        for sql, fragment in [
            ("SELECT 1; SELECT 2", "one statement"),
            ("SELECT :a, ?", "mixes"),
            ("SELECT * FROM missing", "no such table"),
        ]:
            refused = await client.request("prepare", {"sql": sql})
            assert isinstance(refused, Error) and refused.name == "SQL_ERROR", sql
            assert fragment in refused.message


async def test_a_keyed_write_by_id_is_the_same_request_as_by_text(node: QdbNode):
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "CREATE TABLE t (a INTEGER)"})
        insert = {"sql": "INSERT INTO t VALUES (?)", "params": [7]}
        first = await client.request("execute", {**insert, "prepare": True}, idempotency_key="p-1")
        assert isinstance(first, Response) and not first.replayed
        stmt = first.result["stmt"]
        replay = await client.request(
            "execute", {"stmt": stmt, "params": [7]}, idempotency_key="p-1"
        )
        assert isinstance(replay, Response) and replay.replayed
        assert replay.result == {"rows_affected": 1, "last_insert_id": 1}  # no session's stmt
        other = await client.request(
            "execute", {"stmt": stmt, "params": [8]}, idempotency_key="p-1"
        )
        assert isinstance(other, Error) and other.name == "CONFLICT"
        assert (await client.call("query", {"sql": "SELECT count(*) FROM t"}))["rows"] == [[1]]
