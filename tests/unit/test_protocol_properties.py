"""Property tests of protocol v1: round trips, chunking, corruption, limits, garbage.

Pure: no sockets, no trio. Everything goes through the public functions of
:mod:`qdb_client.protocol` (``encode_message``, ``FrameDecoder``,
``decode_message``, ``ProtocolConnection``).
"""

from __future__ import annotations

import gc
import itertools
import math
import struct
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qdb_client.errors import (
    FrameError,
    FrameTooLarge,
    MessageError,
    ProtocolError,
    ProtocolViolation,
)
from qdb_client.protocol import (
    HEADER_SIZE,
    MAGIC,
    BadMessage,
    Cancel,
    Error,
    Event,
    FrameDecoder,
    GoAway,
    Hello,
    Kind,
    Member,
    Message,
    Ping,
    Pong,
    ProtocolConnection,
    Request,
    Response,
    Role,
    StreamCredit,
    StreamEnd,
    StreamPage,
    Welcome,
    decode_message,
    encode_body,
    encode_frame,
    encode_message,
)
from qdb_client.protocol.codec import MAX_DEPTH, BodyDecoder, decode_body

CI = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PER_KIND = settings(CI, max_examples=60)

U64 = 2**64 - 1

# --------------------------------------------------------------- strategies

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
u64 = st.integers(0, U64)
# Small, boundary and huge integers (beyond 64 bits they travel as bignums).
integers = st.one_of(
    st.integers(-1000, 1000),
    st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, U64, 2**64, -(2**63), -(2**64), -(2**64) - 1]),
    st.integers(-(2**80), 2**80),
    st.integers(),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    st.floats(allow_nan=True, allow_infinity=True),
    text,
    st.binary(max_size=16),
)


def _depth(value: Any) -> int:
    """Containers (and bignum tags) around the deepest item, as section 5.2 counts."""
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**64) <= value <= U64:
        return 1
    return 0


values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
).filter(lambda v: _depth(v) <= MAX_DEPTH - 4)
maps = st.dictionaries(text, values, max_size=4)
rows = st.lists(st.lists(values, max_size=4), max_size=4).map(tuple)

MESSAGES: dict[Kind, st.SearchStrategy[Message]] = {
    Kind.HELLO: st.builds(
        Hello,
        versions=st.lists(st.integers(1, 255), min_size=1, max_size=4).map(tuple),
        client_name=text,
        client_version=text,
        credentials=st.none() | st.dictionaries(text, text, max_size=3),
        resume_session=st.none() | text,
        max_frame_size=st.none() | st.integers(1024, 2**64 - 1),
    ),
    Kind.WELCOME: st.builds(
        Welcome,
        version=st.integers(1, 255),
        node_id=text,
        session_id=text,
        max_frame_size=st.integers(1024, 2**64 - 1),
        max_in_flight=u64,
        idle_timeout_ms=u64,
        members=st.lists(st.builds(Member, text, text), max_size=3).map(tuple),
        server_name=text,
    ),
    Kind.REQUEST: st.builds(
        Request,
        request_id=u64,
        method=text,
        args=maps,
        deadline_ms=st.none() | u64,
        idempotency_key=st.none() | text,
    ),
    Kind.RESPONSE: st.builds(Response, request_id=u64, result=values),
    Kind.ERROR: st.builds(
        Error,
        request_id=u64,
        code=st.integers(100, 999),
        name=text,
        message=text,
        retryable=st.booleans(),
        retry_after_ms=st.none() | u64,
        details=maps,
    ),
    Kind.CANCEL: st.builds(Cancel, request_id=u64),
    Kind.PING: st.builds(Ping, request_id=u64),
    Kind.PONG: st.builds(Pong, request_id=u64),
    Kind.GOAWAY: st.builds(
        GoAway,
        reason=st.sampled_from(
            ["shutdown", "idle_timeout", "max_lifetime", "overloaded", "protocol_error"]
        )
        | text,
        last_request_id=u64,
        message=text,
    ),
    Kind.STREAM_PAGE: st.builds(
        StreamPage,
        request_id=u64,
        seq=u64,
        rows=rows,
        resume_token=st.binary(max_size=32),
        columns=st.none() | st.lists(text, max_size=4).map(tuple),
    ),
    Kind.STREAM_END: st.builds(
        StreamEnd,
        request_id=u64,
        seq=u64,
        row_count=u64,
        digest=st.binary(min_size=32, max_size=32),
    ),
    Kind.STREAM_CREDIT: st.builds(StreamCredit, request_id=u64, pages=st.integers(1, U64)),
    Kind.EVENT: st.builds(Event, topic=text, data=maps, request_id=u64),
}
any_message = st.one_of(*MESSAGES.values())


