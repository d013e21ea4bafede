"""Hostile values from a peer: every count/id is u64, codes and versions are bounded.

A node can send any CBOR integer where the schema says ``uint``: 2**64, a
bignum of 1100 bits, or one of 5000 decimal digits (beyond what ``str()``
of an int accepts). Each must be refused as a per-message fault
(MessageError, the connection goes on), never reach code that divides,
formats or sleeps on it. Pure: no sockets, no trio.
"""

from __future__ import annotations

from typing import Any

import pytest

from qdb_client.errors import MessageError, QdbError, ValueNotEncodable
from qdb_client.protocol import (
    BadMessage,
    Error,
    GoAway,
    Hello,
    Kind,
    Ping,
    ProtocolConnection,
    Request,
    Response,
    Role,
    State,
    StreamCredit,
    StreamEnd,
    StreamPage,
    Welcome,
    encode_body,
    encode_frame,
    encode_message,
    error_from_message,
)

U64 = 2**64 - 1
#: Above u64; 2**1100 is too big for a float; 10**5000 is too long for str().
HUGE = [2**64, 2**1100, 10**5000]
NEGATIVE = [-1, -(2**64), -(10**5000)]

HELLO = Hello(versions=(1,))
WELCOME = Welcome(1, "n1", "s1", 1 << 20, 16, 30_000)
WELCOME_BODY = WELCOME.body()
ERROR_BODY = {"code": 503, "name": "UNAVAILABLE", "message": "m", "retryable": True}


def open_client() -> ProtocolConnection:
    client = ProtocolConnection(Role.CLIENT)
    client.send(HELLO)
    client.receive_data(encode_message(WELCOME))
    assert client.next_event() == WELCOME
    return client


def open_server() -> ProtocolConnection:
    server = ProtocolConnection(Role.SERVER)
    server.receive_data(encode_message(HELLO))
    assert server.next_event() == HELLO
    server.send(WELCOME)
    return server


def feed(conn: ProtocolConnection, kind: int, body: Any, request_id: int = 7) -> Any:
    conn.receive_data(encode_frame(kind, request_id, encode_body(body)))
    return conn.next_event()


def assert_bad_and_usable(conn: ProtocolConnection, event: Any, key: str) -> None:
    """A per-message fault naming ``key``, and the connection still carries frames."""
    assert isinstance(event, BadMessage), event
    assert isinstance(event.error, MessageError)
    assert key in str(event.error)
    assert len(str(event.error)) < 300  # the huge value is not printed
    assert conn.state is State.OPEN
    conn.receive_data(encode_message(Ping(99)))
    assert conn.next_event() == Ping(99)


# Every uint field a client receives after the handshake, with a valid body around it.
CLIENT_UINT_FIELDS = [
    (Kind.ERROR, ERROR_BODY, "retry_after_ms"),
    (Kind.GOAWAY, {"reason": "shutdown", "last_request_id": 1}, "last_request_id"),
    (Kind.STREAM_PAGE, {"seq": 0, "rows": [], "token": b""}, "seq"),
    (Kind.STREAM_END, {"seq": 0, "row_count": 0, "digest": b"\0" * 32}, "seq"),
    (Kind.STREAM_END, {"seq": 0, "row_count": 0, "digest": b"\0" * 32}, "row_count"),
]
SERVER_UINT_FIELDS = [
    (Kind.REQUEST, {"method": "ping"}, "deadline_ms"),
    (Kind.STREAM_CREDIT, {"pages": 1}, "pages"),
    (Kind.GOAWAY, {"reason": "client_close", "last_request_id": 1}, "last_request_id"),
]
WELCOME_UINT_FIELDS = ["max_frame", "max_in_flight", "idle_timeout_ms", "version"]


def vid(value: int) -> str:
    """A test id for an integer (pytest's own ``str()`` fails past 4300 digits)."""
    if abs(value) < 10**20:
        return str(value)
    return f"{'-' if value < 0 else ''}{value.bit_length()}bits"


