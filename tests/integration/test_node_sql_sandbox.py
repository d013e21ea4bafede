"""Issue 9: the node's SQL sandbox. Client SQL can't reach outside the database nor
into the node's own tables, while the change log's triggers keep working.

The node below requires credentials (so ``qdb_sessions`` exists), holds a keyed
write (``qdb_idempotency``) and a subscription (``qdb_changes``,
``qdb_change_tables`` and the ``qdb_change_<hash>_*`` triggers). Every refusal
is SQL_ERROR with ``details.executed = false`` and ``sqlite_error`` SQLITE_AUTH,
before anything ran.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from qdb_client.protocol import Cancel, Error, Event, Response
from qdb_client.testing import QdbNode, open_node
from qdb_client.testing.authorizers import INTERNAL_TABLES, is_change_trigger
from qdb_client.testing.changelog import CHANGE_TABLES, trigger_names
from qdb_client.testing.idempotency import SCHEMA as IDEMPOTENCY_SCHEMA
from qdb_client.testing.sessions import SCHEMA as SESSION_SCHEMA
from qdb_client.testing.spool import SPOOL_TABLES

from ..common.fixtures import node_config, node_rows
from ..common.raw_client import RawClient, raw_client

USER = {"user": "ada", "password": "pw"}


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[tuple[QdbNode, RawClient, RawClient]]:
    """A node with credentials, a keyed write stored, a live subscription to ``t``; a
    client, and the subscriber's connection."""
    config = node_config(tmp_path, credentials={"ada": "pw"})
    async with open_node(config) as node, raw_client(node.address, handshake=False) as client:
        await client.handshake(credentials=USER)
        async with raw_client(node.address, handshake=False) as subscriber:
            await subscriber.handshake(credentials=USER)
            await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
            await client.call(
                "execute", {"sql": "insert into t(x) values (0)"}, idempotency_key="k-1"
            )
            await subscriber.send_request("subscribe", {"table": "t", "credit": 100})
            assert isinstance(await subscriber.receive(), Response)
            yield node, client, subscriber


def assert_refused(reply: Any, what: str = "") -> None:
    assert isinstance(reply, Error) and reply.name == "SQL_ERROR", reply
    assert reply.details["executed"] is False, reply
    assert reply.details["sqlite_error"] == "SQLITE_AUTH", reply
    assert what in reply.message, reply.message


def test_internal_tables_list_every_table_the_node_creates():
    created = set()
    for statement in (*IDEMPOTENCY_SCHEMA, *SESSION_SCHEMA):
        words = statement.split()
        if words[:2] == ["CREATE", "TABLE"]:
            created.add(words[5] if words[2:5] == ["IF", "NOT", "EXISTS"] else words[2])
    assert created | set(CHANGE_TABLES) | set(SPOOL_TABLES) == INTERNAL_TABLES


def test_change_trigger_names_are_recognised_exactly():
    for name in trigger_names("Orders").values():
        assert is_change_trigger(name)
    for name in (
        None,
        "qdb_change_0123456789abcdef_truncate",
        "qdb_change_0123456789ABCDEF_insert",
        "qdb_change_0123456789abcde_insert",
        "qdb_change_0123456789abcdef_insert_x",
        "x_qdb_change_0123456789abcdef_insert",
    ):
        assert not is_change_trigger(name), name


@pytest.mark.parametrize("table", sorted(INTERNAL_TABLES - set(SPOOL_TABLES)))
@pytest.mark.parametrize(
    ("method", "template"),
    [
        ("query", "select * from {t}"),
        ("query", "select count(*) from {t}"),
        ("query", "select 1 from t where exists (select 1 from {t})"),
        ("execute", "delete from {t}"),
        ("execute", "update {t} set rowid = rowid"),
        ("execute", "insert into {t} default values"),
        ("execute", "create index sneaky on {t}(rowid)"),
        ("execute", "alter table {t} add column y"),
        ("execute", "drop table {t}"),
        ("execute", "create temp table {t}(x)"),
        ("execute", "create trigger spy after insert on {t} begin select 1; end"),
    ],
)
async def test_no_access_from_client_sql_to_the_nodes_internal_tables(
    sandbox, table, method, template
):
    node, client, _ = sandbox
    before = node_rows(node, f"select count(*) from {table}")
    reply = await client.request(method, {"sql": template.format(t=table)})
    assert_refused(reply, table)
    assert node_rows(node, f"select count(*) from {table}") == before


