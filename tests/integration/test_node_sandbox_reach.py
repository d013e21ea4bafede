"""The node's SQL sandbox against what reaches past the database: functions that read
or install pointers of the node process (``fts3_tokenizer``), virtual tables that read
the file's pages (``dbstat``), the file's path (``database_list``); the names of the
node's own objects (``authorizers.RESERVED_PREFIXES``); and a ``where`` filter that
never ends, which a node that stops must interrupt (real threads: a real node).
"""

from __future__ import annotations

import pytest
import trio

from qdb_client.protocol import Error, Response
from qdb_client.testing import TestCluster, open_node
from qdb_client.testing.changelog import CHANGE_TABLES
from qdb_client.testing.feeds import node_feeds

from ..common.fixtures import node_config, node_rows
from ..common.raw_client import raw_client
from .test_node_sql_sandbox import assert_refused

pytestmark = pytest.mark.slow

ENDLESS = "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*)"
ENDLESS += " FROM c) > 0"


@pytest.mark.parametrize(
    ("method", "sql", "what"),
    [
        ("query", "select fts3_tokenizer('simple')", "fts3_tokenizer"),
        ("execute", "select fts3_tokenizer('evil', x'4141414141414141')", "fts3_tokenizer"),
        ("query_stream", "select hex(fts3_tokenizer('porter'))", "fts3_tokenizer"),
        ("query", "select * from dbstat", "dbstat"),
        ("execute", "create virtual table temp.pages using dbstat", "dbstat"),
        ("query", "select file from pragma_database_list", "database_list"),
        ("query", "pragma database_list", "database_list"),
    ],
)
async def test_what_reaches_into_the_node_process_or_its_files_is_refused(
    tmp_path, method, sql, what
):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        args = {"sql": sql}
        if method == "query_stream":
            args.update(page_rows=1, credit=1)
        assert_refused(await client.request(method, args), what)
        # What the tests of the sandbox rely on stays: the names of the attached databases.
        reply = await client.call("query", {"sql": "select name from pragma_database_list"})
        assert reply["rows"] == [["main"]]


async def test_a_planted_tokenizer_does_not_crash_the_node():
    # A node process of its own: the old node died of SIGSEGV here.
    async with (
        TestCluster.start_subprocesses(n=1) as cluster,
        raw_client(cluster.addresses[0]) as client,
    ):
        plant = "select fts3_tokenizer('evil', x'4141414141414141')"
        use = "create virtual table x using fts3(a, tokenize=evil)"
        reply = await client.request("batch", {"statements": [{"sql": plant}, {"sql": use}]})
        assert_refused(reply, "fts3_tokenizer")
        assert (await client.call("query", {"sql": "select 1 as one"}))["rows"] == [[1]]
        await client.call("execute", {"sql": "create virtual table y using fts4(a)"})


@pytest.mark.parametrize(
    "sql",
    [
        "create view qdb_changes as select 7 as event_id",
        "create view qdb_change_tables as select 1 as tbl",
        "create temp view qdb_changes as select 1 as event_id",
        "create table qdb_sessions_2(x)",
        "create temp table QDB_Idempotency_x(x)",
        "create index qdb_changes_mine on t(x)",
        "create trigger qdb_stream_mine after insert on t begin select 1; end",
        "create virtual table qdb_change_mine using fts4(a)",
    ],
)
async def test_names_with_the_nodes_prefix_are_reserved_and_subscriptions_keep_working(
    tmp_path, sql
):
    async with (
        open_node(node_config(tmp_path)) as node,
        raw_client(node.address) as client,
        raw_client(node.address) as subscriber,
    ):
        await client.call("execute", {"sql": "create table t(id integer primary key, x)"})
        assert_refused(await client.request("execute", {"sql": sql}), "reserved")
        reply = await subscriber.request("subscribe", {"table": "t", "credit": 1})
        assert isinstance(reply, Response), reply


async def test_other_qdb_names_stay_the_clients(tmp_path):
    # The driver's saga store (qdb_sagas) and `qdb bench`'s table are client tables.
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        for sql in ("create table qdb_sagas(id)", "create index qdb_bench_n on qdb_sagas(id)"):
            assert isinstance(await client.request("execute", {"sql": sql}), Response)


async def test_the_change_log_exists_from_the_start_so_a_rename_cannot_take_its_name(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        tables = node_rows(node, "select name from sqlite_master where type = 'table'")
        assert set(CHANGE_TABLES) <= {row[0] for row in tables}
        await client.call("execute", {"sql": "create table mine(x)"})
        reply = await client.request("execute", {"sql": "alter table mine rename to qdb_changes"})
        assert isinstance(reply, Error) and reply.name == "SQL_ERROR", reply


async def test_a_node_that_stops_interrupts_a_filter_that_never_ends(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        node_feeds(node).filter_seconds = 3600.0  # only the stop can end it
        await client.call("execute", {"sql": "create table t(id integer primary key)"})
        args = {"table": "t", "where": ENDLESS, "credit": 1}
        rid = await client.send_request("subscribe", args, deadline_ms=3_600_000)
        await trio.sleep(0.2)  # the filter is running
        with trio.fail_after(5):
            await node.shutdown(grace=0.0)
        replies = await client.read_until_eof(within=5)
        assert any(isinstance(m, Error) and m.request_id == rid for m in replies), replies
