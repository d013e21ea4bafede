"""The synchronous direct-write path over real sockets: partial writes keep order."""

from __future__ import annotations

import trio
import trio.testing

from qdb_client._transport import Connection
from qdb_client._transport.direct import DirectWriter
from qdb_client.protocol import PROTOCOL_VERSIONS, Hello, Request

from ..unit.fake_peer import FakeNode


def socket_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    left, right = trio.socket.socketpair()
    return trio.SocketStream(left), trio.SocketStream(right)


async def test_direct_writer_sends_and_closing_it_keeps_the_socket():
    a, b = socket_stream_pair()
    writer = DirectWriter.for_stream(a)
    assert writer is not None
    assert writer.write(b"hello") == 5
    writer.close()
    await a.send_all(b" world")  # the stream's own socket is still open
    received = b""
    while len(received) < 11:
        received += await b.receive_some(64)
    assert received == b"hello world"
    assert DirectWriter.for_stream(trio.testing.memory_stream_pair()[0]) is None


async def test_frames_stay_whole_and_ordered_when_the_kernel_buffer_fills():
    client_end, node_end = socket_stream_pair()
    node = FakeNode(node_end)
    connection = Connection(
        client_end, address="pair", max_frame_size=1 << 20, max_in_flight=10_000
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.handshake)
        await nursery.start(connection.run, Hello(versions=PROTOCOL_VERSIONS))
        assert connection._direct is not None
        # The node reads nothing yet: the socket buffer fills, direct writes
        # become partial then refused, and the writer task takes over.
        payload = "x" * 20_000
        pending = [
            await connection.send_request("execute", {"n": i, "blob": payload}) for i in range(200)
        ]
        await trio.testing.wait_all_tasks_blocked()
        assert any(not p.sent for p in pending)  # some are still queued for the writer
        received = []
        for _ in range(200):
            message = await node.receive()
            assert isinstance(message, Request)
            received.append(message.args["n"])
        assert received == list(range(200))
        assert all(p.sent for p in pending)
        nursery.cancel_scope.cancel()