def same(a: Any, b: Any) -> bool:
    """Equality that treats NaN as equal to NaN (and keeps -0.0 apart from 0.0)."""
    return type(a) is type(b) and repr(a) == repr(b)


def decode_stream(chunks: list[bytes], max_frame_size: int = 1 << 20) -> list[Message]:
    decoder = FrameDecoder(max_frame_size)
    out = []
    for chunk in chunks:
        decoder.feed(chunk)
        while (frame := decoder.next_frame()) is not None:
            out.append(decode_message(frame))
    decoder.check_eof()
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------- round trip


def test_a_strategy_for_every_kind() -> None:
    assert set(MESSAGES) == set(Kind)


@pytest.mark.parametrize("kind", list(Kind), ids=[k.name for k in Kind])
@PER_KIND
@given(data=st.data())
def test_round_trip_every_kind(kind: Kind, data: st.DataObject) -> None:
    message = data.draw(MESSAGES[kind])
    frame = encode_message(message)
    assert frame[:2] == MAGIC and frame[3] == kind
    assert int.from_bytes(frame[4:8], "big") == len(frame)
    assert int.from_bytes(frame[8:16], "big") == message.request_id
    (decoded,) = decode_stream([frame])
    assert same(decoded, message)
    assert encode_message(decoded) == frame


@CI
@given(value=values)
def test_values_round_trip_inside_a_response(value: Any) -> None:
    message = Response(request_id=1, result=value)
    (decoded,) = decode_stream([encode_message(message)])
    assert same(decoded.result, value)  # type: ignore[attr-defined]


@CI
@given(nan_bits=st.integers(0x7FF0_0000_0000_0001, 0x7FFF_FFFF_FFFF_FFFF), sign=st.booleans())
def test_any_nan_travels_as_the_canonical_nan(nan_bits: int, sign: bool) -> None:
    bits = nan_bits | (1 << 63 if sign else 0)
    nan = struct.unpack(">d", bits.to_bytes(8, "big"))[0]
    assert math.isnan(nan)
    assert encode_body(nan) == bytes.fromhex("f97e00")
    (decoded,) = decode_stream([encode_message(Response(1, [nan]))])
    assert math.isnan(decoded.result[0])  # type: ignore[attr-defined]


# ------------------------------------------------------------------ chunking


@CI
@given(
    messages=st.lists(any_message, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=30),
)
def test_any_chunking_decodes_the_same_messages(messages: list[Message], cuts: list[int]) -> None:
    stream = b"".join(encode_message(m) for m in messages)
    decoded = decode_stream(split(stream, cuts))
    assert len(decoded) == len(messages)
    assert all(same(d, m) for d, m in zip(decoded, messages, strict=True))


@CI
@given(messages=st.lists(any_message, min_size=1, max_size=4))
def test_byte_by_byte_decodes_the_same_messages(messages: list[Message]) -> None:
    stream = b"".join(encode_message(m) for m in messages)
    decoded = decode_stream([stream[i : i + 1] for i in range(len(stream))])
    assert all(same(d, m) for d, m in zip(decoded, messages, strict=True))
    assert len(decoded) == len(messages)


# ---------------------------------------------------------------- corruption

FOLLOWER = Ping(request_id=424242)


