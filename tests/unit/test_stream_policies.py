"""The pure parts of streams: the resume policy, the page ledger, the page codec."""

from __future__ import annotations

import hashlib
import random

import cbor2
import pytest

from qdb_client._policies import Backoff, classify
from qdb_client._policies.resume import ResumePolicy
from qdb_client._streams.checks import PageLedger
from qdb_client.errors import (
    CircuitOpen,
    ConnectionDraining,
    ConnectionLost,
    MessageError,
    NoAvailableNode,
    NotFound,
    Overloaded,
    SqlError,
    StreamCorrupted,
)
from qdb_client.protocol import Kind, StreamEnd, StreamPage, decode_body, encode_message
from qdb_client.protocol.codec import MAX_DEPTH
from qdb_client.protocol.stream_codec import (
    STREAM_PAGE_KIND,
    decode_page_body,
    encode_row,
    encode_stream_page,
)

POLICY = ResumePolicy(
    max_attempts=3, backoff=Backoff(initial=0.1, maximum=1.0, multiplier=2.0, jitter="none")
)
RNG = random.Random(1)


def decide(error, *, attempts=0, remaining=float("inf"), sent=True):
    return POLICY.decide(
        classify(error, sent=sent),
        attempts_done=attempts,
        remaining=remaining,
        rng=RNG,
        error=error,
    )


# ------------------------------------------------------------------ resuming


def test_a_lost_connection_is_resumed_after_the_backoff():
    decisions = [decide(ConnectionLost("x"), attempts=n) for n in range(3)]
    assert [(d.retry, d.delay) for d in decisions] == [(True, 0.1), (True, 0.2), (True, 0.4)]


def test_attempts_are_limited_since_the_last_progress():
    decision = decide(ConnectionLost("x"), attempts=3)
    assert not decision.retry and "all 3 resume attempts" in decision.reason


def test_a_goaway_resumes_at_once():
    decision = decide(ConnectionDraining("d", reason="shutdown"))
    assert decision.retry and decision.delay == 0.0


def test_no_node_and_open_breakers_mean_later_not_never():
    for error in (NoAvailableNode({"a:1": "DOWN"}), CircuitOpen("open", reopens_in={})):
        decision = decide(error, sent=False)
        assert decision.retry and decision.delay == 0.1


def test_refusals_and_unknown_tokens_are_not_resumed():
    for error in (
        SqlError("bad", code=422, name="SQL_ERROR"),
        NotFound("gone", code=404, name="NOT_FOUND", details={"reason": "expired"}),
    ):
        assert not decide(error).retry


def test_a_node_asking_to_wait_is_honoured_within_the_maximum():
    busy = Overloaded("busy", code=429, name="OVERLOADED", retryable=True, retry_after_ms=700)
    assert decide(busy).delay == 0.7
    flood = Overloaded("busy", code=429, name="OVERLOADED", retryable=True, retry_after_ms=10**9)
    assert decide(flood).delay == 1.0


def test_the_deadline_stops_resuming():
    decision = decide(ConnectionLost("x"), attempts=1, remaining=0.15)
    assert not decision.retry and "deadline" in decision.reason


def test_a_corrupted_frame_is_resumed():
    assert decide(MessageError("crc")).retry


# -------------------------------------------------------------- the ledger


def page(seq, rows, token=b"t", columns=None):
    encoding = b"".join(encode_row(r) for r in rows)
    return StreamPage(7, seq, tuple(rows), token, columns=columns, rows_encoding=encoding)


def test_credit_is_granted_once_half_the_window_is_free():
    ledger = PageLedger(4)
    assert ledger.start_attempt(buffered=0) == 4
    for seq in range(3):
        ledger.accept(page(seq, [[seq]], columns=("a",) if seq == 0 else None))
    # 3 used of 4: 1 outstanding; 3 buffered leaves no room.
    assert ledger.credit_to_grant(buffered=3) == 0
    assert ledger.credit_to_grant(buffered=1) == 2  # room of 2 = half the window
    assert ledger.outstanding == 3
    assert ledger.start_attempt(buffered=4) == 1  # a resume always asks for one


def test_the_digest_covers_every_row_across_attempts():
    rows = [[1, "a"], [2, None], [3, b"\x00"]]
    ledger = PageLedger(2)
    ledger.start_attempt(0)
    ledger.accept(page(0, rows[:2], columns=("x", "y")))
    ledger.start_attempt(0)  # a resume
    ledger.accept(page(1, rows[2:]))
    digest = hashlib.sha256(b"".join(encode_row(r) for r in rows)).digest()
    ledger.finish(StreamEnd(7, 1, 3, digest))
    assert ledger.end is not None and ledger.rows_received == 3


def test_a_page_after_the_end_is_corrupt():
    ledger = PageLedger(2)
    ledger.start_attempt(0)
    ledger.accept(page(0, [], columns=("x",)))
    ledger.finish(StreamEnd(7, 0, 0, hashlib.sha256().digest()))
    with pytest.raises(StreamCorrupted, match="after STREAM_END"):
        ledger.accept(page(1, [[1]]))


def test_a_window_outside_the_protocol_range_is_refused():
    for window in (0, 1025):
        with pytest.raises(ValueError):
            PageLedger(window)


# ----------------------------------------------------------------- the codec


def test_the_spliced_page_is_the_encoded_page():
    assert STREAM_PAGE_KIND == Kind.STREAM_PAGE
    rows = [["ada", 36, 1.5], ["linus", 2**64, b"\x00\xff"], [None, -1, float("nan")]]
    message = StreamPage(
        11, 0, tuple(rows), b"tok", columns=("a", "b", "c"), types=("T", None, None)
    )
    spliced = encode_stream_page(
        11, 0, b"".join(encode_row(r) for r in rows), 3, b"tok", ("a", "b", "c"), ("T", None, None)
    )
    assert spliced == encode_message(message)


def test_the_rows_bytes_are_what_travelled():
    rows = [[cbor2.CBORTag(262, b'{"a": 1}'), cbor2.CBORTag(1008, "10:11:12")]]
    body = cbor2.dumps({"seq": 0, "rows": rows, "token": b"t"})
    value, encoding = decode_page_body(body)
    assert value["rows"][0][0] == {"a": 1}  # decoded...
    assert encoding == cbor2.dumps(rows[0])  # ...and hashed as sent


@pytest.mark.parametrize(
    "body",
    [
        b"\xa2\x63seq\x00\x63seq\x01",  # a duplicate key
        b"\xa1\x01\x02",  # an integer key
        b"\xbf\x63seq\x00\xff",  # an indefinite map
        cbor2.dumps({"seq": 0}) + b"\x00",  # trailing bytes
        b"\xa1\x63seq",  # truncated
        cbor2.dumps({"rows": [[0]]})[:-1] + bytes([0xD8, 28, 0]),  # a shared-value tag
    ],
)
def test_hostile_bodies_are_refused_as_decode_body_refuses_them(body):
    with pytest.raises(MessageError):
        decode_page_body(body, request_id=3)
    with pytest.raises(MessageError):
        decode_body(body, request_id=3)


@pytest.mark.parametrize("depth", [MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH])
def test_depth_is_limited_as_for_any_body(depth):
    value: object = 0
    for _ in range(depth):
        value = [value]
    body = cbor2.dumps({"rows": value})
    accepted = True
    try:
        decode_body(body)
    except MessageError:
        accepted = False
    if accepted:
        assert decode_page_body(body)[0] == decode_body(body)
    else:
        with pytest.raises(MessageError):
            decode_page_body(body)
