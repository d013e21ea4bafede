"""Streams and subscriptions of the test node under faults that must end one request,
never the connection: a CANCEL while a page is half written, a ``where`` filter that
never ends or fails on one row, an SQLite error of the spool or of the change log.

In-memory connections and virtual time; the SQL runs inline (real CPU time), so a
filter's budget (``NodeFeeds.filter_seconds``, real seconds) is set small here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from qdb_client.protocol import Cancel, Error, Event, Response, StreamEnd, StreamPage
from qdb_client.testing import QdbNode, streams, subscriptions
from qdb_client.testing.feeds import node_feeds

from ..common.raw_client import RawClient
from .test_node_hardening import attach
from .test_node_hardening import running as running_node

#: A filter that takes seconds of CPU on every row (the old node ran it to its end).
SLOW = "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 30000000)"
SLOW += " SELECT count(*) FROM c) > 0"


@asynccontextmanager
async def running(**config: Any) -> AsyncIterator[tuple[QdbNode, trio.Nursery]]:
    """A node (its storage open: streams need the file) and a nursery for its connections."""
    async with running_node(**config) as (node, nursery):
        await node.storage.open()
        yield node, nursery


class Trickle(trio.abc.Stream):
    """The node's end of a connection whose writes leave in 4 KiB pieces, as a
    socket's do towards a client that reads slowly: a cancel can land between two."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        for start in range(0, len(data), 4096):
            await self._inner.send_all(data[start : start + 4096])
            await trio.sleep(0.001)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def trickling_client(node: QdbNode, nursery: trio.Nursery) -> RawClient:
    client_end, node_end = trio.testing.memory_stream_pair()
    nursery.start_soon(lambda: node.serve_connection(Trickle(node_end)))
    client = RawClient(client_end, timeout=60.0)
    await client.handshake()
    return client


async def subscribed(client: RawClient, where: str, credit: int = 8) -> int:
    await client.call("execute", {"sql": "create table t(id integer primary key, v int)"})
    rid = await client.send_request("subscribe", {"table": "t", "where": where, "credit": credit})
    reply = await client.receive()
    assert isinstance(reply, Response) and reply.request_id == rid, reply
    return rid


async def replies(client: RawClient, count: int) -> dict[int, Any]:
    """The next ``count`` messages, by request id (a connection that ends fails)."""
    got: dict[int, Any] = {}
    while len(got) < count:
        message = await client.receive()
        got[getattr(message, "request_id", -1)] = message
    return got


# ------------------------------------------------------------- item 3: whole frames


async def test_a_cancel_while_a_page_is_being_written_leaves_the_frame_whole(autojump_clock):
    async with running() as (node, nursery):
        client = await trickling_client(node, nursery)
        sql = "select randomblob(400000) as b"
        rid = await client.send_request("query_stream", {"sql": sql, "page_rows": 1, "credit": 4})
        await trio.sleep(0.05)  # the page takes ~0.1 s to write: the CANCEL lands inside it
        await client.send(Cancel(rid))
        other = await client.send_request("query", {"sql": "select 42 as n"})
        page = await client.receive()
        assert isinstance(page, StreamPage) and len(page.rows[0][0]) == 400000, page
        got = await replies(client, 2)
        assert isinstance(got[rid], Error) and got[rid].name == "CANCELLED", got
        assert isinstance(got[other], Response) and got[other].result["rows"] == [[42]]


async def test_the_write_timeout_still_bounds_a_frame_the_cancel_cannot_cut(autojump_clock):
    # A frame is whole or the connection is aborted: here at the write's own bound.
    async with running(write_timeout=0.05) as (node, nursery):
        client = await trickling_client(node, nursery)
        sql = "select randomblob(400000) as b"
        await client.send_request("query_stream", {"sql": sql, "page_rows": 1, "credit": 4})
        with pytest.raises(EOFError):
            await client.receive()
        assert node.stats.slow_readers_closed == 1


# ----------------------------------------------------- item 2: the filter's budget


async def test_a_filter_longer_than_its_budget_is_refused_at_subscribe(autojump_clock):
    async with running() as (node, nursery):
        node_feeds(node).filter_seconds = 0.05
        client = await attach(node, nursery)
        await client.call("execute", {"sql": "create table t(id integer primary key, v int)"})
        args = {"table": "t", "where": SLOW, "credit": 1}
        reply = await client.request("subscribe", args)
        assert isinstance(reply, Error) and reply.name == "INVALID_REQUEST", reply
        assert reply.details["reason"] == "where"
        assert "longer than 0.05 s" in reply.message
        assert (await client.call("query", {"sql": "select 1 as one"}))["rows"] == [[1]]


async def test_a_filter_that_needs_more_than_the_request_deadline_is_a_timeout(autojump_clock):
    async with running() as (node, nursery):
        node_feeds(node).filter_seconds = 60.0
        client = await attach(node, nursery)
        await client.call("execute", {"sql": "create table t(id integer primary key, v int)"})
        args = {"table": "t", "where": SLOW, "credit": 1}
        reply = await client.request("subscribe", args, deadline_ms=50)
        assert isinstance(reply, Error) and reply.name == "TIMEOUT", reply