def _feed_corrupted(data: bytes) -> tuple[list[Message], bool]:
    """Decode ``data`` as a receiver would: (valid messages seen, fault detected)."""
    decoder = FrameDecoder()
    decoder.feed(data)
    seen: list[Message] = []
    detected = False
    while True:
        try:
            frame = decoder.next_frame()
        except FrameError:
            return seen, True  # connection-level: nothing more is read
        except MessageError:
            detected = True
            continue
        if frame is None:
            break
        try:
            seen.append(decode_message(frame))
        except MessageError:
            detected = True
    try:
        decoder.check_eof()
    except FrameError:
        detected = True
    return seen, detected


@CI
@given(message=any_message, where=st.integers(0, 10**6), delta=st.integers(1, 255))
def test_any_corrupted_byte_is_detected(message: Message, where: int, delta: int) -> None:
    frame = bytearray(encode_message(message))
    index = where % len(frame)
    frame[index] = (frame[index] + delta) % 256  # always a different value
    seen, detected = _feed_corrupted(bytes(frame))
    assert detected, f"byte {index} changed and nothing noticed"
    assert seen == [], f"byte {index} changed and a message came out: {seen}"


@CI
@given(message=any_message, where=st.integers(0, 10**6), delta=st.integers(1, 255))
def test_corruption_never_yields_anything_but_the_intact_follower(
    message: Message, where: int, delta: int
) -> None:
    """A corrupted frame followed by an intact one: the only message that can
    come out is the intact one, and it does unless the fault was connection-level."""
    frame = bytearray(encode_message(message))
    index = where % len(frame)
    frame[index] = (frame[index] + delta) % 256
    seen, detected = _feed_corrupted(bytes(frame) + encode_message(FOLLOWER))
    assert detected
    assert seen in ([], [FOLLOWER])
    header_intact = index not in range(0, 8)  # magic, flags, kind, length
    if header_intact:
        assert seen == [FOLLOWER], "a per-message fault keeps the stream in sync"


@CI
@given(message=any_message, index=st.integers(2, 3), delta=st.integers(1, 255))
def test_corrupted_flags_or_kind_is_a_per_message_fault(
    message: Message, index: int, delta: int
) -> None:
    frame = bytearray(encode_message(message))
    frame[index] = (frame[index] + delta) % 256
    seen, detected = _feed_corrupted(bytes(frame) + encode_message(FOLLOWER))
    assert detected and seen == [FOLLOWER]


@CI
@given(message=any_message, delta=st.integers(1, 2**20))
def test_grown_length_is_reported_at_eof(message: Message, delta: int) -> None:
    frame = bytearray(encode_message(message))
    length = int.from_bytes(frame[4:8], "big") + delta
    assume(length <= 1 << 20)
    frame[4:8] = length.to_bytes(4, "big")
    decoder = FrameDecoder()
    decoder.feed(bytes(frame))
    assert decoder.next_frame() is None  # waits for bytes that never come
    with pytest.raises(FrameError):
        decoder.check_eof()


# -------------------------------------------------------------------- limits


@CI
@given(
    max_frame=st.integers(HEADER_SIZE, 1 << 20),
    excess=st.integers(1, 2**32),
    kind=st.integers(0, 255),
    request_id=u64,
)
def test_oversized_frame_refused_from_the_header_alone(
    max_frame: int, excess: int, kind: int, request_id: int
) -> None:
    length = min(max_frame + excess, 2**32 - 1)
    header = struct.pack(">2sBBIQI", MAGIC, 0, kind, length, request_id, 0)
    decoder = FrameDecoder(max_frame)
    decoder.feed(header)
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert info.value.size == length and info.value.limit == max_frame
    assert decoder.buffered == 0
    decoder.feed(b"\x00" * 1000)  # the body that follows is never buffered
    assert decoder.buffered == 0
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


