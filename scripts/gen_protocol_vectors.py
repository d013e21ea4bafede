#!/usr/bin/env python3
"""Generate the byte-exact test vectors of docs/protocol.md from the code.

Every frame below is produced by ``qdb_client.protocol.encode_message`` (or,
for the malformed ones, by ``encode_frame`` plus a deliberate edit), so the
document shows what the implementation really sends.

    python scripts/gen_protocol_vectors.py            # print the section
    python scripts/gen_protocol_vectors.py --write    # rewrite it in docs/protocol.md
    python scripts/gen_protocol_vectors.py --check    # exit 1 if the doc is stale

tests/unit/test_protocol_vectors.py parses the section back and checks each
vector against the code, and checks that the section equals this output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attrs  # noqa: E402

from qdb_client.protocol import (  # noqa: E402
    Cancel,
    ErrorCode,
    Event,
    GoAway,
    Hello,
    Member,
    Message,
    Ping,
    Pong,
    Request,
    Response,
    StreamCredit,
    StreamEnd,
    StreamPage,
    Welcome,
    encode_body,
    encode_frame,
    encode_message,
    error_message,
)
from qdb_client.protocol.frames import HEADER_SIZE  # noqa: E402

DOC = ROOT / "docs" / "protocol.md"
BEGIN = "<!-- BEGIN GENERATED VECTORS: scripts/gen_protocol_vectors.py -->"
END = "<!-- END GENERATED VECTORS -->"
MIB = 1024 * 1024

# ------------------------------------------------------------------ messages

PAGE_0_ROWS = (["ada", 36, 1.5], ["grace", 45, None])
PAGE_1_ROWS = (["linus", 2**64, b"\x00\xff"],)
STREAM_DIGEST = hashlib.sha256(
    b"".join(encode_body(row) for row in PAGE_0_ROWS + PAGE_1_ROWS)
).digest()

#: (name, what it shows, message)
VECTORS: list[tuple[str, str, Message]] = [
    (
        "hello-minimal",
        "HELLO offering version 1, announcing a 1 MiB receive limit",
        Hello(versions=(1,), client_name="qdb_client", client_version="0.1.0", max_frame_size=MIB),
    ),
    (
        "hello-credentials",
        "HELLO offering versions 1 and 2, with credentials",
        Hello(
            versions=(1, 2),
            client_name="qdb_client",
            client_version="0.1.0",
            credentials={"user": "alice", "password": "s3cret"},
            max_frame_size=MIB,
        ),
    ),
    (
        "hello-resume",
        "HELLO resuming session `s-7f3a`, no `max_frame` (so 1 MiB)",
        Hello(versions=(1,), client_name="app", resume_session="s-7f3a"),
    ),
    (
        "welcome",
        "WELCOME choosing version 1, with two cluster members",
        Welcome(
            version=1,
            node_id="n1",
            session_id="s-7f3a",
            max_frame_size=MIB,
            max_in_flight=256,
            idle_timeout_ms=30_000,
            members=(Member("n1", "10.0.0.1:7400"), Member("n2", "10.0.0.2:7400")),
            server_name="qdb-test",
        ),
    ),
    (
        "hello-session-token",
        "HELLO resuming session `s-7f3a` with its session token, no password (section 7.4)",
        Hello(
            versions=(1,),
            client_name="qdb_client",
            client_version="0.1.0",
            resume_session="s-7f3a",
            session_token="tok-4JmW9qXbq2Vd0aY7nGzL1w",
            max_frame_size=MIB,
        ),
    ),
    (
        "welcome-session-token",
        "WELCOME to an authenticated HELLO: a new session token valid for 15 minutes",
        Welcome(
            version=1,
            node_id="n2",
            session_id="s-7f3a",
            max_frame_size=MIB,
            max_in_flight=256,
            idle_timeout_ms=30_000,
            server_name="qdb-test",
            session_token="tok-9fKc2LrT5sPq8wYx3bNm0A",
            session_expires_ms=900_000,
        ),
    ),
    (
        "request-ping",
        "REQUEST `ping` with no arguments (`args` is sent as an empty map)",
        Request(request_id=1, method="ping"),
    ),
    (
        "request-execute",
        "REQUEST `execute` with list params, a 2500 ms deadline and an idempotency key",
        Request(
            request_id=7,
            method="execute",
            args={"sql": "INSERT INTO t (a, b) VALUES (?, ?)", "params": [1, "x"]},
            deadline_ms=2500,
            idempotency_key="order-42:v1",
        ),
    ),
    (
        "request-query",
        "REQUEST `query` with named (map) params",
        Request(
            request_id=8,
            method="query",
            args={"sql": "SELECT name FROM users WHERE id = :id", "params": {"id": 3}},
        ),
    ),
    (
        "response-execute",
        "RESPONSE to `execute`",
        Response(request_id=7, result={"rows_affected": 1, "last_insert_id": 42}),
    ),
    (
        "response-query",
        "RESPONSE to `query`: null, float, negative, big integer and bytes values",
        Response(
            request_id=8,
            result={
                "columns": ["name", "score", "delta", "big", "blob"],
                "rows": [["ada", 1.5, -3, 2**64, b"\x01\x02"], [None, -0.0, 0, 2**64 - 1, b""]],
            },
        ),
    ),
    (
        "response-null",
        "RESPONSE with a null result (`result` is required, null is a value)",
        Response(request_id=9, result=None),
    ),
    (
        "error-sql",
        "ERROR `SQL_ERROR` for request 8 (no optional keys)",
        error_message(8, ErrorCode.SQL_ERROR, "no such table: users"),
    ),
    (
        "error-overloaded",
        "ERROR `OVERLOADED` with `retry_after_ms` and `details`",
        error_message(
            7,
            ErrorCode.OVERLOADED,
            "too many requests in flight",
            retry_after_ms=250,
            details={"in_flight": 256, "limit": 256},
        ),
    ),
    (
        "error-version-mismatch",
        "Handshake ERROR `VERSION_MISMATCH` (request id 0) listing the server's versions",
        error_message(
            0,
            ErrorCode.VERSION_MISMATCH,
            "no common protocol version",
            details={"supported_versions": [1]},
        ),
    ),
    ("cancel", "CANCEL of request 7", Cancel(request_id=7)),
    ("ping", "PING 3", Ping(request_id=3)),
    ("pong", "PONG answering PING 3", Pong(request_id=3)),
    (
        "goaway-shutdown",
        "GOAWAY `shutdown`: requests up to 8 will be answered, later ones were not processed",
        GoAway(reason="shutdown", last_request_id=8, message="node is restarting"),
    ),
    (
        "request-query-stream",
        "REQUEST `query_stream` opening a stream with 2 rows per page and 1 page of credit",
        Request(
            request_id=11,
            method="query_stream",
            args={
                "sql": "SELECT name, age, x FROM people",
                "params": [],
                "page_rows": 2,
                "credit": 1,
            },
        ),
    ),
    (
        "stream-page-0",
        "STREAM_PAGE 0 of stream 11, with `columns`",
        StreamPage(
            request_id=11,
            seq=0,
            rows=PAGE_0_ROWS,
            resume_token=b"\x01\x00\x00\x00\x00\x00\x00\x00\x02",
            columns=("name", "age", "x"),
        ),
    ),
    ("stream-credit", "STREAM_CREDIT: 4 more pages for stream 11", StreamCredit(11, 4)),
    (
        "stream-page-1",
        "STREAM_PAGE 1 of stream 11 (no `columns`)",
        StreamPage(
            request_id=11,
            seq=1,
            rows=PAGE_1_ROWS,
            resume_token=b"\x01\x00\x00\x00\x00\x00\x00\x00\x03",
        ),
    ),
    (
        "stream-end",
        "STREAM_END of stream 11: last page 1, 3 rows, SHA-256 digest of the 3 row encodings",
        StreamEnd(request_id=11, seq=1, row_count=3, digest=STREAM_DIGEST),
    ),
    (
        "request-resume-stream",
        "REQUEST `resume_stream` continuing after the page that carried the token",
        Request(
            request_id=12,
            method="resume_stream",
            args={"token": b"\x01\x00\x00\x00\x00\x00\x00\x00\x02", "credit": 2},
        ),
    ),
    (
        "request-subscribe",
        "REQUEST `subscribe` to the changes of table `people` from event 42, 16 events of credit",
        Request(
            request_id=13,
            method="subscribe",
            args={"table": "people", "from_event": 42, "credit": 16},
        ),
    ),
    (
        "event-change",
        "EVENT on subscription 13: a row of `people` was updated (section 13.1)",
        Event(
            request_id=13,
            topic="change",
            data={
                "event_id": 42,
                "kind": "update",
                "table": "people",
                "key": 7,
                "row": {"id": 7, "name": "ada", "age": 37},
            },
        ),
    ),
    (
        "event-topology",
        "Unsolicited EVENT (request id 0): a member joined (section 13.2, reserved)",
        Event(
            topic="topology",
            data={"joined": [{"node_id": "n3", "address": "10.0.0.3:7400"}], "left": []},
        ),
    ),
    (
        "event-unsolicited",
        "Unsolicited EVENT (request id 0): the node is draining",
        Event(topic="node_status", data={"node_id": "n1", "status": "draining"}),
    ),
]

# ------------------------------------------------------------ broken frames


def _with_crc(kind: int, request_id: int, body: bytes, flags: int = 0) -> bytes:
    """A frame with a correct checksum (``encode_frame`` with chosen flags)."""
    return encode_frame(kind, request_id, body, flags)


def _flip(frame: bytes, index: int, new: int) -> bytes:
    data = bytearray(frame)
    data[index] = new
    return bytes(data)


def _bad_vectors() -> list[tuple[str, str, bytes, str]]:
    """(name, what is wrong, bytes, expected outcome)."""
    ping = encode_message(Request(request_id=1, method="ping"))
    execute = encode_message(_vector("request-execute"))
    body_index = HEADER_SIZE + 5
    oversized = struct.pack(">2sBBIQI", b"QD", 0, 0x10, MIB + 1, 5, 0)
    short = struct.pack(">2sBBIQI", b"QD", 0, 0x20, 19, 5, 0)
    return [
        (
            "corrupted-body-byte",
            f"`request-ping` with frame byte {body_index} (body byte {body_index - HEADER_SIZE}) "
            "changed from "
            f"0x{ping[body_index]:02x} to 0x{ping[body_index] ^ 0x20:02x}: "
            "the checksum no longer matches",
            _flip(ping, body_index, ping[body_index] ^ 0x20),
            "message-error request_id=1",
        ),
        (
            "corrupted-request-id",
            "`request-execute` with header byte 15 (last byte of the request id) changed "
            "from 0x07 to 0x03: checksum mismatch; the id reported is the one the header "
            "carries (3), which can't be trusted",
            _flip(execute, 15, 0x03),
            "message-error request_id=3",
        ),
        (
            "corrupted-crc",
            f"`request-ping` with header byte 16 (first checksum byte) changed from "
            f"0x{ping[16]:02x} to 0x{ping[16] ^ 0xFF:02x}",
            _flip(ping, 16, ping[16] ^ 0xFF),
            "message-error request_id=1",
        ),
        (
            "bad-magic",
            '`request-ping` starting with "XD": rejected as soon as the first byte is in',
            _flip(ping, 0, ord("X")),
            "frame-error",
        ),
        (
            "oversized-header",
            "A lone header announcing a REQUEST of 1 MiB + 1 bytes (length 0x00100001) to a "
            "receiver accepting 1 MiB: refused from these 20 bytes, the body is never read",
            oversized,
            "frame-too-large",
        ),
        (
            "length-below-header",
            "A header whose length field is 19",
            short,
            "frame-error",
        ),
        (
            "truncated",
            "`request-ping` without its last byte, then end of input",
            ping[:-1],
            "frame-error-at-eof",
        ),
        (
            "unsupported-flags",
            "A PING with flag bit 0 set and a correct checksum",
            _with_crc(0x20, 4, b"\xa0", flags=0x01),
            "message-error request_id=4",
        ),
        (
            "unknown-kind",
            "Kind 0x7f with a correct checksum and an empty-map body",
            _with_crc(0x7F, 5, b"\xa0"),
            "message-error request_id=5",
        ),
        (
            "trailing-bytes",
            "A PING whose body is an empty map followed by one more byte",
            _with_crc(0x20, 6, b"\xa0\x00"),
            "message-error request_id=6",
        ),
        (
            "indefinite-length",
            'A REQUEST whose body is the indefinite-length map {_ "method": "ping"}',
            _with_crc(0x10, 7, b"\xbf\x66method\x64ping\xff"),
            "message-error request_id=7",
        ),
        (
            "integer-map-key",
            'A REQUEST whose body is {"method": "ping", 1: 2}',
            _with_crc(0x10, 8, b"\xa2\x66method\x64ping\x01\x02"),
            "message-error request_id=8",
        ),
        (
            "missing-field",
            "A REQUEST whose body lacks the required `method`",
            _with_crc(0x10, 9, encode_body({"args": {}})),
            "message-error request_id=9",
        ),
        (
            "bool-for-count",
            "A STREAM_CREDIT whose `pages` is `true`",
            _with_crc(0x32, 10, encode_body({"pages": True})),
            "message-error request_id=10",
        ),
    ]


def _vector(name: str) -> Message:
    for vector_name, _, message in VECTORS:
        if vector_name == name:
            return message
    raise KeyError(name)


# ----------------------------------------------------------------- rendering


def diag(value: Any) -> str:
    """CBOR diagnostic notation (RFC 8949 section 8) of a decoded value."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (bytes, bytearray)):
        return f"h'{bytes(value).hex()}'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(diag(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{diag(k)}: {diag(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no diagnostic notation for {type(value).__name__}")