async def test_a_filter_longer_than_its_budget_on_one_event_ends_the_subscription_there(
    autojump_clock,
):
    async with running() as (node, nursery):
        node_feeds(node).filter_seconds = 0.05
        client = await attach(node, nursery)
        writer = await attach(node, nursery)
        rid = await subscribed(client, f"CASE WHEN v = 2 THEN {SLOW} ELSE 1 END")
        for v in (1, 2, 3):
            await writer.call("execute", {"sql": "insert into t(v) values (?)", "params": [v]})
        first = await client.receive()
        assert isinstance(first, Event) and first.data["row"]["v"] == 1, first
        ended = await client.receive()
        assert isinstance(ended, Error) and ended.request_id == rid, ended
        assert ended.name == "INVALID_REQUEST" and ended.details["reason"] == "where"
        assert ended.details["event_id"] == first.data["event_id"] + 1
        assert "longer than 0.05 s" in ended.message


# ------------------------------------------- item 5: errors end the request, not more


async def test_a_filter_that_fails_on_one_row_ends_the_subscription_naming_the_event(
    autojump_clock,
):
    async with running() as (node, nursery):
        client, writer = await attach(node, nursery), await attach(node, nursery)
        rid = await subscribed(client, "abs(v) >= 0")
        sql = "insert into t(v) values (-9223372036854775808)"
        await writer.call("execute", {"sql": sql})
        other = await client.send_request("query", {"sql": "select 7 as n"})
        got = await replies(client, 2)
        ended = got[rid]
        assert isinstance(ended, Error) and ended.name == "INVALID_REQUEST", ended
        assert ended.details == {"reason": "where", "event_id": 1}
        assert "integer overflow" in ended.message and "from_event 2" in ended.message
        assert isinstance(got[other], Response), got
        # Subscribing from the next event passes it.
        args = {"table": "t", "where": "abs(v) >= 0", "credit": 4, "from_event": 2}
        again = await client.send_request("subscribe", args)
        assert isinstance(await client.receive(), Response)
        await writer.call("execute", {"sql": "insert into t(v) values (5)"})
        event = await client.receive()
        assert isinstance(event, Event) and event.request_id == again, event
        assert event.data["row"]["v"] == 5


def _locked(*args: Any) -> None:
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorname = "SQLITE_BUSY"
    raise exc


async def test_a_busy_spool_at_resume_is_unavailable_on_the_stream_alone(
    autojump_clock, monkeypatch
):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        await client.call("execute", {"sql": "create table t(id integer primary key)"})
        await client.call("execute", {"sql": "insert into t default values"})
        await client.call("execute", {"sql": "insert into t default values"})
        sql = "select id from t"
        await client.send_request("query_stream", {"sql": sql, "page_rows": 1, "credit": 1})
        page = await client.receive()
        assert isinstance(page, StreamPage), page
        monkeypatch.setattr(streams, "touch_spool", _locked)
        args = {"token": page.resume_token, "credit": 1}
        resumed = await client.send_request("resume_stream", args)
        other = await client.send_request("query", {"sql": "select 1 as one"})
        got = await replies(client, 2)
        assert isinstance(got[resumed], Error) and got[resumed].name == "UNAVAILABLE", got
        assert got[resumed].retryable and got[resumed].details["sqlite_error"] == "SQLITE_BUSY"
        assert isinstance(got[other], Response), got


async def test_an_error_of_the_change_log_ends_the_subscription_alone(autojump_clock, monkeypatch):
    async with running() as (node, nursery):
        client, writer = await attach(node, nursery), await attach(node, nursery)
        rid = await subscribed(client, "v > 0")

        def malformed(*args: Any) -> None:
            raise sqlite3.DatabaseError("database disk image is malformed")

        monkeypatch.setattr(subscriptions, "read_changes", malformed)
        await writer.call("execute", {"sql": "insert into t(v) values (1)"})
        ended = await client.receive()
        assert isinstance(ended, Error) and ended.request_id == rid, ended
        assert ended.name == "INTERNAL" and "malformed" in ended.message
        assert (await client.call("query", {"sql": "select 1 as one"}))["rows"] == [[1]]


async def test_a_stream_that_ends_keeps_its_reply_when_its_spool_cannot_be_kept_longer(
    autojump_clock, monkeypatch
):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        monkeypatch.setattr(streams, "touch_spool", _locked)
        sql = "select 1 as one"
        rid = await client.send_request("query_stream", {"sql": sql, "page_rows": 1, "credit": 1})
        assert isinstance(await client.receive(), StreamPage)
        end = await client.receive()
        assert isinstance(end, StreamEnd) and end.request_id == rid, end
        assert (await client.call("query", {"sql": "select 2 as two"}))["rows"] == [[2]]
