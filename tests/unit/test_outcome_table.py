"""The outcome classifier: one row per kind of attempt outcome, and the docs agree.

Each row gives the facts of an attempt (what it raised, whether it was sent,
what interrupted it) and every verdict the one outcome carries to the
breaker, the latency tracker, the retry policy and the health monitor.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qdb_client._policies import (
    TABLE,
    BreakerVerdict,
    LatencyVerdict,
    OutcomeKind,
    RetryRule,
    classify,
    outcome_table_markdown,
)
from qdb_client.errors import (
    CircuitOpen,
    ClientClosed,
    ConnectError,
    ConnectionDraining,
    ConnectionLost,
    ConnectTimeout,
    FrameTooLarge,
    HandshakeError,
    MessageError,
    NoAvailableNode,
    PoolQueueFull,
    PoolTimeout,
    QdbError,
    ValueNotEncodable,
    VersionMismatch,
    server_error_from_wire,
)
from qdb_client.protocol import ErrorCode

S, F, IGN = BreakerVerdict.SUCCESS, BreakerVerdict.FAILURE, BreakerVerdict.IGNORE
JUDGED, IF_SLOW = BreakerVerdict.JUDGED, BreakerVerdict.IF_SLOW
SAMPLE, PENALTY, NONE = LatencyVerdict.SAMPLE, LatencyVerdict.PENALTY, LatencyVerdict.NONE
NEVER, ALWAYS, IF_SAFE, REQUEUE = (
    RetryRule.NEVER,
    RetryRule.ALWAYS,
    RetryRule.IF_SAFE,
    RetryRule.REQUEUE,
)


def wire(code: ErrorCode, **details):
    return server_error_from_wire(
        code=code.code, name=code.value, message="x", retryable=code.retryable, details=details
    )


K = OutcomeKind
# (facts, kind, breaker, cause, latency, retry, backoff, maybe_applied, probe)
ROWS = [
    (dict(error=None, sent=True), K.SUCCESS, S, "", SAMPLE, NEVER, False, False, False),
    (
        dict(error=wire(ErrorCode.SQL_ERROR), sent=True),
        K.REJECTED,
        S,
        "",
        SAMPLE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.READ_ONLY), sent=True),
        K.REJECTED,
        S,
        "",
        SAMPLE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.OVERLOADED), sent=True),
        K.NODE_UNAVAILABLE,
        F,
        "overload",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.CANCELLED, executed=False), sent=True),
        K.NODE_UNAVAILABLE,
        F,
        "overload",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.INTERNAL), sent=True),
        K.NODE_FAILED,
        F,
        "overload",
        NONE,
        IF_SAFE,
        True,
        True,
        False,
    ),
    (
        dict(error=wire(ErrorCode.INTERNAL, executed=False), sent=True),
        K.NODE_UNAVAILABLE,
        F,
        "overload",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.CAPACITY_EXCEEDED), sent=True),
        K.NODE_UNAVAILABLE,
        F,
        "overload",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.TIMEOUT, executed=False), sent=True),
        K.NODE_TIMEOUT,
        F,
        "slow",
        PENALTY,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.TIMEOUT, executed=True), sent=True),
        K.NODE_TIMEOUT_EXECUTED,
        F,
        "slow",
        PENALTY,
        IF_SAFE,
        True,
        True,
        False,
    ),
    (
        dict(error=ConnectionDraining("goaway", reason="shutdown"), sent=True),
        K.DRAINING,
        IGN,
        "",
        NONE,
        REQUEUE,
        False,
        False,
        False,
    ),
    (
        # Rolled back by the node, whatever its details say: nothing applied,
        # nothing wrong with the node.
        dict(error=wire(ErrorCode.WRITE_CONFLICT), sent=True),
        K.WRITE_CONFLICT,
        S,
        "",
        SAMPLE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.TX_ABORTED, reason="idle timeout"), sent=True),
        K.REJECTED,
        S,
        "",
        SAMPLE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.UNPREPARED), sent=True),
        K.UNPREPARED,
        S,
        "",
        NONE,
        REQUEUE,
        False,
        False,
        False,
    ),
    (
        dict(error=ConnectionLost("reset", request_sent=False), sent=False),
        K.LOST_BEFORE_SEND,
        F,
        "connection",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=ConnectionLost("reset", request_sent=True), sent=True),
        K.LOST_AFTER_SEND,
        F,
        "connection",
        NONE,
        IF_SAFE,
        True,
        True,
        False,
    ),
    (
        dict(error=MessageError("bad crc", request_id=3), sent=True),
        K.CORRUPT_REPLY,
        F,
        "connection",
        NONE,
        IF_SAFE,
        True,
        True,
        False,
    ),
    (
        dict(error=None, sent=True, attempt_timed_out=True),
        K.ATTEMPT_TIMEOUT,
        JUDGED,
        "slow",
        PENALTY,
        IF_SAFE,
        False,
        True,
        True,
    ),
    (
        dict(error=None, sent=False, deadline_passed=True),
        K.DEADLINE_BEFORE_SEND,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=None, sent=False, attempt_timed_out=True),
        K.ATTEMPT_TIMEOUT_BEFORE_SEND,
        F,
        "slow",
        PENALTY,
        ALWAYS,
        False,
        False,
        True,
    ),
    (
        dict(error=None, sent=True, deadline_passed=True),
        K.DEADLINE_AFTER_SEND,
        IF_SLOW,
        "slow",
        PENALTY,
        NEVER,
        False,
        True,
        False,
    ),
    (
        dict(error=None, sent=False, cancelled=True),
        K.CANCELLED_BEFORE_SEND,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=None, sent=True, cancelled=True),
        K.CANCELLED_AFTER_SEND,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        True,
        False,
    ),
    (
        dict(error=None, sent=False, superseded=True),
        K.SUPERSEDED_BEFORE_SEND,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=None, sent=True, superseded=True),
        K.SUPERSEDED_AFTER_SEND,
        JUDGED,
        "slow",
        PENALTY,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=ConnectError("refused"), sent=False),
        K.CONNECT_FAILED,
        F,
        "connection",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=ConnectTimeout("slow connect"), sent=False),
        K.CONNECT_FAILED,
        F,
        "connection",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.CAPACITY_EXCEEDED), sent=False),
        K.CONNECT_FAILED,
        F,
        "connection",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=VersionMismatch("v", supported_versions=[2]), sent=False),
        K.HANDSHAKE_REFUSED,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=HandshakeError("bad welcome"), sent=False),
        K.HANDSHAKE_REFUSED,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=wire(ErrorCode.UNAUTHENTICATED), sent=False),
        K.HANDSHAKE_REFUSED,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=PoolTimeout("t", node="a", in_use="u"), sent=False),
        K.POOL_BUSY,
        IGN,
        "",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=PoolQueueFull("q", node="a", in_use="u"), sent=False),
        K.POOL_BUSY,
        IGN,
        "",
        NONE,
        ALWAYS,
        True,
        False,
        False,
    ),
    (
        dict(error=CircuitOpen("open", reopens_in={}), sent=False),
        K.CIRCUIT_OPEN,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=NoAvailableNode({"a": "DOWN"}), sent=False),
        K.NO_NODE,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=ClientClosed("closed"), sent=False),
        K.CLOSED_BEFORE_SEND,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=ClientClosed("closed"), sent=True),
        K.CLOSED_AFTER_SEND,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        True,
        False,
    ),
    (
        dict(error=ValueNotEncodable("no CBOR form"), sent=False),
        K.BAD_REQUEST,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=FrameTooLarge(2_000_000, 1_048_576), sent=False),
        K.BAD_REQUEST,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
    (
        dict(error=QdbError("odd"), sent=True),
        K.UNEXPECTED,
        IGN,
        "",
        NONE,
        NEVER,
        False,
        False,
        False,
    ),
]


@pytest.mark.parametrize(
    ("facts", "kind", "breaker", "cause", "latency", "retry", "backoff", "applied", "probe"),
    ROWS,
    ids=[f"{row[1].name}-{i}" for i, row in enumerate(ROWS)],
)
def test_one_outcome_per_kind_of_attempt(
    facts, kind, breaker, cause, latency, retry, backoff, applied, probe
):
    outcome = classify(**facts)
    assert outcome.kind is kind
    assert (outcome.breaker, outcome.cause) == (breaker, cause)
    assert outcome.latency is latency
    assert (outcome.retry, outcome.backoff) == (retry, backoff)
    assert outcome.maybe_applied is applied
    assert outcome.probe is probe


def test_every_kind_has_exactly_one_row_and_a_test_row():
    assert [row.kind for row in TABLE] == list(OutcomeKind)
    assert {row[1] for row in ROWS} == set(OutcomeKind)


def test_what_interrupted_the_attempt_wins_over_its_error():
    """A caller's cancellation or a deadline is what happened, whatever the error."""
    lost = ConnectionLost("reset", request_sent=True)
    assert classify(lost, sent=True, cancelled=True).kind is K.CANCELLED_AFTER_SEND
    assert classify(lost, sent=True, deadline_passed=True).kind is K.DEADLINE_AFTER_SEND
    # An attempt timeout before the write: the frame waited behind a node that
    # stopped reading; nothing was sent, so any request may go elsewhere.
    outcome = classify(None, sent=False, attempt_timed_out=True)
    assert outcome.kind is K.ATTEMPT_TIMEOUT_BEFORE_SEND and not outcome.maybe_applied


def test_docs_print_the_same_table():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "resilience.md").read_text("utf-8")
    assert outcome_table_markdown() in doc
