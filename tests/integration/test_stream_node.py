"""The test node's result streams, frame by frame (docs/protocol.md section 12).

A raw protocol client against real nodes on one database: spooling before
page 0, credit, tokens portable across nodes and bound to their user,
CANCEL deleting the spool, STREAM_END released or kept for a resume,
retention expiry, a draining node handing its streams back, and the SQL
the client can't reach.
"""

from __future__ import annotations

import hashlib

import pytest
import trio

import qdb_client
from qdb_client.errors import SqlError, TransactionAborted
from qdb_client.protocol import (
    Cancel,
    Error,
    GoAway,
    StreamCredit,
    StreamEnd,
    StreamPage,
)
from qdb_client.testing import TestCluster, open_node
from qdb_client.testing.cli import build_parser, config_from_args, options_to_args
from qdb_client.testing.feeds import node_feeds

from ..common.fixtures import node_config
from ..common.raw_client import raw_client

pytestmark = pytest.mark.slow


async def seed(client, rows: int = 30) -> None:
    await client.call("execute", {"sql": "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"})
    for i in range(rows):
        await client.call("execute", {"sql": "INSERT INTO t (v) VALUES (?)", "params": [f"v{i}"]})


async def open_stream(
    client, credit: int = 1, page_rows: int = 5, **args
) -> tuple[int, StreamPage]:
    rid = await client.send_request(
        "query_stream",
        {
            "sql": "SELECT id, v FROM t ORDER BY id",
            "page_rows": page_rows,
            "credit": credit,
            **args,
        },
    )
    page = await client.receive()
    assert isinstance(page, StreamPage) and page.request_id == rid, page
    return rid, page


async def read_all(client, rid: int, first: StreamPage | None = None) -> tuple[list, StreamEnd]:
    """Every page of stream ``rid`` (granting a page of credit each time) and its end."""
    pages = [first] if first is not None else []
    while True:
        await client.send(StreamCredit(rid, 1))
        message = await client.receive()
        if isinstance(message, StreamEnd):
            return pages, message
        assert isinstance(message, StreamPage) and message.request_id == rid, message
        pages.append(message)