def hex_lines(frame: bytes) -> list[str]:
    """The header split into its fields, then the body 32 bytes a line."""
    head = frame[:HEADER_SIZE]
    fields = [head[0:2], head[2:3], head[3:4], head[4:8], head[8:16], head[16:20]]
    lines = ["  " + " ".join(f.hex() for f in fields if f)]
    body = frame[HEADER_SIZE:]
    lines += ["  " + body[i : i + 32].hex() for i in range(0, len(body), 32)]
    return lines


def python_text(message: Message) -> str:
    """The constructor call of ``message``, secrets included (its ``repr`` hides
    passwords and session tokens; a vector must show what the frame holds)."""
    fields = [f for f in attrs.fields(type(message)) if f.eq]  # what a message is compared by
    args = ", ".join(f"{f.name}={getattr(message, f.name)!r}" for f in fields)
    return f"{type(message).__name__}({args})"


def render_vector(name: str, title: str, message: Message) -> str:
    frame = encode_message(message)
    lines = [
        f"#### `{name}`: {title}",
        "",
        "```qdb-vector",
        f"name:    {name}",
        f"kind:    0x{message.kind:02x} {message.kind.name}",
        f"request: {message.request_id}",
        f"body:    {diag(message.body())}",
        f"python:  {python_text(message)}",
        f"length:  {len(frame)}",
        "frame:",
        *hex_lines(frame),
        "```",
        "",
    ]
    return "\n".join(lines)