@pytest.mark.parametrize("value", HUGE + NEGATIVE, ids=vid)
@pytest.mark.parametrize(
    ("kind", "body", "key"),
    CLIENT_UINT_FIELDS,
    ids=[f"{k.name}-{f}" for k, _, f in CLIENT_UINT_FIELDS],
)
def test_client_refuses_out_of_range_uints(kind: Kind, body: dict, key: str, value: int) -> None:
    client = open_client()
    assert_bad_and_usable(client, feed(client, kind, {**body, key: value}), key)


@pytest.mark.parametrize("value", HUGE + NEGATIVE, ids=vid)
@pytest.mark.parametrize(
    ("kind", "body", "key"),
    SERVER_UINT_FIELDS,
    ids=[f"{k.name}-{f}" for k, _, f in SERVER_UINT_FIELDS],
)
def test_server_refuses_out_of_range_uints(kind: Kind, body: dict, key: str, value: int) -> None:
    server = open_server()
    assert_bad_and_usable(server, feed(server, kind, {**body, key: value}), key)


@pytest.mark.parametrize("value", HUGE + NEGATIVE, ids=vid)
@pytest.mark.parametrize("key", WELCOME_UINT_FIELDS)
def test_welcome_with_out_of_range_uint_is_a_bad_message(key: str, value: int) -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(HELLO)
    event = feed(client, Kind.WELCOME, {**WELCOME_BODY, key: value}, request_id=0)
    assert isinstance(event, BadMessage) and key in str(event.error)
    assert len(str(event.error)) < 300
    assert client.state is State.HANDSHAKE  # no WELCOME was accepted


@pytest.mark.parametrize("value", [*HUGE, 2**64 - 1, 2**63], ids=vid)
def test_hello_max_frame_above_u64_is_refused(value: int) -> None:
    server = ProtocolConnection(Role.SERVER)
    event = feed(server, Kind.HELLO, {"versions": [1], "max_frame": value}, request_id=0)
    if value <= U64:
        assert isinstance(event, Hello) and event.max_frame_size == value
    else:
        assert isinstance(event, BadMessage) and "max_frame" in str(event.error)


def test_u64_max_is_accepted_everywhere() -> None:
    client = open_client()
    event = feed(client, Kind.ERROR, {**ERROR_BODY, "retry_after_ms": U64})
    assert isinstance(event, Error) and event.retry_after_ms == U64
    event = feed(client, Kind.STREAM_END, {"seq": U64, "row_count": U64, "digest": b""})
    assert isinstance(event, StreamEnd) and event.row_count == U64
    server = open_server()
    event = feed(server, Kind.REQUEST, {"method": "q", "deadline_ms": U64})
    assert isinstance(event, Request) and event.deadline_ms == U64
    assert feed(server, Kind.STREAM_CREDIT, {"pages": U64}) == StreamCredit(7, U64)


def test_retry_after_of_1100_bits_never_reaches_the_retry_policy() -> None:
    """The original report: ``retry_after_ms=2**1100`` made the retry policy
    divide it by 1000.0 and raise OverflowError. It is now refused on arrival."""
    client = open_client()
    event = feed(client, Kind.ERROR, {**ERROR_BODY, "retry_after_ms": 2**1100}, request_id=3)
    assert isinstance(event, BadMessage) and event.request_id == 3
    assert "retry_after_ms" in str(event.error)
    # What does come through is small enough for any arithmetic.
    event = feed(client, Kind.ERROR, {**ERROR_BODY, "retry_after_ms": U64}, request_id=4)
    assert isinstance(event, Error)
    assert event.retry_after_ms is not None and event.retry_after_ms / 1000.0 < 2e16


@pytest.mark.parametrize("code", [0, 1, 99, 1000, 65535, U64, *HUGE, *NEGATIVE], ids=vid)
def test_error_code_must_be_a_3_digit_class(code: int) -> None:
    client = open_client()
    event = feed(client, Kind.ERROR, {**ERROR_BODY, "code": code})
    assert_bad_and_usable(client, event, "code")


