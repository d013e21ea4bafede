"""The reader's wait-then-read path (DirectReader) over real sockets.

Replies of every size around the read size, a frame one byte at a time,
and the ends of a connection (EOF, EOF inside a frame, reset, close while
waiting) reach the callers as they do through SocketStream.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from qdb_client._transport import Connection
from qdb_client._transport.direct import DirectReader
from qdb_client.errors import ClientClosed, ConnectionLost
from qdb_client.protocol import PROTOCOL_VERSIONS, READ_SIZE, Hello, Response, encode_message

from ..unit.fake_peer import FakeNode


@asynccontextmanager
async def over_tcp() -> AsyncIterator[tuple[Connection, FakeNode, trio.SocketStream]]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_end = await trio.open_tcp_stream("127.0.0.1", port)
    node_end = await listeners[0].accept()
    await listeners[0].aclose()
    node = FakeNode(node_end)
    connection = Connection(client_end, address="tcp", max_frame_size=1 << 24, max_in_flight=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.handshake)
        await nursery.start(connection.run, Hello(versions=PROTOCOL_VERSIONS))
        assert connection._direct is not None  # a plain TCP stream: the direct paths
        yield connection, node, node_end
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("size", [10, READ_SIZE - 200, READ_SIZE, 3 * READ_SIZE, 1_000_000])
async def test_replies_of_every_size_around_the_read_size_arrive_whole(size: int):
    async with over_tcp() as (connection, node, _):
        for length in range(max(0, size - 40), size + 40, 7):
            pending = await connection.send_request("query", {})
            await node.reply(await node.receive_request(), "x" * length)
            with trio.fail_after(5):
                assert len(await pending.wait()) == length


async def test_a_frame_arriving_one_byte_at_a_time_is_assembled():
    async with over_tcp() as (connection, node, node_end):
        pending = await connection.send_request("query", {})
        request = await node.receive_request()
        data = encode_message(Response(request.request_id, "hello"))
        for i in range(len(data)):
            await node_end.send_all(data[i : i + 1])
            await trio.sleep(0.001)
        with trio.fail_after(5):
            assert await pending.wait() == "hello"


async def test_eof_inside_a_frame_fails_the_waiter_with_connection_lost():
    async with over_tcp() as (connection, node, node_end):
        pending = await connection.send_request("query", {})
        request = await node.receive_request()
        await node_end.send_all(encode_message(Response(request.request_id, "hello"))[:-3])
        await node_end.aclose()
        with trio.fail_after(5), pytest.raises(ConnectionLost):
            await pending.wait()


async def test_a_reset_fails_the_waiter_with_connection_lost():
    async with over_tcp() as (connection, node, node_end):
        pending = await connection.send_request("query", {})
        await node.receive_request()
        node_end.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        node_end.socket.close()  # an RST, not a FIN
        with trio.fail_after(5), pytest.raises(ConnectionLost):
            await pending.wait()


async def test_closing_while_the_reader_waits_ends_it():
    async with over_tcp() as (connection, node, _):
        pending = await connection.send_request("query", {})
        await node.receive_request()
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await connection.aclose()
        with pytest.raises(ClientClosed):
            await pending.wait()


async def test_a_read_that_fills_the_buffer_reads_again_before_waiting():
    left, right = trio.socket.socketpair()
    reader = DirectReader(left, socket.fromfd(left.fileno(), left.family, left.type))
    reader._sock.setblocking(False)
    await right.send(b"a" * 100)
    assert await reader.receive_some(64) == b"a" * 64
    assert reader._full  # the rest is waiting: read it without waiting first
    assert await reader.receive_some(64) == b"a" * 36
    assert not reader._full
    right.close()
    assert await reader.receive_some(64) == b""  # end of input
    reader._sock.close()
    left.close()
