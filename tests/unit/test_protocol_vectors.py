"""docs/protocol.md's test vectors, checked against the code.

The doc's section 15 holds fenced ``qdb-vector`` blocks (a message and its
frame in hex) and ``qdb-bad-vector`` blocks (bytes a receiver must refuse,
and how). Every block is parsed back here: encoding the message must give
exactly the bytes shown, decoding the bytes must give the message back, and
each broken frame must be detected as stated. The section must also equal
what scripts/gen_protocol_vectors.py prints, so doc and code can't drift.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest

from qdb_client import protocol
from qdb_client.errors import FrameError, FrameTooLarge, MessageError
from qdb_client.protocol import (
    HEADER_SIZE,
    BadMessage,
    FrameDecoder,
    Kind,
    Message,
    ProtocolConnection,
    Role,
    decode_body,
    decode_message,
    encode_body,
    encode_message,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
SCRIPT = ROOT / "scripts" / "gen_protocol_vectors.py"

_BLOCK = re.compile(r"^```(qdb-vector|qdb-bad-vector)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@attrs.frozen
class Vector:
    tag: str
    fields: dict[str, str]
    frame: bytes
    header_line: str

    @property
    def name(self) -> str:
        return self.fields["name"]


def _parse_block(tag: str, text: str) -> Vector:
    fields: dict[str, str] = {}
    hex_lines: list[str] = []
    in_frame = False
    for line in text.splitlines():
        if in_frame:
            assert line.startswith("  "), f"frame lines are indented: {line!r}"
            hex_lines.append(line.strip())
            continue
        key, sep, value = line.partition(":")
        assert sep, f"not a 'key: value' line: {line!r}"
        if key == "frame":
            in_frame = True
        else:
            assert key not in fields, f"duplicate {key!r}"
            fields[key] = value.strip()
    assert hex_lines, f"block {fields.get('name')} has no frame"
    frame = bytes.fromhex("".join(hex_lines).replace(" ", ""))
    return Vector(tag, fields, frame, hex_lines[0])


def _load(tag: str) -> list[Vector]:
    doc = DOC.read_text(encoding="utf-8")
    return [_parse_block(t, body) for t, body in _BLOCK.findall(doc) if t == tag]


VECTORS = _load("qdb-vector")
BAD_VECTORS = _load("qdb-bad-vector")
_MESSAGE_CLASSES = {
    name: obj for name in protocol.__all__ if isinstance(obj := getattr(protocol, name), type)
}


def _build(node: ast.expr) -> Any:
    """Evaluate a message constructor from the doc: calls of protocol classes, literals only."""
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name) and node.func.id in _MESSAGE_CLASSES, ast.dump(node)
        cls = _MESSAGE_CLASSES[node.func.id]
        args = [_build(a) for a in node.args]
        kwargs = {kw.arg: _build(kw.value) for kw in node.keywords if kw.arg is not None}
        return cls(*args, **kwargs)
    if isinstance(node, ast.Tuple):
        return tuple(_build(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_build(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        assert all(k is not None for k in node.keys)
        return {_build(k): _build(v) for k, v in zip(node.keys, node.values, strict=True)}  # type: ignore[arg-type]
    return ast.literal_eval(node)


def _message(vector: Vector) -> Message:
    message = _build(ast.parse(vector.fields["python"], mode="eval").body)
    assert isinstance(message, Message)
    return message


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("gen_protocol_vectors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def _decode_all(data: bytes) -> list[Message]:
    decoder = FrameDecoder()
    decoder.feed(data)
    messages = []
    while (frame := decoder.next_frame()) is not None:
        messages.append(decode_message(frame))
    decoder.check_eof()
    return messages


def _ids(vectors: list[Vector]) -> list[str]:
    return [v.name for v in vectors]


# ------------------------------------------------------------------ the doc


def test_doc_has_vectors() -> None:
    assert len(VECTORS) >= 13
    assert len(BAD_VECTORS) >= 5
    names = _ids(VECTORS) + _ids(BAD_VECTORS)
    assert len(names) == len(set(names)), "vector names are unique"


def test_every_kind_has_a_vector() -> None:
    kinds = {_message(v).kind for v in VECTORS}
    assert kinds == set(Kind)


def test_required_examples_are_present() -> None:
    messages = [_message(v) for v in VECTORS]
    assert any(isinstance(m, protocol.Hello) and m.credentials for m in messages)
    assert any(
        isinstance(m, protocol.Request)
        and m.args.get("params")
        and m.deadline_ms is not None
        and m.idempotency_key is not None
        for m in messages
    )
    assert any(
        isinstance(m, protocol.Error) and m.details and m.retry_after_ms is not None
        for m in messages
    )
    expects = {v.fields["expect"].split()[0] for v in BAD_VECTORS}
    assert {"message-error", "frame-error", "frame-too-large", "frame-error-at-eof"} <= expects


def test_doc_section_matches_generator() -> None:
    gen = _script()
    doc = DOC.read_text(encoding="utf-8")
    assert gen.splice(doc, gen.render_section()) == doc, (
        "docs/protocol.md test vectors are stale: run scripts/gen_protocol_vectors.py --write"
    )


# ---------------------------------------------------------- valid messages


@pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))
def test_vector_encodes_to_the_documented_bytes(vector: Vector) -> None:
    message = _message(vector)
    assert encode_message(message) == vector.frame


@pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))
def test_vector_decodes_to_the_documented_message(vector: Vector) -> None:
    message = _message(vector)
    assert _decode_all(vector.frame) == [message]
    # Byte by byte too: the decoder never needs more than it was given.
    decoder = FrameDecoder()
    frames = []
    for i in range(len(vector.frame)):
        decoder.feed(vector.frame[i : i + 1])
        frame = decoder.next_frame()
        if frame is not None:
            frames.append(frame)
    assert [decode_message(f) for f in frames] == [message]


@pytest.mark.parametrize("vector", VECTORS, ids=_ids(VECTORS))
def test_vector_fields_describe_the_frame(vector: Vector) -> None:
    """kind, request, length, body and the header line say what the bytes say."""
    frame = vector.frame
    kind = Kind(frame[3])
    assert vector.fields["kind"] == f"0x{kind:02x} {kind.name}"
    assert int(vector.fields["request"]) == int.from_bytes(frame[8:16], "big")
    assert int(vector.fields["length"]) == len(frame) == int.from_bytes(frame[4:8], "big")
    assert frame[:2] == b"QD" and frame[2] == 0
    assert vector.header_line.split() == [
        frame[0:2].hex(),
        frame[2:3].hex(),
        frame[3:4].hex(),
        frame[4:8].hex(),
        frame[8:16].hex(),
        frame[16:20].hex(),
    ]
    body = decode_body(frame[HEADER_SIZE:])
    assert vector.fields["body"] == _script().diag(body)
    assert encode_body(body) == frame[HEADER_SIZE:], "the body is in the documented encoding"


def test_all_vectors_in_one_stream() -> None:
    stream = b"".join(v.frame for v in VECTORS)
    assert _decode_all(stream) == [_message(v) for v in VECTORS]


def test_vectors_respect_direction() -> None:
    """Client-sent vectors are accepted by a server connection and the other way round."""
    client_kinds = {
        Kind.HELLO,
        Kind.REQUEST,
        Kind.CANCEL,
        Kind.PING,
        Kind.PONG,
        Kind.GOAWAY,
        Kind.STREAM_CREDIT,
    }
    server_kinds = set(Kind) - {Kind.HELLO, Kind.REQUEST, Kind.CANCEL, Kind.STREAM_CREDIT}
    for vector in VECTORS:
        message = _message(vector)
        if message.kind in (Kind.HELLO, Kind.WELCOME):
            continue
        for role, allowed in ((Role.SERVER, client_kinds), (Role.CLIENT, server_kinds)):
            conn = _open_connection(role)
            conn.receive_data(vector.frame)
            event = conn.next_event()
            if message.kind in allowed:
                assert event == message, (vector.name, role)
            else:
                assert isinstance(event, BadMessage), (vector.name, role)
                assert event.request_id == message.request_id


def _open_connection(role: Role) -> ProtocolConnection:
    hello = next(_message(v) for v in VECTORS if v.name == "hello-minimal")
    welcome = next(_message(v) for v in VECTORS if v.name == "welcome")
    conn = ProtocolConnection(role)
    if role is Role.SERVER:
        conn.receive_data(encode_message(hello))
        assert conn.next_event() == hello
        conn.send(welcome)
    else:
        conn.send(hello)
        conn.receive_data(encode_message(welcome))
        assert conn.next_event() == welcome
    return conn


def test_stream_digest_covers_the_documented_pages() -> None:
    messages = {v.name: _message(v) for v in VECTORS}
    pages = [m for m in messages.values() if isinstance(m, protocol.StreamPage)]
    end = next(m for m in messages.values() if isinstance(m, protocol.StreamEnd))
    rows = [row for page in sorted(pages, key=lambda p: p.seq) for row in page.rows]
    assert [p.seq for p in sorted(pages, key=lambda p: p.seq)] == list(range(end.seq + 1))
    assert end.row_count == len(rows)
    assert end.digest == hashlib.sha256(b"".join(encode_body(r) for r in rows)).digest()


# ----------------------------------------------------------- broken frames


@pytest.mark.parametrize("vector", BAD_VECTORS, ids=_ids(BAD_VECTORS))
def test_bad_vector_is_detected(vector: Vector) -> None:
    expect, *rest = vector.fields["expect"].split()
    decoder = FrameDecoder()
    decoder.feed(vector.frame)
    if expect == "message-error":
        (detail,) = rest
        key, _, value = detail.partition("=")
        assert key == "request_id"
        with pytest.raises(MessageError) as info:
            frame = decoder.next_frame()
            assert frame is not None
            decode_message(frame)
        assert info.value.request_id == int(value)
        assert decoder.buffered == 0, "exactly the frame was consumed"
    elif expect == "frame-too-large":
        assert len(vector.frame) == HEADER_SIZE, "only the header is needed"
        with pytest.raises(FrameTooLarge):
            decoder.next_frame()
    elif expect == "frame-error":
        with pytest.raises(FrameError) as info:
            decoder.next_frame()
        assert not isinstance(info.value, FrameTooLarge)
    elif expect == "frame-error-at-eof":
        assert decoder.next_frame() is None
        with pytest.raises(FrameError):
            decoder.check_eof()
    else:
        raise AssertionError(f"unknown expectation {expect!r}")
    assert not rest or expect == "message-error"


@pytest.mark.parametrize("vector", BAD_VECTORS, ids=_ids(BAD_VECTORS))
def test_bad_vector_through_a_connection(vector: Vector) -> None:
    """Per-message faults keep the connection: the next frame still decodes."""
    expect = vector.fields["expect"].split()[0]
    conn = _open_connection(Role.SERVER)
    ping = protocol.Ping(request_id=99)
    conn.receive_data(vector.frame)
    if expect == "message-error":
        conn.receive_data(encode_message(ping))
        event = conn.next_event()
        assert isinstance(event, BadMessage)
        assert conn.next_event() == ping
        assert conn.next_event() is None
    elif expect == "frame-error-at-eof":
        assert conn.next_event() is None
        with pytest.raises(FrameError):
            conn.receive_eof()
    else:
        with pytest.raises(FrameError):
            conn.next_event()


def test_bad_magic_is_refused_from_the_first_byte() -> None:
    vector = next(v for v in BAD_VECTORS if v.name == "bad-magic")
    decoder = FrameDecoder()
    decoder.feed(vector.frame[:1])
    with pytest.raises(FrameError):
        decoder.next_frame()
