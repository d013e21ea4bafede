"""CANCEL and request slots over loopback TCP, with SQL running in worker threads.

What needs real sockets and threads: a CANCEL interrupting a statement that
SQLite is executing, a CANCEL of a write that waits for SQLite's write lock
or whose COMMIT is already done, and a client that sends its next request
the moment a reply arrives over a socket (trio yields after every
successful send).

docs/protocol.md 8.3: if the request was still running, the node stops it,
"a write is rolled back: nothing applied, nothing stored under its
idempotency key", and answers ERROR CANCELLED with ``details.executed =
false``; a request that had finished keeps its reply.
"""

from __future__ import annotations

import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from qdb_client.protocol import (
    Cancel,
    Error,
    Hello,
    ProtocolConnection,
    Request,
    Response,
    Role,
    Welcome,
)
from qdb_client.testing import open_node, parse_address, writes

from ..common.fixtures import node_config, node_rows
from ..common.raw_client import raw_client

ENDLESS = "with recursive r(n) as (select 1 union all select n + 1 from r)"


async def test_cancel_interrupts_a_running_statement_and_is_acknowledged(tmp_path: Path):
    async with open_node(node_config(tmp_path, request_timeout=60.0)) as node:
        async with raw_client(node.address) as client:
            endless = {"sql": f"{ENDLESS} select count(*) from r"}
            rid = await client.send_request("query", endless)
            await trio.sleep(0.3)  # let SQLite get going in its thread
            await client.send(Cancel(rid))
            ack = await client.receive(within=10.0)
            assert isinstance(ack, Error) and ack.request_id == rid, ack
            assert ack.name == "CANCELLED" and ack.details == {"executed": False}
            assert await client.call("query", {"sql": "select 2"}) == {
                "columns": ["2"],
                "rows": [[2]],
                "types": [None],
            }
        stats = node.statistics()
        assert stats["requests_cancelled"] == 1 and stats["errors_sent"] == {"CANCELLED": 1}


async def test_keyed_write_cancelled_mid_statement_stores_nothing(tmp_path: Path):
    async with open_node(node_config(tmp_path, request_timeout=60.0)) as node:
        async with raw_client(node.address) as client:
            await client.call("execute", {"sql": "create table t(x)"})
            first = {"sql": "insert into t values (1)"}
            endless = {"sql": f"insert into t {ENDLESS} select n from r limit 100000000"}
            rid = await client.send_request(
                "batch", {"statements": [first, endless]}, idempotency_key="k-1"
            )
            await trio.sleep(0.3)  # statement 0 applied in the transaction, statement 1 running
            await client.send(Cancel(rid))
            ack = await client.receive(within=10.0)
            assert isinstance(ack, Error) and ack.name == "CANCELLED", ack
            assert await client.call("query", {"sql": "select count(*) from t"}) == {
                "columns": ["count(*)"],
                "rows": [[0]],
                "types": [None],
            }
            assert node_rows(node, "select key from qdb_idempotency") == []
            # Nothing stored: the key may even serve another request now.
            result = await client.call("execute", first, idempotency_key="k-1")
            assert result == {"rows_affected": 1, "last_insert_id": 1}
        assert node.statistics()["idempotent_stored"] == 1


