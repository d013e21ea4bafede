"""CANCEL and request slots over loopback TCP, with SQL running in worker threads.

What needs real sockets and threads: a CANCEL interrupting a statement that
SQLite is executing, and a client that sends its next request the moment a
reply arrives over a socket (trio yields after every successful send).
"""

from __future__ import annotations

import socket
from pathlib import Path

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
from qdb_client.testing import open_node, parse_address

from ..common.fixtures import node_config
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
            }
            keys = await client.call("query", {"sql": "select key from qdb_idempotency"})
            assert keys["rows"] == []
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