@CI
@given(
    max_frame=st.integers(64, 4096),
    messages=st.lists(any_message, min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10**6), max_size=20),
)
def test_buffer_never_exceeds_max_frame_plus_chunk(
    max_frame: int, messages: list[Message], cuts: list[int]
) -> None:
    stream = b"".join(encode_message(m) for m in messages)
    decoder = FrameDecoder(max_frame)
    fits = True
    for chunk in split(stream, cuts):
        decoder.feed(chunk)
        assert decoder.buffered <= max_frame + len(chunk)
        try:
            while decoder.next_frame() is not None:
                continue
        except FrameTooLarge:
            fits = False
            assert decoder.buffered == 0
            break
        assert decoder.buffered < max_frame
    assert fits == all(len(encode_message(m)) <= max_frame for m in messages)


@CI
@given(message=any_message, limit=st.integers(1024, 1536))
def test_send_above_peer_limit_raises_before_writing(message: Message, limit: int) -> None:
    size = len(encode_message(message))
    conn = ProtocolConnection(Role.SERVER)
    conn.receive_data(encode_message(Hello(versions=(1,), max_frame_size=limit)))
    assert isinstance(conn.next_event(), Hello)
    welcome = Welcome(1, "n", "s", 1 << 20, 8, 1000)
    if len(encode_message(welcome)) > limit:
        with pytest.raises(FrameTooLarge):
            conn.send(welcome)
        return
    conn.send(welcome)
    if message.kind not in (Kind.RESPONSE, Kind.ERROR, Kind.PING, Kind.EVENT):
        return
    if size > limit:
        with pytest.raises(FrameTooLarge):
            conn.send(message)
    else:
        assert conn.send(message) == encode_message(message)


# ------------------------------------------------------------------- garbage

SCHEMA_KEYS = [
    "versions", "client", "client_version", "auth", "session", "max_frame", "version",
    "node_id", "members", "server", "max_in_flight", "idle_timeout_ms", "method", "args",
    "deadline_ms", "idem_key", "result", "code", "name", "message", "retryable",
    "retry_after_ms", "details", "reason", "last_request_id", "seq", "rows", "token",
    "columns", "row_count", "digest", "pages", "topic", "data",
]  # fmt: skip

# Bodies that look like real ones: schema keys with values of any type.
schema_like_bodies = st.dictionaries(st.sampled_from(SCHEMA_KEYS), values, max_size=6).map(
    encode_body
)
framed_garbage = st.builds(
    encode_frame,
    kind=st.sampled_from(list(Kind)) | st.integers(0, 255),
    request_id=u64,
    body=st.one_of(st.binary(max_size=40), schema_like_bodies, values.map(encode_body)),
    flags=st.sampled_from([0, 0, 0, 1, 0x80]),
)
garbage_stream = st.lists(
    st.one_of(st.binary(max_size=64), framed_garbage, any_message.map(encode_message)),
    max_size=6,
).map(b"".join)


def _drain(conn: ProtocolConnection, data: bytes, cuts: list[int]) -> None:
    """Feed ``data``; anything raised must be a ProtocolError. A connection-level
    fault ends the conversation; a broken byte stream keeps raising."""
    for chunk in split(data, cuts) if data else []:
        conn.receive_data(chunk)
        for _ in range(1000):
            try:
                event = conn.next_event()
            except FrameError:
                with pytest.raises(FrameError):
                    conn.next_event()
                return
            except ProtocolViolation:
                return
            if event is None:
                break
            assert isinstance(event, (Message, BadMessage))
            if isinstance(event, BadMessage):
                assert isinstance(event.error, MessageError)
    try:
        conn.receive_eof()
    except ProtocolError:
        pass  # a documented error is an allowed outcome of garbage


@CI
@given(role=st.sampled_from(list(Role)), data=garbage_stream, cuts=st.lists(st.integers()))
def test_garbage_raises_only_protocol_errors(role: Role, data: bytes, cuts: list[int]) -> None:
    _drain(ProtocolConnection(role), data, cuts)