def _blocking_pipeline(address: str, count: int) -> list[object]:
    """A client in its own thread: each request is written the moment the reply is read."""
    host, port = parse_address(address)
    proto = ProtocolConnection(Role.CLIENT)
    unexpected: list[object] = []
    with socket.create_connection((host, port), timeout=10.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def receive() -> object:
            while (event := proto.next_event()) is None:
                data = sock.recv(65536)
                if not data:
                    raise EOFError
                proto.receive_data(data)
            return event

        sock.sendall(proto.send(Hello(versions=(1,))))
        assert isinstance(receive(), Welcome)
        sock.sendall(proto.send(Request(1, "ping", {})))
        for rid in range(1, count + 1):
            reply = receive()
            if not (isinstance(reply, Response) and reply.request_id == rid):
                unexpected.append(reply)
            if rid < count:
                sock.sendall(proto.send(Request(rid + 1, "ping", {})))
    return unexpected


async def test_pipelined_requests_over_tcp_never_find_the_slot_taken(tmp_path: Path):
    async with open_node(node_config(tmp_path, max_in_flight=1)) as node:
        unexpected = await trio.to_thread.run_sync(_blocking_pipeline, node.address, 2000)
    assert unexpected == []
    assert node.statistics()["errors_sent"] == {}


# ------------------------------------------- writes waiting for the write lock

INSERT = {"sql": "insert into t values (1)"}

CASES = {
    "execute": ("execute", INSERT, {}),
    "execute returning": ("execute", {"sql": "insert into t values (1) returning x"}, {}),
    "keyed execute": ("execute", INSERT, {"idempotency_key": "k-1"}),
    "batch": ("batch", {"statements": [INSERT]}, {}),
    "keyed batch": ("batch", {"statements": [INSERT]}, {"idempotency_key": "k-2"}),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_write_cancelled_while_waiting_for_the_lock_is_not_applied(
    tmp_path: Path, case: str
):
    # Another writer holding the lock is the everyday case on a cluster: every
    # node shares one SQLite file, and batches, keyed writes and RETURNING open
    # with BEGIN IMMEDIATE, which waits (busy timeout) for the lock. SQLite drops
    # the interrupt() once the wait is over; the node checks again once it holds
    # the lock. A plain execute runs in autocommit mode: either answer is fine
    # as long as it is the truth.
    method, args, extra = CASES[case]
    async with (
        open_node(node_config(tmp_path, request_timeout=30.0)) as node,
        raw_client(node.address) as client,
    ):
        await client.call("execute", {"sql": "create table t(x)"})
        # Another writer (another node, another process) holds the write lock.
        other = sqlite3.connect(node.storage.path, isolation_level=None)
        try:
            other.execute("begin immediate")
            rid = await client.send_request(method, args, **extra)
            await trio.sleep(0.3)  # the write is waiting for the lock in its thread
            await client.send(Cancel(rid))
            await trio.sleep(0.3)
            other.execute("commit")  # the lock is free again
        finally:
            other.close()
        reply = await client.receive(within=10.0)
        count = (await client.call("query", {"sql": "select count(*) from t"}))["rows"]
        keys = node_rows(node, "select key from qdb_idempotency")
    outcome: dict[str, Any] = {"applied": count != [[0]], "stored keys": keys}
    if isinstance(reply, Error) and reply.name == "CANCELLED":
        # The node says it stopped the write and nothing was applied: hold it to that.
        assert reply.details == {"executed": False}
        assert outcome == {"applied": False, "stored keys": []}, (
            f"answered CANCELLED executed=false, yet {outcome}"
        )
    else:  # had the write completed, a RESPONSE would be the honest answer
        assert outcome["applied"], reply
    if case != "execute":  # these hold the lock check: they are stopped
        assert isinstance(reply, Error) and reply.name == "CANCELLED", reply


async def test_a_cancel_arriving_after_the_commit_does_not_disown_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The worker thread is descheduled right after COMMIT returned (simulated
    # with a sleep): the write is durable, so the only honest answers are the
    # RESPONSE (the CANCEL crossed the completion) or at least executed != false.
    real_commit = writes.commit_now

    def commit_then_stall(conn: sqlite3.Connection) -> None:
        real_commit(conn)
        time.sleep(0.5)

    monkeypatch.setattr(writes, "commit_now", commit_then_stall)
    async with (
        open_node(node_config(tmp_path, request_timeout=30.0)) as node,
        raw_client(node.address) as client,
    ):
        await client.call("execute", {"sql": "create table t(x)"})
        rid = await client.send_request("batch", {"statements": [INSERT]})
        await trio.sleep(0.2)  # COMMIT done, the thread not yet back
        await client.send(Cancel(rid))
        reply = await client.receive(within=10.0)
        count = (await client.call("query", {"sql": "select count(*) from t"}))["rows"]
        # The connection goes on serving, the pooled connection included.
        assert (await client.call("query", {"sql": "select 2"}))["rows"] == [[2]]
    assert count == [[1]]  # the write is applied
    assert not (isinstance(reply, Error) and reply.details.get("executed") is False), reply
    assert isinstance(reply, Response) and reply.request_id == rid, reply
    assert node.statistics()["requests_cancelled"] == 0
