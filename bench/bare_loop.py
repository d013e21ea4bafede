"""The least code that talks to a QDB node: the baseline every benchmark compares with.

Pre-built frames (header, CRC-32, a CBOR body encoded once), a buffer and a
frame splitter, ``cbor2.loads`` of each reply body, one task: nothing else.
At more than one request in flight it keeps that many pipelined from its
one task (no demultiplexing, no waiters), which only works for a single
caller: the floor a driver serving many callers can approach, not reach.

:func:`bare_multiplexed` is the floor for many callers: one task per caller
sends its frame straight to the socket and sleeps until a reader task hands
it its reply by request id (``trio.lowlevel.reschedule``). No deadlines, no
retries, no balancing, no checks: what any trio driver that lets many tasks
share one connection must at least pay.
"""

from __future__ import annotations

import socket
import struct
import time
import zlib

import cbor2
import trio

from qdb_client.protocol import HEADER_SIZE, Hello, encode_message

__all__ = [
    "BareConnection",
    "bare_multiplexed",
    "bare_pipelined",
    "bare_sequential",
    "request_body",
    "request_frame",
]

_HEADER = struct.Struct(">2sBBIQ")


def request_frame(request_id: int, body: bytes) -> bytes:
    """One REQUEST frame around a pre-encoded body."""
    head = _HEADER.pack(b"QD", 0, 0x10, HEADER_SIZE + len(body), request_id)
    return head + struct.pack(">I", zlib.crc32(body, zlib.crc32(head))) + body


def request_body(method: str, args: dict, *, idem_key: str | None = None) -> bytes:
    """The CBOR body of a REQUEST, as the driver sends it."""
    body: dict = {"method": method, "args": args, "deadline_ms": 5000}
    if idem_key is not None:
        body["idem_key"] = idem_key
    return cbor2.dumps(body)


class BareConnection:
    """A socket, a buffer and a frame splitter."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, host: str, port: int) -> BareConnection:
        """Connect and complete the handshake."""
        conn = cls(await trio.open_tcp_stream(host, port))
        await conn.stream.send_all(encode_message(Hello(versions=(1,))))
        await conn.read_frame()  # WELCOME
        return conn

    async def read_frame(self) -> tuple[int, object]:
        """(request id, decoded body) of the next frame."""
        while True:
            if len(self.buffer) >= HEADER_SIZE:
                length = int.from_bytes(self.buffer[4:8], "big")
                if len(self.buffer) >= length:
                    request_id = int.from_bytes(self.buffer[8:16], "big")
                    body = bytes(self.buffer[HEADER_SIZE:length])
                    del self.buffer[:length]
                    return request_id, cbor2.loads(body)
            data = await self.stream.receive_some(65536)
            if not data:
                raise RuntimeError("node closed the connection")
            self.buffer += data


async def bare_sequential(
    conn: BareConnection, body: bytes, n: int, latencies: list[float]
) -> None:
    """``n`` requests one after another."""
    for request_id in range(1, n + 1):
        started = time.perf_counter()
        await conn.stream.send_all(request_frame(request_id, body))
        await conn.read_frame()
        latencies.append(time.perf_counter() - started)


async def bare_pipelined(
    conn: BareConnection, body: bytes, n: int, depth: int, latencies: list[float]
) -> None:
    """``n`` requests, ``depth`` of them in flight at all times, from one task."""
    sent_at: dict[int, float] = {}
    next_id = 1

    async def send(count: int) -> None:
        nonlocal next_id
        frames = []
        for _ in range(count):
            sent_at[next_id] = time.perf_counter()
            frames.append(request_frame(next_id, body))
            next_id += 1
        await conn.stream.send_all(b"".join(frames))

    await send(min(depth, n))
    while len(latencies) < n:
        request_id, _ = await conn.read_frame()
        latencies.append(time.perf_counter() - sent_at.pop(request_id))
        if next_id <= n:
            await send(1)


async def bare_multiplexed(
    conn: BareConnection, body: bytes, n: int, callers: int, latencies: list[float]
) -> None:
    """``n`` requests from ``callers`` tasks sharing the connection.

    Each caller writes its frame synchronously (a non-blocking ``send`` on a
    duplicate descriptor: the frames are small enough never to block here) and
    sleeps until the reader wakes it with its reply.
    """
    trio_socket = conn.stream.socket
    raw = socket.fromfd(trio_socket.fileno(), trio_socket.family, trio_socket.type)
    raw.setblocking(False)
    waiting: dict[int, trio.lowlevel.Task] = {}
    replies: dict[int, object] = {}
    ids = iter(range(1, n + callers + 1))
    remaining = n

    def abort(_: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.SUCCEEDED

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            request_id = next(ids)
            started = time.perf_counter()
            raw.send(request_frame(request_id, body))
            waiting[request_id] = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(abort)
            replies.pop(request_id)
            latencies.append(time.perf_counter() - started)

    async def reader() -> None:
        while True:
            request_id, reply = await conn.read_frame()
            replies[request_id] = reply
            trio.lowlevel.reschedule(waiting.pop(request_id))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            async with trio.open_nursery() as inner:
                for _ in range(callers):
                    inner.start_soon(caller)
            nursery.cancel_scope.cancel()
    finally:
        raw.close()