@CI
@given(data=garbage_stream, cuts=st.lists(st.integers()))
def test_garbage_after_hello_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    server = ProtocolConnection(Role.SERVER)
    server.receive_data(encode_message(Hello(versions=(1,))))
    assert isinstance(server.next_event(), Hello)
    server.send(Welcome(1, "n", "s", 1 << 20, 8, 1000))
    _drain(server, data, cuts)


@CI
@given(data=garbage_stream, cuts=st.lists(st.integers()))
def test_garbage_after_welcome_raises_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(Hello(versions=(1,)))
    client.receive_data(encode_message(Welcome(1, "n", "s", 1 << 20, 8, 1000)))
    assert isinstance(client.next_event(), Welcome)
    _drain(client, data, cuts)


@CI
@given(body=st.binary(max_size=64), kind=st.sampled_from(list(Kind)), request_id=u64)
def test_random_body_is_a_message_or_a_message_error(
    body: bytes, kind: Kind, request_id: int
) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(kind, request_id, body))
    frame = decoder.next_frame()
    assert frame is not None
    try:
        message = decode_message(frame)
    except MessageError as exc:
        assert exc.request_id == request_id and exc.kind == kind
    else:
        assert message.kind == kind


# ------------------------------------------------------------ hostile values
#
# What a hostile or broken peer can put in a well-formed frame: integers
# beyond 64 bits (bignums) and beyond the 4300 digits ``str()`` accepts,
# negative and out-of-range counts and ids, and a value of the wrong type in
# any field of any kind. Decoding must give a valid message or a
# MessageError, nothing else; what it gives must be within the schema's
# bounds (so it can be sent back out unchanged).

huge_integers = st.one_of(
    st.integers(2**64, 2**200),
    st.integers(-(2**200), -(2**64) - 1),
    st.sampled_from([2**64, 2**1100, -(2**1100)]),
    # Beyond str()'s 4300 digits (built by map: a strategy's repr shows its bounds).
    st.integers(1, 3).map(lambda k: 10**5000 + k),
    st.integers(1, 3).map(lambda k: -(10**5000) - k),
)
out_of_range_integers = st.one_of(
    huge_integers,
    st.integers(max_value=-1),
    st.sampled_from([-1, 0, 1, 99, 100, 255, 256, 999, 1000, 1023, 1024, U64, 2**64]),
)
wrong_values = st.one_of(
    out_of_range_integers,
    st.none(),
    st.booleans(),
    st.floats(),
    text,
    st.binary(max_size=8),
    st.lists(values, max_size=3),
    st.dictionaries(text, values, max_size=3),
    st.lists(out_of_range_integers, max_size=3),
    st.dictionaries(text, out_of_range_integers, max_size=3),
)
SERVER_KINDS = [
    Kind.WELCOME,
    Kind.RESPONSE,
    Kind.ERROR,
    Kind.PING,
    Kind.PONG,
    Kind.GOAWAY,
    Kind.STREAM_PAGE,
    Kind.STREAM_END,
    Kind.EVENT,
]
HOSTILE = settings(CI, max_examples=40)
PER_KIND_HOSTILE = settings(CI, max_examples=20)


@st.composite
def mutated_bodies(draw: st.DrawFn, kind: Kind) -> dict[str, Any]:
    """A valid body of ``kind`` with some fields replaced, removed or added."""
    body: dict[str, Any] = dict(draw(MESSAGES[kind]).body())
    extra = draw(st.lists(st.sampled_from(SCHEMA_KEYS), min_size=1, max_size=3))
    keys = sorted(set(body) | set(extra))
    for key in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        action = draw(st.sampled_from(["replace", "replace", "replace", "delete"]))
        if action == "delete":
            body.pop(key, None)
        else:
            body[key] = draw(wrong_values)
    return body


def _frame_of(kind: int, request_id: int, body: Any) -> bytes:
    return encode_frame(kind, request_id, encode_body(body))