def render_bad_vector(name: str, title: str, data: bytes, expect: str) -> str:
    lines = [
        f"#### `{name}`",
        "",
        f"{title}.",
        "",
        "```qdb-bad-vector",
        f"name:    {name}",
        f"expect:  {expect}",
        "frame:",
        *hex_lines(data),
        "```",
        "",
    ]
    return "\n".join(lines)


INTRO = """\
## 15. Test vectors

These vectors are generated from the implementation by
`scripts/gen_protocol_vectors.py` (run it with `--write` to refresh this
section, `--check` to verify it). `tests/unit/test_protocol_vectors.py` parses
every block below and checks, for each valid vector, that encoding the
message gives exactly the bytes shown and that decoding the bytes gives the
message back; and, for each broken frame, that the receiver detects the fault
listed. The same test fails if this section differs from the script's output,
so document and code cannot drift apart.

Each `qdb-vector` block gives the kind, the request id, the body in CBOR
diagnostic notation (RFC 8949 section 8), the message as the Python class of
`qdb_client.protocol.messages` (`python:`), the frame length and the frame in
hex. The first hex line is the header, split into its fields: magic, flags,
kind, length, request id, CRC-32. The following lines are the body, 32 bytes
a line. Map keys appear in the order the encoder writes them (section 5.4).

Each `qdb-bad-vector` block gives bytes a receiver (with the default 1 MiB
limit, handshake completed) must refuse, and how (section 4):

| `expect:` | the receiver must |
|---|---|
| `message-error request_id=N` | skip this frame only: a per-message fault for request N |
| `frame-error` | treat it as a connection-level fault |
| `frame-too-large` | treat it as a connection-level fault, from the 20 header bytes |
| `frame-error-at-eof` | wait for more bytes; at end of input: connection-level fault |

After a `message-error` a node answers ERROR `PARSE_ERROR` with request id N
and goes on with the next frame (the tests feed a PING after each broken
frame and check that it is decoded).

### 15.1 Valid messages
"""


def render_section() -> str:
    parts = [BEGIN, "", INTRO]
    parts += [render_vector(name, title, message) for name, title, message in VECTORS]
    parts.append("### 15.2 Broken frames\n")
    parts += [render_bad_vector(*bad) for bad in _bad_vectors()]
    parts.append(END)
    return "\n".join(parts) + "\n"


def splice(doc: str, section: str) -> str:
    """Replace the generated section of ``doc`` (from BEGIN to END, inclusive)."""
    start = doc.index(BEGIN)
    stop = doc.index(END, start) + len(END)
    rest = doc[stop:]
    if rest.startswith("\n"):
        rest = rest[1:]
    return doc[:start] + section + rest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the section in the doc")
    mode.add_argument("--check", action="store_true", help="fail if the doc's section is stale")
    args = parser.parse_args()
    section = render_section()
    if not (args.write or args.check):
        sys.stdout.write(section)
        return 0
    doc = DOC.read_text(encoding="utf-8")
    updated = splice(doc, section)
    if args.check:
        if updated != doc:
            print(f"{DOC} is stale: run {Path(__file__).name} --write", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
