"""The sans-IO connection state machine, the body codec and the error codes.

Client and server are two ``ProtocolConnection`` objects wired together in
memory (as h11's tests do): what one ``send``s, the other ``receive_data``s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cbor2
import pytest

from qdb_client.errors import (
    FrameError,
    FrameTooLarge,
    MessageError,
    ProtocolError,
    ProtocolViolation,
    ValueNotEncodable,
)
from qdb_client.protocol import (
    DEFAULT_MAX_FRAME_SIZE,
    PROTOCOL_VERSIONS,
    RETRYABLE_CLASSES,
    BadMessage,
    Cancel,
    Error,
    ErrorCode,
    Event,
    GoAway,
    Hello,
    Kind,
    Message,
    Ping,
    Pong,
    ProtocolConnection,
    Request,
    Response,
    Role,
    State,
    StreamCredit,
    StreamEnd,
    StreamPage,
    Welcome,
    choose_version,
    decode_body,
    encode_body,
    encode_frame,
    encode_message,
    error_message,
)

HELLO = Hello(versions=(1,), client_name="test")


def welcome(**overrides: Any) -> Welcome:
    fields: dict[str, Any] = {
        "version": 1,
        "node_id": "n1",
        "session_id": "s1",
        "max_frame_size": DEFAULT_MAX_FRAME_SIZE,
        "max_in_flight": 16,
        "idle_timeout_ms": 30_000,
    }
    fields.update(overrides)
    return Welcome(**fields)


class Pair:
    """A client and a server connection with an in-memory wire between them."""

    def __init__(self, **server_kwargs: Any) -> None:
        self.client = ProtocolConnection(Role.CLIENT)
        self.server = ProtocolConnection(Role.SERVER, **server_kwargs)

    def to_server(self, message: Message) -> Message | BadMessage | None:
        self.server.receive_data(self.client.send(message))
        return self.server.next_event()

    def to_client(self, message: Message) -> Message | BadMessage | None:
        self.client.receive_data(self.server.send(message))
        return self.client.next_event()

    def handshake(self, **welcome_overrides: Any) -> Pair:
        assert self.to_server(HELLO) == HELLO
        w = welcome(**welcome_overrides)
        assert self.to_client(w) == w
        return self


def raw_event(conn: ProtocolConnection, data: bytes) -> Message | BadMessage | None:
    conn.receive_data(data)
    return conn.next_event()


def open_server() -> ProtocolConnection:
    return Pair().handshake().server


def open_client() -> ProtocolConnection:
    return Pair().handshake().client


# ------------------------------------------------------------------ handshake


def test_handshake_opens_both_sides() -> None:
    pair = Pair()
    assert pair.client.state is pair.server.state is State.HANDSHAKE
    assert pair.to_server(HELLO) == HELLO
    assert pair.server.state is State.HANDSHAKE  # until WELCOME is sent
    w = welcome()
    assert pair.to_client(w) == w
    assert pair.client.state is pair.server.state is State.OPEN
    assert pair.client.version == pair.server.version == 1


def test_requests_and_replies_flow_after_the_handshake() -> None:
    pair = Pair().handshake()
    requests = [Request(request_id=i, method="ping") for i in (1, 2, 3)]
    for request in requests:
        assert pair.to_server(request) == request
    # Replies in any order.
    for rid in (3, 1, 2):
        reply = Response(request_id=rid, result={"node_id": "n1"})
        assert pair.to_client(reply) == reply
    assert pair.to_server(Cancel(7)) == Cancel(7)
    assert pair.to_server(StreamCredit(7, 2)) == StreamCredit(7, 2)
    page = StreamPage(7, 0, (["a"],), b"t", ("c",))
    assert pair.to_client(page) == page
    assert pair.to_client(StreamEnd(7, 0, 1, b"d" * 32)) == StreamEnd(7, 0, 1, b"d" * 32)
    assert pair.to_client(Event("topology")) == Event("topology")


def test_ping_and_pong_both_ways() -> None:
    pair = Pair().handshake()
    assert pair.to_server(Ping(5)) == Ping(5)
    assert pair.to_client(Pong(5)) == Pong(5)
    assert pair.to_client(Ping(6)) == Ping(6)
    assert pair.to_server(Pong(6)) == Pong(6)


@pytest.mark.parametrize(
    ("offered", "supported", "chosen"),
    [
        ((1,), (1,), 1),
        ((1, 2, 3), (1, 2), 2),
        ((3, 1, 2), (2, 3, 4), 3),
        ((2,), (1,), None),
        ((5, 7), (1, 6), None),
    ],
)
def test_choose_version_picks_newest_common(
    offered: tuple[int, ...], supported: tuple[int, ...], chosen: int | None
) -> None:
    assert choose_version(offered, supported) == chosen


def test_default_versions_are_v1() -> None:
    assert PROTOCOL_VERSIONS == (1,)
    assert choose_version((1, 2, 9)) == 1


def test_client_rejects_welcome_with_unoffered_version() -> None:
    pair = Pair()
    pair.to_server(HELLO)
    pair.client.receive_data(encode_message(welcome(version=2)))
    with pytest.raises(ProtocolViolation):
        pair.client.next_event()
    assert pair.client.state is State.HANDSHAKE


def test_client_accepts_a_version_it_offered() -> None:
    client = ProtocolConnection(Role.CLIENT, versions=(1, 2))
    client.send(Hello(versions=(1, 2)))
    assert raw_event(client, encode_message(welcome(version=2))) == welcome(version=2)
    assert client.version == 2


def test_version_mismatch_error_closes_both_sides() -> None:
    pair = Pair()
    hello = Hello(versions=(7,))
    assert pair.to_server(hello) == hello
    assert choose_version(hello.versions) is None
    error = error_message(
        0, ErrorCode.VERSION_MISMATCH, "no common version", details={"supported_versions": [1]}
    )
    received = pair.to_client(error)
    assert isinstance(received, Error)
    assert received.code == 426 and received.name == "VERSION_MISMATCH"
    assert received.details == {"supported_versions": [1]} and not received.retryable
    assert pair.client.state is pair.server.state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        pair.client.send(Request(1, "ping"))
    with pytest.raises(ProtocolViolation):
        pair.server.send(welcome())


def test_server_may_turn_a_client_away_before_hello() -> None:
    pair = Pair()
    pair.client.send(HELLO)  # in flight, never read
    error = error_message(0, ErrorCode.CAPACITY_EXCEEDED, "too many connections")
    assert pair.to_client(error) == error
    assert pair.client.state is State.CLOSED


def test_goaway_can_follow_a_handshake_error() -> None:
    """A connection-level fault before the handshake: ERROR id 0, GOAWAY, close."""
    server = ProtocolConnection(Role.SERVER)
    server.receive_data(encode_message(Request(5, "ping")))
    with pytest.raises(ProtocolViolation):
        server.next_event()
    server.send(error_message(0, ErrorCode.PARSE_ERROR, "expected HELLO"))
    assert server.state is State.CLOSED
    goaway = GoAway("protocol_error", 0, "expected HELLO")
    assert server.send(goaway) == encode_message(goaway)
    assert server.sent_goaway


def test_goaway_can_be_sent_during_the_handshake() -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(HELLO)
    client.send(GoAway("client_close", 0))
    assert client.sent_goaway


def test_hello_after_handshake_is_a_bad_message() -> None:
    server = open_server()
    event = raw_event(server, encode_message(HELLO))
    assert isinstance(event, BadMessage) and event.error.kind == Kind.HELLO
    assert server.state is State.OPEN


def test_welcome_after_handshake_is_a_bad_message() -> None:
    client = open_client()
    event = raw_event(client, encode_message(welcome()))
    assert isinstance(event, BadMessage)
    assert client.state is State.OPEN


def test_hello_and_welcome_cannot_be_sent_twice() -> None:
    pair = Pair().handshake()
    with pytest.raises(ProtocolViolation):
        pair.client.send(HELLO)
    with pytest.raises(ProtocolViolation):
        pair.server.send(welcome())


# ---------------------------------------------------------- order and state


@pytest.mark.parametrize(
    "message", [Request(1, "ping"), Cancel(1), Ping(1), Pong(1), StreamCredit(1, 1)]
)
def test_client_sends_nothing_but_hello_before_welcome(message: Message) -> None:
    client = ProtocolConnection(Role.CLIENT)
    with pytest.raises(ProtocolViolation):
        client.send(message)
    client.send(HELLO)
    with pytest.raises(ProtocolViolation):
        client.send(message)


@pytest.mark.parametrize(
    "message", [Response(1, None), Ping(1), Event("topology"), StreamEnd(1, 0, 0, b"")]
)
def test_server_sends_nothing_but_welcome_or_error_before_hello(message: Message) -> None:
    server = ProtocolConnection(Role.SERVER)
    with pytest.raises(ProtocolViolation):
        server.send(message)


@pytest.mark.parametrize("message", [Request(1, "ping"), Ping(1), Cancel(1), GoAway("x", 0)])
def test_server_refuses_anything_but_hello_first(message: Message) -> None:
    server = ProtocolConnection(Role.SERVER)
    server.receive_data(encode_message(message))
    with pytest.raises(ProtocolViolation):
        server.next_event()


@pytest.mark.parametrize("message", [Response(1, None), Ping(1), Event("x"), GoAway("x", 0)])
def test_client_refuses_anything_but_welcome_or_error_first(message: Message) -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(HELLO)
    client.receive_data(encode_message(message))
    with pytest.raises(ProtocolViolation):
        client.next_event()


def test_request_after_receiving_goaway_is_refused() -> None:
    pair = Pair().handshake()
    goaway = GoAway("shutdown", 3, "restarting")
    assert pair.to_client(goaway) == goaway
    assert pair.client.received_goaway == goaway
    with pytest.raises(ProtocolViolation):
        pair.client.send(Request(4, "ping"))
    # Everything else still goes: cancelling, liveness, stream credit, farewell.
    pair.client.send(Cancel(3))
    pair.client.send(Ping(9))
    pair.client.send(StreamCredit(2, 1))
    pair.client.send(GoAway("client_close", 3))


def test_server_records_a_client_goaway() -> None:
    pair = Pair().handshake()
    assert pair.to_server(GoAway("client_close", 4)) == GoAway("client_close", 4)
    assert pair.server.received_goaway == GoAway("client_close", 4)
    assert pair.client.sent_goaway


def test_eof_closes() -> None:
    pair = Pair().handshake()
    pair.client.receive_eof()
    assert pair.client.state is State.CLOSED
    with pytest.raises(ProtocolViolation):
        pair.client.send(Request(1, "ping"))


def test_eof_inside_a_frame_is_a_frame_error() -> None:
    client = open_client()
    data = encode_message(Response(1, "x"))
    assert raw_event(client, data[:-1]) is None
    with pytest.raises(FrameError):
        client.receive_eof()


def test_eof_inside_a_header_is_a_frame_error() -> None:
    server = open_server()
    assert raw_event(server, b"QD\x00") is None
    with pytest.raises(FrameError):
        server.receive_eof()


# ----------------------------------------------------------------- direction

CLIENT_ONLY = [HELLO, Request(1, "q"), Cancel(1), StreamCredit(1, 1)]
SERVER_ONLY = [
    welcome(),
    Response(1, None),
    Error(1, 400, "PARSE_ERROR", "x", False),
    StreamPage(1, 0, (), b""),
    StreamEnd(1, 0, 0, b""),
    Event("topology", request_id=1),
]


@pytest.mark.parametrize("message", SERVER_ONLY, ids=lambda m: m.kind.name)
def test_client_cannot_send_server_kinds(message: Message) -> None:
    client = open_client()
    with pytest.raises(ProtocolViolation):
        client.send(message)


@pytest.mark.parametrize("message", CLIENT_ONLY, ids=lambda m: m.kind.name)
def test_server_cannot_send_client_kinds(message: Message) -> None:
    server = open_server()
    with pytest.raises(ProtocolViolation):
        server.send(message)


@pytest.mark.parametrize("message", CLIENT_ONLY[1:], ids=lambda m: m.kind.name)
def test_client_receiving_client_kinds_gets_bad_message(message: Message) -> None:
    client = open_client()
    event = raw_event(client, encode_message(message))
    assert isinstance(event, BadMessage)
    assert event.request_id == message.request_id and event.error.kind == message.kind
    assert client.state is State.OPEN
    assert raw_event(client, encode_message(Pong(2))) == Pong(2)


@pytest.mark.parametrize("message", SERVER_ONLY[1:], ids=lambda m: m.kind.name)
def test_server_receiving_server_kinds_gets_bad_message(message: Message) -> None:
    server = open_server()
    event = raw_event(server, encode_message(message))
    assert isinstance(event, BadMessage)
    assert event.request_id == message.request_id
    assert raw_event(server, encode_message(Ping(2))) == Ping(2)


# ---------------------------------------------------------------- frame size


def test_send_larger_than_peer_max_frame_is_refused() -> None:
    pair = Pair().handshake(max_frame_size=1024)
    assert pair.client.peer_max_frame_size == 1024
    big = Request(1, "execute", {"sql": "x" * 1100})
    with pytest.raises(FrameTooLarge) as info:
        pair.client.send(big)
    assert info.value.limit == 1024 and info.value.size == len(encode_message(big))
    small = Request(2, "ping")
    assert pair.to_server(small) == small  # nothing was half-sent


def test_server_honours_the_client_max_frame() -> None:
    pair = Pair()
    hello = Hello(versions=(1,), max_frame_size=1024)
    assert pair.to_server(hello) == hello
    assert pair.server.peer_max_frame_size == 1024
    pair.server.send(welcome())
    with pytest.raises(FrameTooLarge):
        pair.server.send(Response(1, "y" * 1100))
    pair.server.send(Response(1, "y" * 10))


def test_peer_limit_defaults_to_one_mib() -> None:
    pair = Pair()
    pair.to_server(HELLO)  # no max_frame
    assert pair.server.peer_max_frame_size == DEFAULT_MAX_FRAME_SIZE == 1 << 20


def test_receiver_limit_is_checked_from_the_header() -> None:
    server = ProtocolConnection(Role.SERVER, max_frame_size=100)
    assert server.max_frame_size == 100
    assert raw_event(server, encode_message(HELLO)) == HELLO
    server.send(welcome())
    frame = encode_message(Request(1, "execute", {"sql": "z" * 200}))
    with pytest.raises(FrameTooLarge):
        raw_event(server, frame[:20])  # the header is enough
    with pytest.raises(FrameTooLarge):
        raw_event(server, frame[20:])  # and the connection stays broken


# ------------------------------------------------------ per-message faults


def test_checksum_mismatch_keeps_the_connection_usable() -> None:
    server = open_server()
    bad = bytearray(encode_message(Request(4, "ping")))
    bad[-1] ^= 0x01
    event = raw_event(server, bytes(bad) + encode_message(Request(5, "ping")))
    assert isinstance(event, BadMessage) and event.request_id == 4
    assert "checksum" in str(event.error)
    assert server.next_event() == Request(5, "ping")


def test_unsupported_flags_are_a_bad_message() -> None:
    server = open_server()
    event = raw_event(server, encode_frame(Kind.PING, 8, encode_body({}), flags=0x01))
    assert isinstance(event, BadMessage) and event.request_id == 8
    assert raw_event(server, encode_message(Ping(9))) == Ping(9)


def test_unknown_kind_is_a_bad_message() -> None:
    client = open_client()
    event = raw_event(client, encode_frame(0x7E, 3, encode_body({})))
    assert isinstance(event, BadMessage) and event.request_id == 3
    assert event.error.kind == 0x7E


def test_bad_magic_breaks_the_connection() -> None:
    server = open_server()
    with pytest.raises(FrameError):
        raw_event(server, b"HTTP/1.1 GET /")
    server.receive_data(encode_message(Ping(1)))
    with pytest.raises(FrameError):
        server.next_event()


def _body_event(role: Role, kind: int, body: Any, request_id: int = 11) -> Any:
    conn = open_server() if role is Role.SERVER else open_client()
    data = encode_body(body) if not isinstance(body, bytes) else body
    return raw_event(conn, encode_frame(kind, request_id, data))


ERROR_BODY = {"code": 503, "name": "UNAVAILABLE", "message": "m", "retryable": True}

BAD_BODIES = [
    # (receiver, kind, body, what is wrong)
    (Role.SERVER, Kind.REQUEST, {"args": {}}, "missing"),
    (Role.SERVER, Kind.REQUEST, {"method": 5}, "must be str"),
    (Role.SERVER, Kind.REQUEST, {"method": "q", "args": [1]}, "must be dict"),
    (Role.SERVER, Kind.REQUEST, {"method": "q", "deadline_ms": True}, "must be int"),
    (Role.SERVER, Kind.REQUEST, {"method": "q", "deadline_ms": -1}, "negative"),
    (Role.SERVER, Kind.REQUEST, {"method": "q", "deadline_ms": 1.5}, "must be int"),
    (Role.SERVER, Kind.REQUEST, {"method": "q", "idem_key": None}, "must be str"),
    (Role.SERVER, Kind.REQUEST, ["method", "q"], "must be a map"),
    (Role.SERVER, Kind.REQUEST, "ping", "must be a map"),
    (Role.SERVER, Kind.STREAM_CREDIT, {"pages": 0}, "positive"),
    (Role.SERVER, Kind.STREAM_CREDIT, {"pages": False}, "must be int"),
    (Role.SERVER, Kind.STREAM_CREDIT, {}, "missing"),
    (Role.SERVER, Kind.GOAWAY, {"reason": "x"}, "missing"),
    (Role.SERVER, Kind.GOAWAY, {"reason": "x", "last_request_id": -5}, "negative"),
    (Role.CLIENT, Kind.RESPONSE, {}, "missing"),
    (Role.CLIENT, Kind.ERROR, {"code": 400, "name": "X", "message": "m", "retryable": 1}, "bool"),
    (Role.CLIENT, Kind.ERROR, {"code": True, "name": "X", "message": "", "retryable": 0}, "int"),
    (Role.CLIENT, Kind.ERROR, {"code": 400, "name": "X", "retryable": False}, "missing"),
    (Role.CLIENT, Kind.STREAM_PAGE, {"seq": 0, "rows": [], "token": "t"}, "must be bytes"),
    (Role.CLIENT, Kind.STREAM_PAGE, {"seq": 0, "rows": [], "token": b"", "columns": [1]}, "text"),
    (Role.CLIENT, Kind.STREAM_END, {"seq": 0, "row_count": -1, "digest": b""}, "negative"),
    (Role.CLIENT, Kind.EVENT, {"data": {}}, "missing"),
    (Role.CLIENT, Kind.EVENT, {"topic": "t", "data": []}, "must be dict"),
    # Counts and ids are u64; ERROR code is a 3-digit class (docs/protocol.md 5.3).
    (Role.SERVER, Kind.REQUEST, {"method": "q", "deadline_ms": 2**64}, "at most 2**64-1"),
    (Role.SERVER, Kind.STREAM_CREDIT, {"pages": 10**5000}, "at most 2**64-1"),
    (Role.SERVER, Kind.GOAWAY, {"reason": "x", "last_request_id": 2**70}, "at most"),
    (Role.CLIENT, Kind.ERROR, {**ERROR_BODY, "code": 10**5000}, "at most 999"),
    (Role.CLIENT, Kind.ERROR, {**ERROR_BODY, "code": 42}, "at least 100"),
    (Role.CLIENT, Kind.ERROR, {**ERROR_BODY, "retry_after_ms": 2**1100}, "retry_after_ms"),
    (Role.CLIENT, Kind.STREAM_PAGE, {"seq": 2**64, "rows": [], "token": b""}, "at most"),
    (Role.CLIENT, Kind.STREAM_PAGE, {"seq": 0, "rows": [1], "token": b""}, "list of arrays"),
    (Role.CLIENT, Kind.STREAM_END, {"seq": 0, "row_count": 2**64, "digest": b""}, "at most"),
]  # fmt: skip


@pytest.mark.parametrize(("role", "kind", "body", "why"), BAD_BODIES)
def test_body_schema_violations_are_bad_messages(
    role: Role, kind: Kind, body: Any, why: str
) -> None:
    event = _body_event(role, kind, body)
    assert isinstance(event, BadMessage), event
    assert event.request_id == 11 and event.error.kind == kind
    assert why in str(event.error)


HELLO_BODIES = [
    {},
    {"versions": []},
    {"versions": [0]},
    {"versions": [256]},
    {"versions": [True]},
    {"versions": [1.0]},
    {"versions": 1},
    {"versions": [1], "auth": {"user": 1}},
    {"versions": [1], "auth": ["alice"]},
    {"versions": [1], "max_frame": -1},
    {"versions": [1], "max_frame": 1023},
    {"versions": [1], "session": 5},
]


@pytest.mark.parametrize("body", HELLO_BODIES)
def test_bad_hello_bodies(body: Any) -> None:
    server = ProtocolConnection(Role.SERVER)
    event = raw_event(server, encode_frame(Kind.HELLO, 0, encode_body(body)))
    assert isinstance(event, BadMessage)
    assert server.state is State.HANDSHAKE


WELCOME_BODY = welcome().body()


@pytest.mark.parametrize(
    "change",
    [
        {"version": "1"},
        {"max_in_flight": -1},
        {"idle_timeout_ms": None},
        {"members": [{"node_id": "n2"}]},
        {"members": ["n2"]},
        {"members": [{"node_id": "n2", "address": 7}]},
        {"session": b"s1"},
        {"version": 0},
        {"version": 256},
        {"version": 10**5000},
        {"max_frame": 2**64},
        {"max_in_flight": 2**64},
        {"idle_timeout_ms": 2**1100},
    ],
)
def test_bad_welcome_bodies(change: dict[str, Any]) -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(HELLO)
    event = raw_event(
        client, encode_frame(Kind.WELCOME, 0, encode_body({**WELCOME_BODY, **change}))
    )
    assert isinstance(event, BadMessage)


def test_unknown_keys_are_ignored() -> None:
    server = open_server()
    body = {"method": "ping", "args": {}, "future_option": [1, 2], "x": None}
    assert raw_event(server, encode_frame(Kind.REQUEST, 3, encode_body(body))) == Request(3, "ping")


def test_optional_keys_are_omitted_not_null() -> None:
    assert Request(1, "ping").body() == {"method": "ping", "args": {}}
    assert error_message(1, ErrorCode.INTERNAL, "x").body() == {
        "code": 500,
        "name": "INTERNAL",
        "message": "x",
        "retryable": True,
    }
    assert "columns" not in StreamPage(1, 1, (), b"").body()
    assert set(HELLO.body()) == {"versions", "client", "client_version"}
    assert Response(1, None).body() == {"result": None}  # required, null is a value


def test_a_message_error_after_a_good_frame_keeps_order() -> None:
    client = open_client()
    stream = (
        encode_message(Response(1, 1))
        + encode_frame(Kind.RESPONSE, 2, b"\xff")  # undecodable body
        + encode_message(Response(3, 3))
    )
    client.receive_data(stream)
    assert client.next_event() == Response(1, 1)
    bad = client.next_event()
    assert isinstance(bad, BadMessage) and bad.request_id == 2
    assert client.next_event() == Response(3, 3)
    assert client.next_event() is None


# ------------------------------------------------------------------- codec


def _nested_lists(depth: int, inner: bytes = b"\x00") -> bytes:
    return b"\x81" * depth + inner


def test_decode_body_round_trips_the_data_model() -> None:
    value = {
        "null": None,
        "bools": [True, False],
        "ints": [0, -1, 23, 24, 2**63, 2**64 - 1, -(2**64), 2**64, -(2**64) - 1, 2**200],
        "floats": [0.5, -0.0, 1e308, float("inf"), float("-inf")],
        "text": "h\u00e9llo \u2603",
        "bytes": b"\x00\xff",
        "nested": {"a": [[{"b": []}]]},
        b"bytes-key": 1,
    }
    assert decode_body(encode_body(value)) == value


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\xa0\x00", "trailing"),
        (b"\xa0\xa0", "trailing"),
        (b"\xbf\xff", "indefinite"),
        (b"\x9f\xff", "indefinite"),
        (b"\x7f\x61a\xff", "indefinite"),
        (b"\x5f\x41a\xff", "indefinite"),
        (b"\xa1\x01\x02", "map key"),
        (b"\xa1\xf5\x02", "map key"),
        (b"\xa1\xf6\x02", "map key"),
        (b"\xa1\xfb\x3f\xf8\x00\x00\x00\x00\x00\x00\x02", "map key"),
        (b"\xa1\x80\x02", "map key"),
        (b"\xa1\x61a\xa1\x01\x02", "map key"),  # nested
        (b"\xd8\x1c\x80", "shared"),
        (b"\xd8\x1d\x00", "shared"),
        (b"\xd8\x1c\x81\xd8\x1d\x00", "shared"),  # a cycle
        (b"\x62\xff\xfe", "text"),  # invalid UTF-8
        (b"\x82\x01", ""),  # truncated
        (b"\xc2\x61a", "bignum"),
        (b"\x1c", ""),  # reserved additional information
    ],
)
def test_decode_body_refuses(data: bytes, why: str) -> None:
    with pytest.raises(MessageError) as info:
        decode_body(data, request_id=9, kind=Kind.RESPONSE)
    assert why in str(info.value)
    assert info.value.request_id == 9 and info.value.kind == Kind.RESPONSE


def test_depth_limit_is_32() -> None:
    assert decode_body(_nested_lists(32)) is not None
    # 33 arrays, the innermost empty: that empty array is at depth 32, nothing deeper.
    assert decode_body(_nested_lists(32, b"\x80")) is not None
    with pytest.raises(MessageError, match="depth"):
        decode_body(_nested_lists(33))
    with pytest.raises(MessageError, match="depth"):
        decode_body(_nested_lists(10_000))
    # Tags count: a bignum at depth 32 puts its byte string at 33.
    bignum = cbor2.dumps(2**70)
    assert decode_body(_nested_lists(31, bignum)) is not None
    with pytest.raises(MessageError, match="depth"):
        decode_body(_nested_lists(32, bignum))


def test_depth_in_a_message_body() -> None:
    client = open_client()
    deep: Any = 0
    for _ in range(31):
        deep = [deep]
    assert raw_event(client, encode_message(Response(1, deep))) == Response(1, deep)
    with pytest.raises(ValueNotEncodable):  # a sender refuses to build it...
        encode_message(Response(2, [deep]))
    too_deep = encode_frame(Kind.RESPONSE, 2, cbor2.dumps({"result": [deep]}))
    event = raw_event(client, too_deep)  # ...and a receiver refuses to read it
    assert isinstance(event, BadMessage) and event.request_id == 2


@pytest.mark.parametrize(
    "value",
    [object(), {"a": object()}, "\ud800", pytest.param("cycle", id="cycle")],
)
def test_unencodable_values(value: Any) -> None:
    if value == "cycle":
        value = []
        value.append(value)
    with pytest.raises(ValueNotEncodable):
        encode_body(value)
    with pytest.raises(ValueNotEncodable):
        encode_message(Request(1, "execute", {"params": [value]}))


def test_unencodable_request_leaves_the_connection_usable() -> None:
    pair = Pair().handshake()
    with pytest.raises(ValueNotEncodable):
        pair.client.send(Request(1, "execute", {"params": [object()]}))
    assert isinstance(ValueNotEncodable("x"), TypeError)
    assert pair.to_server(Request(2, "ping")) == Request(2, "ping")


def test_request_id_range() -> None:
    encode_message(Ping(2**64 - 1))
    with pytest.raises(ValueNotEncodable, match="request_id"):
        encode_message(Ping(2**64))
    with pytest.raises(ValueNotEncodable, match="request_id"):
        encode_message(Ping(-1))
    with pytest.raises(ValueNotEncodable, match="request_id"):
        encode_message(Ping(10**5000))  # no ValueError from str() of a huge int
    with pytest.raises(ValueNotEncodable):
        encode_frame(Kind.PING, 2**64, b"\xa0")
    with pytest.raises(ValueNotEncodable):
        encode_frame(256, 1, b"\xa0")


def test_errors_are_protocol_errors() -> None:
    for cls in (FrameError, FrameTooLarge, MessageError, ProtocolViolation):
        assert issubclass(cls, ProtocolError)
    assert issubclass(FrameTooLarge, FrameError)
    assert not issubclass(MessageError, FrameError)


# ------------------------------------------------------------- error codes

EXPECTED_CODES = {
    "PARSE_ERROR": (400, False),
    "INVALID_REQUEST": (400, False),
    "UNAUTHENTICATED": (401, False),
    "PERMISSION_DENIED": (403, False),
    "READ_ONLY": (403, False),
    "METHOD_NOT_FOUND": (404, False),
    "NOT_FOUND": (404, False),
    "TIMEOUT": (408, True),
    "CANCELLED": (499, False),
    "CONFLICT": (409, False),
    "TX_ABORTED": (409, False),
    "WRITE_CONFLICT": (409, True),
    "UNPREPARED": (404, False),
    "FRAME_TOO_LARGE": (413, False),
    "CONSTRAINT_VIOLATION": (422, False),
    "SQL_ERROR": (422, False),
    "VERSION_MISMATCH": (426, False),
    "OVERLOADED": (429, True),
    "INTERNAL": (500, True),
    "UNAVAILABLE": (503, True),
    "SHUTTING_DOWN": (503, True),
    "CAPACITY_EXCEEDED": (503, True),
}


def test_error_codes_match_the_table() -> None:
    assert {c.value: (c.code, c.retryable) for c in ErrorCode} == EXPECTED_CODES
    assert all(c.name == c.value for c in ErrorCode)


def test_retryable_classes() -> None:
    assert frozenset({408, 429, 500, 502, 503, 504}) == RETRYABLE_CLASSES
    for code in (400, 401, 403, 404, 409, 413, 422, 426, 499):
        assert code not in RETRYABLE_CLASSES


def test_error_codes_are_documented() -> None:
    """Every name appears in docs/protocol.md's table with its class and flag."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text("utf-8")
    for name, (code, retryable) in EXPECTED_CODES.items():
        row = f"| `{name}` | {code} | {'yes' if retryable else 'no'} |"
        assert row in doc, row


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda c: c.value)
def test_error_message_fills_class_and_flag(code: ErrorCode) -> None:
    error = error_message(3, code, "text", retry_after_ms=10, details={"k": 1})
    assert (error.code, error.name, error.retryable) == (code.code, code.value, code.retryable)
    client = open_client()
    assert raw_event(client, encode_message(error)) == error
    assert ErrorCode(error.name) is code