def _check_decoded(message: Message, kind: int, request_id: int) -> None:
    """A decoded message is of its frame's kind and within every schema bound."""
    assert message.kind == kind
    assert message.request_id == request_id or kind in (Kind.HELLO, Kind.WELCOME, Kind.GOAWAY)
    for name, (low, high) in message._bounds.items():
        value = getattr(message, name)
        assert value is None or (
            isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        ), (name, value)
    # What came in can go out: the bounds are the same on both sides.
    encode_message(message)


@pytest.mark.parametrize("kind", list(Kind), ids=[k.name for k in Kind])
@PER_KIND_HOSTILE
@given(data=st.data(), request_id=u64)
def test_mutated_body_is_a_message_or_a_message_error(
    kind: Kind, data: st.DataObject, request_id: int
) -> None:
    body = data.draw(mutated_bodies(kind))
    decoder = FrameDecoder()
    decoder.feed(_frame_of(kind, request_id, body))
    frame = decoder.next_frame()
    assert frame is not None
    try:
        message = decode_message(frame)
    except MessageError as exc:
        assert exc.request_id == request_id and exc.kind == kind
        assert len(str(exc)) < 1000  # a hostile value is never printed whole
        return
    _check_decoded(message, kind, request_id)


U64_FIELDS = [
    (Kind.WELCOME, "max_frame"),
    (Kind.WELCOME, "max_in_flight"),
    (Kind.WELCOME, "idle_timeout_ms"),
    (Kind.WELCOME, "version"),
    (Kind.HELLO, "max_frame"),
    (Kind.REQUEST, "deadline_ms"),
    (Kind.ERROR, "code"),
    (Kind.ERROR, "retry_after_ms"),
    (Kind.GOAWAY, "last_request_id"),
    (Kind.STREAM_PAGE, "seq"),
    (Kind.STREAM_END, "seq"),
    (Kind.STREAM_END, "row_count"),
    (Kind.STREAM_CREDIT, "pages"),
]


@pytest.mark.parametrize(("kind", "key"), U64_FIELDS, ids=[f"{k.name}-{f}" for k, f in U64_FIELDS])
@settings(CI, max_examples=8)
@given(data=st.data(), value=st.one_of(huge_integers, st.integers(max_value=-1)))
def test_any_uint_beyond_u64_or_negative_is_a_message_error(
    kind: Kind, key: str, data: st.DataObject, value: int
) -> None:
    body = {**data.draw(MESSAGES[kind]).body(), key: value}
    decoder = FrameDecoder()
    decoder.feed(_frame_of(kind, 5, body))
    frame = decoder.next_frame()
    assert frame is not None
    with pytest.raises(MessageError, match=key):
        decode_message(frame)


hostile_frames = st.one_of(
    st.builds(
        lambda kind, rid, body: _frame_of(kind, rid, body),
        st.sampled_from(SERVER_KINDS),
        u64,
        st.sampled_from(SERVER_KINDS).flatmap(mutated_bodies),
    ),
    st.builds(
        lambda kind, rid, body: _frame_of(kind, rid, body),
        st.sampled_from(list(Kind)) | st.integers(0, 255),
        u64,
        st.dictionaries(st.sampled_from(SCHEMA_KEYS), wrong_values, max_size=5),
    ),
    any_message.map(encode_message),
)


@HOSTILE
@given(frames=st.lists(hostile_frames, min_size=1, max_size=4))
def test_open_client_fed_hostile_frames_yields_messages_or_bad_messages(
    frames: list[bytes],
) -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(Hello(versions=(1,)))
    client.receive_data(encode_message(Welcome(1, "n", "s", 1 << 20, 8, 1000)))
    assert isinstance(client.next_event(), Welcome)
    for data in frames:
        client.receive_data(data)
        event = client.next_event()  # never raises: every frame here is whole and in sync
        assert event is not None
        if isinstance(event, BadMessage):
            assert isinstance(event.error, MessageError)
        else:
            assert isinstance(event, Message)
            assert event.kind in SERVER_KINDS and event.kind is not Kind.WELCOME
            _check_decoded(event, data[3], int.from_bytes(data[8:16], "big"))
        assert client.next_event() is None
    client.receive_data(encode_message(Ping(77)))
    assert client.next_event() == Ping(77)  # still in sync, still open


