"""Malformed input: bad frames keep the connection, broken streams close it, node survives."""

from __future__ import annotations

import logging
import random
import struct
import zlib

import pytest
import trio

from qdb_client.protocol import Error, GoAway, Kind, Ping, Pong, Response, encode_frame
from qdb_client.protocol.codec import encode_body
from qdb_client.testing import QdbNode, open_node

from ..common.fixtures import node_config
from ..common.raw_client import RawClient, raw_client


def _bad_crc(rid: int) -> bytes:
    frame = bytearray(encode_frame(Kind.REQUEST, rid, encode_body({"method": "ping"})))
    frame[16] ^= 0xFF
    return bytes(frame)


MALFORMED = {
    "bad_crc": _bad_crc,
    "bad_cbor": lambda rid: encode_frame(Kind.REQUEST, rid, b"\xff\xfe\xfd"),
    "trailing_bytes": lambda rid: encode_frame(
        Kind.REQUEST, rid, encode_body({"method": "ping"}) + b"\x00"
    ),
    "wrong_body": lambda rid: encode_frame(Kind.REQUEST, rid, encode_body({"method": 5})),
    "body_not_a_map": lambda rid: encode_frame(Kind.REQUEST, rid, encode_body([1, 2])),
    "unknown_kind": lambda rid: encode_frame(0x7F, rid, encode_body({})),
    "server_only_kind": lambda rid: encode_frame(Kind.RESPONSE, rid, encode_body({"result": 1})),
    "unknown_flags": lambda rid: encode_frame(Kind.PING, rid, encode_body({}), flags=0x80),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_malformed_message_gets_parse_error_and_connection_keeps_serving(
    node: QdbNode, kind: str
):
    async with raw_client(node.address) as client:
        await client.send_bytes(MALFORMED[kind](77))
        reply = await client.receive()
        assert isinstance(reply, Error), reply
        assert reply.name == "PARSE_ERROR" and reply.code == 400
        assert reply.request_id == 77  # echoes the frame's request id
        assert reply.retryable is False
        result = await client.call("query", {"sql": "select ? + 1", "params": [41]})
        assert result == {"columns": ["? + 1"], "rows": [[42]], "types": [None]}
    assert node.statistics()["bad_frames"] == 1


async def test_bad_frames_between_good_ones_in_one_write(node: QdbNode):
    async with raw_client(node.address) as client:
        await client.send_bytes(
            encode_frame(Kind.PING, 5, encode_body({}))
            + _bad_crc(6)
            + encode_frame(Kind.PING, 7, encode_body({}))
        )
        replies = [await client.receive() for _ in range(3)]
        assert [(type(r).__name__, r.request_id) for r in replies] == [
            ("Pong", 5),
            ("Error", 6),
            ("Pong", 7),
        ]


def _junk(seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    return data if not data.startswith(b"Q") else b"X" + data


OVERSIZED_HEADER = struct.pack(">2sBBIQ", b"QD", 0, Kind.REQUEST, 2**31, 1)
OVERSIZED_HEADER += struct.pack(">I", zlib.crc32(OVERSIZED_HEADER))
SHORT_LENGTH = struct.pack(">2sBBIQ", b"QD", 0, Kind.REQUEST, 5, 1) + b"\0" * 4


@pytest.mark.parametrize("after_handshake", [False, True])
@pytest.mark.parametrize(
    ("data", "code"),
    [
        (_junk(1), "PARSE_ERROR"),
        (_junk(2), "PARSE_ERROR"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "PARSE_ERROR"),
        (SHORT_LENGTH, "PARSE_ERROR"),
        (OVERSIZED_HEADER, "FRAME_TOO_LARGE"),
    ],
    ids=["junk1", "junk2", "http", "short_length", "oversized"],
)
async def test_broken_stream_is_answered_and_closed_and_node_survives(
    node: QdbNode, data: bytes, code: str, after_handshake: bool
):
    client = await RawClient.connect(node.address)
    try:
        if after_handshake:
            await client.handshake()
        await client.send_bytes(data)
        messages = await client.read_until_eof()
    finally:
        await client.aclose()
    error = messages[0]
    assert isinstance(error, Error) and error.name == code and error.request_id == 0
    if after_handshake:  # GOAWAY exists only after the handshake
        assert [type(m) for m in messages] == [Error, GoAway]
        assert messages[1].reason == "protocol_error"
    else:
        assert len(messages) == 1
    async with raw_client(node.address) as fresh:
        assert (await fresh.call("ping"))["node_id"] == node.node_id


async def test_many_junk_clients_at_once_do_not_disturb_a_good_one(node: QdbNode):
    async with raw_client(node.address) as good:
        rid = await good.send_request("query", {"sql": "select 1"})

        async def junk_client(seed: int) -> None:
            client = await RawClient.connect(node.address)
            try:
                await client.send_bytes(_junk(seed))
                await client.read_until_eof()
            finally:
                await client.aclose()

        async def half_frame_then_close(seed: int) -> None:
            client = await RawClient.connect(node.address)
            await client.send_bytes(encode_frame(Kind.HELLO, 0, encode_body({"x": seed}))[:13])
            await client.aclose()

        async with trio.open_nursery() as nursery:
            for seed in range(20):
                nursery.start_soon(junk_client, seed)
                nursery.start_soon(half_frame_then_close, seed)
        reply = await good.receive()
        assert isinstance(reply, Response) and reply.request_id == rid
        assert reply.result["rows"] == [[1]]
        await good.send(Ping(99))
        assert await good.receive() == Pong(99)
    assert node.statistics()["bad_frames"] >= 20


async def test_unknown_method_is_method_not_found_and_logged(node: QdbNode, caplog):
    caplog.set_level(logging.WARNING, logger="qdb_client.testing")
    async with raw_client(node.address) as client:
        reply = await client.request("no.such.method", {"a": 1})
        assert isinstance(reply, Error)
        assert reply.name == "METHOD_NOT_FOUND" and reply.code == 404
        assert reply.retryable is False
        assert reply.details == {"method": "no.such.method"}
        assert (await client.call("ping"))["node_id"] == node.node_id
    assert any("no.such.method" in r.getMessage() for r in caplog.records)


async def test_control_methods_do_not_exist_outside_test_mode(tmp_path):
    async with (
        open_node(node_config(tmp_path, test_mode=False)) as node,
        raw_client(node.address) as client,
    ):
        reply = await client.request("control.stats")
        assert isinstance(reply, Error) and reply.name == "METHOD_NOT_FOUND"


async def test_request_id_zero_and_duplicate_ids_are_invalid(node: QdbNode):
    node.faults.add_latency("ping", 0.2)
    async with raw_client(node.address) as client:
        reply = await client.request("ping", request_id=0)
        assert isinstance(reply, Error) and reply.name == "INVALID_REQUEST"
        await client.send_request("ping", request_id=5)
        await client.send_request("ping", request_id=5)
        first = await client.receive()
        assert isinstance(first, Error) and first.name == "INVALID_REQUEST"
        assert first.request_id == 5 and "already in flight" in first.message
        second = await client.receive()
        assert isinstance(second, Response) and second.request_id == 5


async def test_reply_larger_than_the_clients_max_frame_is_frame_too_large(node: QdbNode):
    client = await RawClient.connect(node.address)
    try:
        await client.handshake(max_frame_size=4096)
        reply = await client.request("query", {"sql": "select zeroblob(10000)"})
        assert isinstance(reply, Error) and reply.name == "FRAME_TOO_LARGE"
        assert (await client.call("query", {"sql": "select 2"}))["rows"] == [[2]]
    finally:
        await client.aclose()