@pytest.mark.parametrize("code", [100, 422, 503, 999])
def test_error_codes_in_range_are_accepted_and_printable(code: int) -> None:
    client = open_client()
    event = feed(client, Kind.ERROR, {**ERROR_BODY, "code": code})
    assert isinstance(event, Error) and event.code == code
    assert str(code) in str(error_from_message(event))


def test_huge_error_code_during_the_handshake_is_a_bad_message() -> None:
    """The known one: ERROR code=10**5000 reached ``str()`` in ServerError and
    tore the whole connection down with ValueError. Now it is a MessageError."""
    client = ProtocolConnection(Role.CLIENT)
    client.send(HELLO)
    event = feed(client, Kind.ERROR, {**ERROR_BODY, "code": 10**5000}, request_id=0)
    assert isinstance(event, BadMessage) and "code" in str(event.error)


@pytest.mark.parametrize("version", [0, 256, 1000, U64, *HUGE, -1], ids=vid)
def test_welcome_version_must_be_1_to_255(version: int) -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(HELLO)
    event = feed(client, Kind.WELCOME, {**WELCOME_BODY, "version": version}, request_id=0)
    assert isinstance(event, BadMessage) and "version" in str(event.error)


def test_stream_page_rows_must_be_arrays() -> None:
    client = open_client()
    event = feed(client, Kind.STREAM_PAGE, {"seq": 0, "rows": [1, 2], "token": b""})
    assert_bad_and_usable(client, event, "rows")
    event = feed(client, Kind.STREAM_PAGE, {"seq": 0, "rows": [[1], [2]], "token": b""})
    assert isinstance(event, StreamPage) and event.rows == ([1], [2])


# ------------------------------------------------------------ sending side

OUT_OF_RANGE_MESSAGES = [
    Request(1, "ping", deadline_ms=2**64),
    Request(1, "ping", deadline_ms=-1),
    Request(1, "ping", deadline_ms=10**5000),
    Error(1, 1000, "X", "m", False),
    Error(1, 99, "X", "m", False),
    Error(1, 503, "X", "m", True, retry_after_ms=2**1100),
    Error(1, True, "X", "m", True),  # type: ignore[arg-type]
    GoAway("shutdown", 2**64),
    StreamCredit(1, 0),
    StreamCredit(1, 2**64),
    StreamEnd(1, 0, 2**64, b""),
    StreamPage(1, -1, (), b""),
    Welcome(0, "n", "s", 1 << 20, 1, 1),
    Welcome(256, "n", "s", 1 << 20, 1, 1),
    Welcome(1, "n", "s", 1023, 1, 1),
    Welcome(1, "n", "s", 1 << 20, 2**64, 1),
    Welcome(1, "n", "s", 1 << 20, 1, None),  # type: ignore[arg-type]
    Hello(versions=()),
    Hello(versions=(0,)),
    Hello(versions=(1, 256)),
    Hello(versions=(1,), max_frame_size=2**64),
    Ping(2**64),
    Ping(-1),
]


@pytest.mark.parametrize("message", OUT_OF_RANGE_MESSAGES, ids=lambda m: type(m).__name__)
def test_out_of_range_values_are_never_encoded(message: Any) -> None:
    with pytest.raises(ValueNotEncodable) as info:
        encode_message(message)
    assert isinstance(info.value, QdbError)
    assert len(str(info.value)) < 300


def test_a_refused_send_leaves_the_connection_usable() -> None:
    server = open_server()
    with pytest.raises(ValueNotEncodable):
        server.send(Error(5, 503, "UNAVAILABLE", "m", True, retry_after_ms=2**70))
    assert server.send(Response(5, None)) == encode_message(Response(5, None))


def test_encode_frame_refuses_out_of_range_headers() -> None:
    for kind, request_id, flags in [
        (256, 1, 0),
        (-1, 1, 0),
        (1, 2**64, 0),
        (1, -1, 0),
        (1, 1, 256),
    ]:
        with pytest.raises(ValueNotEncodable):
            encode_frame(kind, request_id, b"\xa0", flags=flags)