@HOSTILE
@given(body=mutated_bodies(Kind.WELCOME) | mutated_bodies(Kind.ERROR), as_error=st.booleans())
def test_handshake_reply_is_a_message_a_bad_message_or_a_violation(
    body: dict[str, Any], as_error: bool
) -> None:
    client = ProtocolConnection(Role.CLIENT)
    client.send(Hello(versions=(1,)))
    client.receive_data(_frame_of(Kind.ERROR if as_error else Kind.WELCOME, 0, body))
    try:
        event = client.next_event()
    except ProtocolViolation:
        return  # e.g. a WELCOME choosing a version never offered: connection-level
    assert event is not None
    if isinstance(event, BadMessage):
        assert isinstance(event.error, MessageError)
    else:
        assert isinstance(event, (Welcome, Error))
        _check_decoded(event, event.kind, 0)


def _outcome(decode: Any, body: bytes) -> tuple[str, Any]:
    try:
        return "value", decode(body)
    except MessageError as exc:
        return "error", str(exc)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    bodies=st.lists(
        st.one_of(
            values.map(cbor2.dumps),
            st.binary(max_size=24),  # garbage: most of it undecodable
            st.tuples(values, st.binary(min_size=1, max_size=3)).map(
                lambda pair: cbor2.dumps(pair[0]) + pair[1]  # trailing bytes
            ),
            values.map(lambda value: cbor2.dumps(value)[:-1]),  # cut short
            st.just(cbor2.dumps(cbor2.CBORTag(28, [1]))),  # a shared value: refused
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_reused_body_decoder_decodes_each_body_as_a_fresh_one_would(bodies: list[bytes]) -> None:
    # The reply fast path keeps one decoder per connection: nothing a body
    # leaves behind (a value, a failure half-way) may change the next one.
    reused = BodyDecoder()
    for body in bodies:
        got = _outcome(reused.decode, body)
        expected = _outcome(decode_body, body)
        assert got[0] == expected[0], body
        if got[0] == "value":
            assert same(got[1], expected[1]), body
        else:
            assert got[1] == expected[1], body


_BIG_SIZES = st.sampled_from([4095, 4096, 4097, 65535, 65536, 65537, 140_000])
_BIG_VALUES = st.one_of(
    _BIG_SIZES.map(lambda n: {"result": b"b" * n}),
    _BIG_SIZES.map(lambda n: {"result": {"rows": [["t" * (n // 2), 1], ["u" * (n // 2), 2]]}}),
    st.just({"result": {"columns": ["id"], "rows": [[1]]}}),
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(
    bodies=st.lists(
        st.one_of(
            _BIG_VALUES.map(cbor2.dumps),
            _BIG_VALUES.map(lambda value: cbor2.dumps(value)[:-1]),  # cut short
            _BIG_VALUES.map(lambda value: cbor2.dumps(value) + b"\x00"),  # trailing byte
            _BIG_VALUES.map(lambda value: cbor2.dumps(value)[:4096]),  # cut at the read-ahead
        ),
        min_size=1,
        max_size=6,
    )
)
def test_a_reused_body_decoder_decodes_big_bodies_as_a_fresh_one_would(
    bodies: list[bytes],
) -> None:
    # Bodies around cbor2's 4096-byte read-ahead and the 64 KiB the kept buffer
    # may hold: a body that fails part-way, or is let go, must not change the next.
    reused = BodyDecoder()
    for body in bodies:
        got = _outcome(reused.decode, body)
        assert got == _outcome(decode_body, body), len(body)
        if got[0] == "value":
            assert got[1] == cbor2.loads(body)


def test_a_reused_body_decoder_keeps_no_body_alive():
    reused = BodyDecoder()
    tracemalloc.start()
    try:
        body = cbor2.dumps({"result": b"x" * 5_000_000})
        value = reused.decode(body)
        del value, body
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000  # neither the 5 MB body nor its value
