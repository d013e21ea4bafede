"""A stub QDB node for benchmarks: answers at once with canned results.

Speaks protocol v1 just enough for a client: HELLO -> WELCOME, PING -> PONG,
and every REQUEST -> a RESPONSE with a canned result (a one-row ``query``
result, or an ``execute`` result for ``execute``/``batch``). No SQLite, no
request tasks: one loop per connection that parses headers, so the client
is what a benchmark measures, not the node. Its node id is ``stub-<port>``,
so several stubs are several nodes to a client (one id would make them
aliases of one node).

    python bench/stub_node.py [--port 0]     # prints "STUB READY port=N"
"""

from __future__ import annotations

import argparse
import functools
import struct
import sys
import zlib

import cbor2
import trio

from qdb_client.protocol import (
    HEADER_SIZE,
    PROTOCOL_VERSIONS,
    Kind,
    Welcome,
    decode_body,
    encode_message,
)

_HEADER = struct.Struct(">2sBBIQ")
_CRC = struct.Struct(">I")

QUERY_RESULT = cbor2.dumps({"result": {"columns": ["id", "name"], "rows": [[1, "ada"]]}})
EXECUTE_RESULT = cbor2.dumps({"result": {"rows_affected": 1, "last_insert_id": 1}})


def frame(kind: int, request_id: int, body: bytes) -> bytes:
    """One frame around ``body``."""
    head = _HEADER.pack(b"QD", 0, kind, HEADER_SIZE + len(body), request_id)
    return head + _CRC.pack(zlib.crc32(body, zlib.crc32(head))) + body


def reply_for(kind: int, request_id: int, body: bytes) -> bytes | None:
    """The canned reply to one client frame (None: nothing to send)."""
    if kind == Kind.REQUEST:
        method = decode_body(body).get("method")
        canned = EXECUTE_RESULT if method in ("execute", "batch") else QUERY_RESULT
        return frame(Kind.RESPONSE, request_id, canned)
    if kind == Kind.PING:
        return frame(Kind.PONG, request_id, b"\xa0")
    return None  # CANCEL, PONG, GOAWAY: nothing to answer


async def serve_connection(stream: trio.SocketStream, node_id: str = "stub") -> None:
    buffer = bytearray()
    welcomed = False
    try:
        while True:
            data = await stream.receive_some(262144)
            if not data:
                return
            buffer += data
            out = []
            while len(buffer) >= HEADER_SIZE:
                _, _, kind, length, request_id = _HEADER.unpack_from(buffer)
                if len(buffer) < length:
                    break
                body = bytes(buffer[HEADER_SIZE:length])
                del buffer[:length]
                if not welcomed:
                    welcomed = True
                    welcome = Welcome(
                        version=PROTOCOL_VERSIONS[-1],
                        node_id=node_id,
                        session_id=f"{node_id}-session",
                        max_frame_size=1 << 20,
                        max_in_flight=100_000,
                        idle_timeout_ms=3_600_000,
                    )
                    out.append(encode_message(welcome))
                    continue
                reply = reply_for(kind, request_id, body)
                if reply is not None:
                    out.append(reply)
            if out:
                await stream.send_all(b"".join(out))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return


async def main(port: int) -> None:
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"STUB READY port={port}", flush=True)
    await trio.serve_listeners(
        functools.partial(serve_connection, node_id=f"stub-{port}"), listeners
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    try:
        trio.run(main, parser.parse_args().port)
    except KeyboardInterrupt:
        sys.exit(0)