@pytest.mark.parametrize("method", ["batch", "executemany", "query_stream", "tx"])
async def test_internal_tables_are_out_of_reach_through_every_method(sandbox, method):
    node, client, _ = sandbox
    sql = "delete from qdb_idempotency"
    if method == "batch":
        reply = await client.request("batch", {"statements": [{"sql": sql}]})
    elif method == "executemany":
        reply = await client.request("executemany", {"sql": sql, "rows": [[]]})
    elif method == "query_stream":
        reply = await client.request(
            "query_stream", {"sql": "select * from qdb_sessions", "page_rows": 1, "credit": 1}
        )
    else:
        tx = (await client.call("begin", {}))["tx"]
        reply = await client.request("execute", {"sql": sql, "tx": tx})
        await client.call("rollback", {"tx": tx})
    assert isinstance(reply, Error) and reply.name == "SQL_ERROR", reply
    assert node_rows(node, "select count(*) from qdb_idempotency") == [[1]]


async def test_a_view_or_a_clients_trigger_does_not_reach_internal_tables(sandbox):
    node, client, _ = sandbox
    await client.call("execute", {"sql": "create view v as select * from qdb_sessions"})
    assert_refused(await client.request("query", {"sql": "select * from v"}), "qdb_sessions")
    await client.call("execute", {"sql": "create table mine(x)"})
    await client.call(
        "execute",
        {"sql": "create trigger wipe after insert on mine begin delete from qdb_idempotency; end"},
    )
    assert_refused(await client.request("execute", {"sql": "insert into mine values (1)"}))
    assert node_rows(node, "select count(*) from qdb_idempotency") == [[1]]
    forged = "create trigger forge after insert on mine begin insert into qdb_changes"
    forged += " (tbl, kind, key, row, created_at) values ('t', 'insert', 1, '[]', 0); end"
    await client.call("execute", {"sql": forged})
    assert_refused(await client.request("execute", {"sql": "insert into mine values (2)"}))


async def test_change_log_triggers_can_be_neither_created_nor_dropped_by_client_sql(sandbox):
    node, client, _subscriber = sandbox
    names = trigger_names("t")
    for kind, name in names.items():
        assert_refused(await client.request("execute", {"sql": f"drop trigger {name}"}), name)
        create = f"create trigger {name}_x after {kind} on t begin select 1; end"
        assert_refused(await client.request("execute", {"sql": create}))
    fake = "qdb_change_0123456789abcdef_insert"
    await client.call("execute", {"sql": "create table other(x)"})
    sql = f"create trigger {fake} after insert on other begin insert into qdb_changes"
    sql += " (tbl, kind, key, row, created_at) values ('t', 'insert', 1, '[]', 0); end"
    assert_refused(await client.request("execute", {"sql": sql}), fake)
    triggers = node_rows(node, "select name from sqlite_master where type = 'trigger'")
    assert sorted(r[0] for r in triggers) == sorted(names.values())


async def test_change_log_triggers_still_log_every_client_write(sandbox):
    # The exception: their own inserts into qdb_changes, whose source is the trigger.
    _node, client, subscriber = sandbox
    await client.call("execute", {"sql": "insert into t(x) values (1)"})
    await client.call("batch", {"statements": [{"sql": "update t set x = 2 where x = 1"}]})
    await client.call("execute", {"sql": "delete from t where x = 2"}, idempotency_key="k-2")
    kinds = []
    with trio.fail_after(10):
        while len(kinds) < 3:
            event = await subscriber.receive()
            assert isinstance(event, Event), event
            kinds.append(event.data["kind"])
    assert kinds == ["insert", "update", "delete"]
    await subscriber.send(Cancel(1))


async def test_no_vacuum_into_a_file_but_vacuum_works(sandbox, tmp_path):
    _node, client, _ = sandbox
    target = tmp_path / "stolen.sqlite3"
    for sql, params in ((f"vacuum into '{target}'", None), ("vacuum into ?", [str(target)])):
        reply = await client.request("execute", {"sql": sql, "params": params})
        assert_refused(reply, "VACUUM INTO")
    assert not target.exists()
    assert await client.call("execute", {"sql": "vacuum"}) == {
        "rows_affected": 0,
        "last_insert_id": None,
    }


@pytest.mark.parametrize(
    "pragma",
    [
        "writable_schema = on",
        "journal_mode = delete",
        "schema_version = 1",
        "soft_heap_limit = 1",
        "hard_heap_limit = 1",
        "temp_store_directory = '/tmp'",
    ],
)
async def test_no_dangerous_pragmas(sandbox, pragma):
    _node, client, _ = sandbox
    assert_refused(await client.request("execute", {"sql": f"pragma {pragma}"}), "PRAGMA")


async def test_no_attach_or_detach(sandbox, tmp_path):
    _node, client, _ = sandbox
    target = tmp_path / "attached.sqlite3"
    assert_refused(await client.request("execute", {"sql": f"attach '{target}' as x"}), "ATTACH")
    assert_refused(await client.request("execute", {"sql": "detach main"}), "DETACH")
    assert not target.exists()