async def test_pages_follow_credit_and_end_with_the_digest(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        await seed(client)
        rid, first = await open_stream(client)
        assert (
            first.seq == 0 and first.columns == ("id", "v") and first.types == ("INTEGER", "TEXT")
        )
        assert await client.nothing_within(0.2)  # one page of credit: one page
        pages, end = await read_all(client, rid, first)
    assert [p.seq for p in pages] == list(range(6)) and end.seq == 5 and end.row_count == 30
    assert [r[0] for p in pages for r in p.rows] == list(range(1, 31))
    assert end.digest == hashlib.sha256(b"".join(p.rows_encoding for p in pages)).digest()


async def test_a_token_resumes_on_another_node_with_the_snapshot_of_the_original(tmp_path):
    async with TestCluster.start_in_process(2, directory=tmp_path / "c") as cluster:
        a, b = cluster.addresses
        async with raw_client(a) as first, raw_client(b) as second:
            await seed(first)
            rid, page0 = await open_stream(first)
            await first.send(StreamCredit(rid, 1))
            page1 = await first.receive()
            await first.aclose()  # the connection goes: the spool stays
            # The table changes; the stream must not see it.
            await second.call("execute", {"sql": "DELETE FROM t WHERE id > 3"})
            resumed = await second.send_request(
                "resume_stream", {"token": page1.resume_token, "credit": 1}
            )
            pages, end = await read_all(second, resumed, await second.receive())
    assert pages[0].seq == 2 and pages[0].request_id == resumed and pages[0].columns is None
    ids = [r[0] for p in [page0, page1, *pages] for r in p.rows]
    assert ids == list(range(1, 31)) and end.row_count == 30


async def test_cancel_stops_the_stream_and_deletes_its_spool(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        await seed(client)
        rid, page0 = await open_stream(client)
        await client.send(Cancel(rid))
        reply = await client.receive()
        assert isinstance(reply, Error) and reply.name == "CANCELLED" and reply.request_id == rid
        gone = await client.request("resume_stream", {"token": page0.resume_token, "credit": 1})
    assert isinstance(gone, Error) and gone.name == "NOT_FOUND"
    assert gone.details["reason"] == "expired"


async def test_a_finished_stream_is_kept_for_a_resume_until_released(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        await seed(client, 10)
        rid, first = await open_stream(client, page_rows=10)
        pages, end = await read_all(client, rid, first)
        # A client that lost STREAM_END resumes after its last page: STREAM_END again.
        again = await client.send_request(
            "resume_stream", {"token": pages[-1].resume_token, "credit": 1}
        )
        repeated = await client.receive()
        assert isinstance(repeated, StreamEnd) and repeated.request_id == again
        assert (repeated.row_count, repeated.digest) == (end.row_count, end.digest)
        await client.send(Cancel(rid))  # releases the spool; no reply
        assert await client.nothing_within(0.2)
        gone = await client.request("resume_stream", {"token": first.resume_token, "credit": 1})
    assert isinstance(gone, Error) and gone.details["reason"] == "expired"
    assert node_feeds(node).stats["spools_released"] == 1


async def test_an_abandoned_stream_expires_after_its_retention(tmp_path):
    config = node_config(tmp_path, stream_retention=0.3)
    async with open_node(config) as node:
        async with raw_client(node.address) as client:  # a client that goes away
            await seed(client)
            _, page0 = await open_stream(client)
        async with raw_client(node.address) as client:
            kept = await client.send_request(
                "resume_stream", {"token": page0.resume_token, "credit": 1}
            )
            page1 = await client.receive()
            assert isinstance(page1, StreamPage) and page1.request_id == kept
        await trio.sleep(0.6)  # what is tested: the retention running out, in real time
        async with raw_client(node.address) as client:
            gone = await client.request("resume_stream", {"token": page1.resume_token, "credit": 1})
    assert isinstance(gone, Error) and gone.details["reason"] == "expired"


async def test_tokens_are_bound_to_their_user_and_unguessable(tmp_path):
    users = {"alice": "a-pass", "bob": "b-pass"}
    config = node_config(tmp_path, credentials=users)
    async with open_node(config) as node:
        async with raw_client(node.address, handshake=False) as alice:
            await alice.handshake(credentials={"user": "alice", "password": "a-pass"})
            await seed(alice, 10)
            _, page0 = await open_stream(alice)
        async with raw_client(node.address, handshake=False) as bob:
            await bob.handshake(credentials={"user": "bob", "password": "b-pass"})
            stolen = await bob.request("resume_stream", {"token": page0.resume_token, "credit": 1})
            forged = bytearray(page0.resume_token)
            forged[5] ^= 1
            guessed = await bob.request("resume_stream", {"token": bytes(forged), "credit": 1})
            junk = await bob.request("resume_stream", {"token": b"\x01" * 8, "credit": 1})
    for reply in (stolen, guessed, junk):
        assert isinstance(reply, Error) and reply.name == "NOT_FOUND"
        assert reply.details["reason"] == "unknown"
    assert len(page0.resume_token) == 25  # 128 random bits in it


async def test_credit_beyond_the_cap_ends_the_stream(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        await seed(client)
        rid, _ = await open_stream(client)
        await client.send(StreamCredit(rid, 2000))
        reply = await client.receive()
    assert isinstance(reply, Error) and reply.name == "PARSE_ERROR" and reply.request_id == rid


async def test_a_draining_node_ends_its_streams_so_they_resume_elsewhere(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        await seed(client)
        await open_stream(client)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.shutdown, 5.0)
            goaway = await client.receive()
            ended = await client.receive()
    assert isinstance(goaway, GoAway)
    assert isinstance(ended, Error) and ended.name == "SHUTTING_DOWN" and ended.retryable


async def test_streams_read_only_and_keep_internal_tables_out_of_reach(tmp_path):
    async with open_node(node_config(tmp_path)) as node, raw_client(node.address) as client:
        await seed(client, 3)
        await client.call("execute", {"sql": "CREATE TABLE watched (id INTEGER PRIMARY KEY)"})
        sub = await client.send_request("subscribe", {"table": "watched", "credit": 1})
        await client.receive()  # subscribed: the change log exists
        replies = {}
        for name, sql in {
            "write": "DELETE FROM t",
            "log": "SELECT * FROM qdb_changes",
            "log tables": "SELECT * FROM qdb_change_tables",
            "spool": "SELECT * FROM qdb_stream_pages",
        }.items():
            rid = await client.send_request(
                "query_stream", {"sql": sql, "page_rows": 1, "credit": 1}
            )
            replies[name] = await client.receive()
            assert replies[name].request_id == rid
        count = await client.call("query", {"sql": "SELECT count(*) FROM t"})
        await client.send(Cancel(sub))
    assert replies["write"].name == "READ_ONLY"
    assert all(replies[k].name == "SQL_ERROR" for k in ("log", "log tables", "spool"))
    assert count["rows"] == [[3]]  # the delete never ran


def test_retention_options_have_command_line_flags():
    args = options_to_args({"stream_retention": 12.5, "change_retention": 60.0})
    assert args == ["--stream-retention", "12.5", "--change-retention", "60.0"]
    config = config_from_args(build_parser().parse_args(args), environ={})
    assert (config.stream_retention, config.change_retention) == (12.5, 60.0)


async def test_a_stream_in_a_transaction_reads_its_writes_and_its_failure_aborts_it(tmp_path):
    async with (
        open_node(node_config(tmp_path)) as node,
        qdb_client.open_client(node.address, discover_members=False) as client,
    ):
        await client.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO t (v) VALUES ('mine')")
            async with tx.stream("SELECT v FROM t") as rows:
                assert [r[0] async for r in rows] == ["mine"]  # its own uncommitted write
            await tx.execute("INSERT INTO t (v) VALUES ('more')")  # free again after page 0
        assert (await client.query("SELECT count(*) FROM t")).scalar() == 2
        # A query the node refuses is the query's error; the transaction goes on.
        async with client.transaction() as tx:
            with pytest.raises(SqlError):
                async with tx.stream("SELECT * FROM nope"):
                    pass
            await tx.execute("INSERT INTO t (v) VALUES ('third')")
        assert (await client.query("SELECT count(*) FROM t")).scalar() == 3
        # A stream that breaks can't resume elsewhere: its transaction is rolled back.
        with pytest.raises(TransactionAborted) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t (v) VALUES ('lost')")
                async with tx.stream("SELECT v FROM t", page_rows=1) as rows:
                    await rows.__anext__()
                    node.drop_connections()
                    [r async for r in rows]
        assert info.value.retryable
        assert (await client.query("SELECT count(*) FROM t")).scalar() == 3
