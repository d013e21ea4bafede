"""What happened to one attempt, decided once. Pure: no trio, no clock.

Every attempt of a call ends in exactly one :class:`Outcome`, chosen by
:func:`classify` from the facts of the attempt (the exception or its absence,
whether the request was written, whether our attempt timeout or the caller's
deadline fired, whether the caller cancelled). The outcome says, for every
consumer at once:

- ``breaker``: what the node's circuit breaker records (a success, a failure
  and its cause, or nothing);
- ``latency``: what the node's latency tracker records (the round trip, a
  penalty that only says "at least this slow", or nothing);
- ``retry``: whether another attempt may follow (never, always, only when the
  request is safe to repeat, or at once as a re-queue that is no retry at all),
  whether it waits out a backoff first, and that it prefers another node;
- ``maybe_applied``: whether a write may have taken effect through this attempt;
- ``probe``: whether the node's health monitor should check the node now.

The pipeline, breaker, balancer, health monitor and retry policy all read this
one value, so they cannot disagree about what a failure means; ``TABLE`` is
printed in docs/resilience.md and a test checks the two are the same.
"""

from __future__ import annotations

import enum

import attrs

from .._error_base import InvalidArgument, QdbError
from ..errors import (
    CircuitOpen,
    ClientClosed,
    ConnectError,
    ConnectionDraining,
    ConnectionLost,
    FrameTooLarge,
    HandshakeError,
    MessageError,
    NoAvailableNode,
    PoolError,
    ProtocolError,
    RequestCancelled,
    ServerError,
    ServerTimeout,
    TransactionAborted,
    TransportError,
    Unprepared,
)

__all__ = [
    "TABLE",
    "BreakerVerdict",
    "LatencyVerdict",
    "Outcome",
    "OutcomeKind",
    "RetryRule",
    "classify",
    "outcome_table_markdown",
]


class OutcomeKind(enum.Enum):
    """The kinds of attempt outcome, one row each in :data:`TABLE`."""

    SUCCESS = "success"
    REJECTED = "rejected by the node"
    NODE_UNAVAILABLE = "node unavailable"
    NODE_FAILED = "node failed"
    NODE_TIMEOUT = "node timed out"
    NODE_TIMEOUT_EXECUTED = "node timed out after executing"
    DRAINING = "draining (GOAWAY)"
    UNPREPARED = "statement not prepared there"
    WRITE_CONFLICT = "write conflict"
    LOST_BEFORE_SEND = "connection lost before the write"
    LOST_AFTER_SEND = "connection lost after the write"
    CORRUPT_REPLY = "corrupted reply"
    ATTEMPT_TIMEOUT = "attempt timeout"
    ATTEMPT_TIMEOUT_BEFORE_SEND = "attempt timeout before the write"
    DEADLINE_BEFORE_SEND = "deadline passed before the write"
    DEADLINE_AFTER_SEND = "deadline passed after the write"
    CANCELLED_BEFORE_SEND = "caller cancelled before the write"
    CANCELLED_AFTER_SEND = "caller cancelled after the write"
    SUPERSEDED_BEFORE_SEND = "another copy answered before the write"
    SUPERSEDED_AFTER_SEND = "another copy answered first"
    CONNECT_FAILED = "connect failed"
    HANDSHAKE_REFUSED = "handshake refused"
    POOL_BUSY = "pool refused"
    CIRCUIT_OPEN = "circuit open"
    NO_NODE = "no node available"
    CLOSED_BEFORE_SEND = "client closed before the write"
    CLOSED_AFTER_SEND = "client closed after the write"
    BAD_REQUEST = "request can't be sent"
    UNEXPECTED = "unexpected error"


class BreakerVerdict(enum.Enum):
    """What the node's circuit breaker records."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORE = "nothing"
    #: A failure, unless the call's reply from another node took as long:
    #: then the request is slow everywhere and the node is not to blame.
    #: (Judged, with the latency penalty, when the call ends.)
    JUDGED = "failure unless as slow elsewhere"
    #: A failure if the node is slower than it usually is: the attempt waited
    #: longer than the node's attempt timeout, or a request abandoned on it
    #: earlier has gone unconfirmed that long; else nothing (the caller's
    #: deadline was just short).
    IF_SLOW = "failure if slower than usual"


class LatencyVerdict(enum.Enum):
    """What the node's latency tracker records."""

    SAMPLE = "round trip"
    PENALTY = "penalty"
    NONE = "nothing"


class RetryRule(enum.Enum):
    """Whether another attempt may follow this one."""

    NEVER = "never"
    ALWAYS = "yes"
    IF_SAFE = "if safe to repeat"
    REQUEUE = "re-queued at once"


@attrs.frozen
class Outcome:
    """The one verdict on an attempt (see the module docstring)."""

    kind: OutcomeKind
    breaker: BreakerVerdict
    #: Which kind of evidence a breaker failure is: ``connection`` (the node
    #: could not be reached or the link broke), ``slow`` (silence), or
    #: ``overload`` (the node said it can't serve). Empty for no failure.
    cause: str
    latency: LatencyVerdict
    retry: RetryRule
    backoff: bool
    maybe_applied: bool
    probe: bool
    #: One line for the docs table: when this outcome happens.
    when: str

    @property
    def needs_safety(self) -> bool:
        """Whether repeating it requires an idempotent request."""
        return self.retry is RetryRule.IF_SAFE


def _row(
    kind: OutcomeKind,
    when: str,
    *,
    breaker: BreakerVerdict = BreakerVerdict.IGNORE,
    cause: str = "",
    latency: LatencyVerdict = LatencyVerdict.NONE,
    retry: RetryRule = RetryRule.NEVER,
    backoff: bool = False,
    maybe_applied: bool = False,
    probe: bool = False,
) -> Outcome:
    return Outcome(
        kind=kind,
        breaker=breaker,
        cause=cause,
        latency=latency,
        retry=retry,
        backoff=backoff,
        maybe_applied=maybe_applied,
        probe=probe,
        when=when,
    )


_B, _L, _R, _K = BreakerVerdict, LatencyVerdict, RetryRule, OutcomeKind

#: One row per kind of outcome, in the order docs/resilience.md prints them.
TABLE: tuple[Outcome, ...] = (
    _row(_K.SUCCESS, "the node replied", breaker=_B.SUCCESS, latency=_L.SAMPLE),
    _row(
        _K.REJECTED,
        "the node refused the request itself (SQL error, constraint, conflict, read-only...)",
        breaker=_B.SUCCESS,
        latency=_L.SAMPLE,
    ),
    _row(
        _K.NODE_UNAVAILABLE,
        "the node answered that it did not process the request (overloaded, unavailable,"
        " at capacity, shutting down, or a retryable error with details.executed = false)",
        breaker=_B.FAILURE,
        cause="overload",
        retry=_R.ALWAYS,
        backoff=True,
    ),
    _row(
        _K.NODE_FAILED,
        "the node answered a retryable error that does not say nothing ran (internal error)",
        breaker=_B.FAILURE,
        cause="overload",
        retry=_R.IF_SAFE,
        backoff=True,
        maybe_applied=True,
    ),
    _row(
        _K.NODE_TIMEOUT,
        "the node gave up at its deadline, nothing executed",
        breaker=_B.FAILURE,
        cause="slow",
        latency=_L.PENALTY,
        retry=_R.ALWAYS,
        backoff=True,
    ),
    _row(
        _K.NODE_TIMEOUT_EXECUTED,
        "the node gave up at its deadline and says it executed",
        breaker=_B.FAILURE,
        cause="slow",
        latency=_L.PENALTY,
        retry=_R.IF_SAFE,
        backoff=True,
        maybe_applied=True,
    ),
    _row(
        _K.DRAINING,
        "the node sent GOAWAY before processing the request",
        retry=_R.REQUEUE,
    ),
    _row(
        _K.UNPREPARED,
        "the node does not know the prepared statement id (sent again with its text)",
        breaker=_B.SUCCESS,
        retry=_R.REQUEUE,
    ),
    _row(
        _K.WRITE_CONFLICT,
        "another transaction held the write lock; the node rolled this one back (nothing"
        " applied; says nothing about the node's health)",
        breaker=_B.SUCCESS,
        latency=_L.SAMPLE,
        retry=_R.ALWAYS,
        backoff=True,
    ),
    _row(
        _K.LOST_BEFORE_SEND,
        "the connection died before the request was written",
        breaker=_B.FAILURE,
        cause="connection",
        retry=_R.ALWAYS,
        backoff=True,
    ),
    _row(
        _K.LOST_AFTER_SEND,
        "the connection died after the request was written",
        breaker=_B.FAILURE,
        cause="connection",
        retry=_R.IF_SAFE,
        backoff=True,
        maybe_applied=True,
    ),
    _row(
        _K.CORRUPT_REPLY,
        "the reply arrived but could not be decoded",
        breaker=_B.FAILURE,
        cause="connection",
        retry=_R.IF_SAFE,
        backoff=True,
        maybe_applied=True,
    ),
    _row(
        _K.ATTEMPT_TIMEOUT,
        "no reply within the attempt timeout (the node is silent)",
        breaker=_B.JUDGED,
        cause="slow",
        latency=_L.PENALTY,
        retry=_R.IF_SAFE,
        maybe_applied=True,
        probe=True,
    ),
    _row(
        _K.ATTEMPT_TIMEOUT_BEFORE_SEND,
        "the attempt timeout passed while the frame still waited to be written (the node"
        " stopped reading)",
        breaker=_B.FAILURE,
        cause="slow",
        latency=_L.PENALTY,
        retry=_R.ALWAYS,
        probe=True,
    ),
    _row(_K.DEADLINE_BEFORE_SEND, "the call's deadline passed before the write"),
    _row(
        _K.DEADLINE_AFTER_SEND,
        "the call's deadline passed while waiting for the reply",
        breaker=_B.IF_SLOW,
        cause="slow",
        latency=_L.PENALTY,
        maybe_applied=True,
    ),
    _row(_K.CANCELLED_BEFORE_SEND, "the caller cancelled before the write"),
    _row(_K.CANCELLED_AFTER_SEND, "the caller cancelled after the write", maybe_applied=True),
    _row(
        _K.SUPERSEDED_BEFORE_SEND,
        "another copy of the read (a hedge, or the copy it hedged) answered while this one"
        " still waited to be written",
    ),
    _row(
        _K.SUPERSEDED_AFTER_SEND,
        "another copy of the read (a hedge, or the copy it hedged) answered first",
        breaker=_B.JUDGED,
        cause="slow",
        latency=_L.PENALTY,
    ),
    _row(
        _K.CONNECT_FAILED,
        "no connection could be opened (refused, unreachable, connect timeout)",
        breaker=_B.FAILURE,
        cause="connection",
        retry=_R.ALWAYS,
        backoff=True,
    ),
    _row(
        _K.HANDSHAKE_REFUSED,
        "the node refused the handshake (version, credentials) or its TLS certificate was refused",
    ),
    _row(
        _K.POOL_BUSY,
        "our own pool had no room in time (says nothing about the node)",
        retry=_R.ALWAYS,
        backoff=True,
    ),
    _row(_K.CIRCUIT_OPEN, "every usable node's breaker refused the attempt"),
    _row(_K.NO_NODE, "no node became usable within the selection timeout"),
    _row(_K.CLOSED_BEFORE_SEND, "the client was closed before the write"),
    _row(_K.CLOSED_AFTER_SEND, "the client was closed after the write", maybe_applied=True),
    _row(_K.BAD_REQUEST, "the request can't be sent (not encodable, above the node's frame limit)"),
    _row(_K.UNEXPECTED, "any other error (reported, never retried)"),
)

_BY_KIND: dict[OutcomeKind, Outcome] = {row.kind: row for row in TABLE}
#: Retryable error names that mean the node did not process the request
#: (docs/protocol.md section 9); any other retryable error may have run.
_NOT_PROCESSED = frozenset({"OVERLOADED", "UNAVAILABLE", "SHUTTING_DOWN", "CAPACITY_EXCEEDED"})
#: The outcome of a reply, looked up once (the hot path).
SUCCESS = _BY_KIND[OutcomeKind.SUCCESS]


def classify(
    error: BaseException | None,
    *,
    sent: bool,
    attempt_timed_out: bool = False,
    deadline_passed: bool = False,
    cancelled: bool = False,
    superseded: bool = False,
) -> Outcome:
    """The outcome of one attempt.

    ``error`` is what the attempt raised (None: it got its reply); ``sent``
    whether the request's bytes were written. ``attempt_timed_out``,
    ``deadline_passed`` and ``cancelled`` say that the attempt was interrupted
    by our attempt timeout, by the call's deadline, or by the caller (then
    ``error`` only words the error; the interruption is what happened).
    ``superseded``: the attempt was stopped because another copy of the read
    (hedged reads) answered first.
    """
    if superseded:
        kind = _K.SUPERSEDED_AFTER_SEND if sent else _K.SUPERSEDED_BEFORE_SEND
    elif cancelled:
        kind = _K.CANCELLED_AFTER_SEND if sent else _K.CANCELLED_BEFORE_SEND
    elif deadline_passed:
        kind = _K.DEADLINE_AFTER_SEND if sent else _K.DEADLINE_BEFORE_SEND
    elif attempt_timed_out:
        kind = _K.ATTEMPT_TIMEOUT if sent else _K.ATTEMPT_TIMEOUT_BEFORE_SEND
    elif error is None:
        return SUCCESS
    else:
        kind = _kind_of(error, sent)
    return _BY_KIND[kind]


def _kind_of(error: BaseException, sent: bool) -> OutcomeKind:
    if isinstance(error, ServerError):
        if not sent:
            # Raised while connecting (a handshake ERROR such as UNAUTHENTICATED
            # or CAPACITY_EXCEEDED): the request never reached a node.
            return _K.CONNECT_FAILED if error.retryable else _K.HANDSHAKE_REFUSED
        if isinstance(error, Unprepared):
            return _K.UNPREPARED
        if isinstance(error, TransactionAborted):
            # Rolled back by the node whatever ``details`` say: nothing applied.
            return _K.WRITE_CONFLICT if error.retryable else _K.REJECTED
        if isinstance(error, ServerTimeout):
            return _K.NODE_TIMEOUT_EXECUTED if error.executed else _K.NODE_TIMEOUT
        if error.executed is False and (error.retryable or isinstance(error, RequestCancelled)):
            # The node says nothing ran (a CANCELLED nobody asked for included:
            # the node stopped the request by itself).
            return _K.NODE_UNAVAILABLE
        if not error.retryable:
            return _K.REJECTED
        if error.name in _NOT_PROCESSED:
            return _K.NODE_UNAVAILABLE
        return _K.NODE_FAILED
    if isinstance(error, ConnectionDraining):
        return _K.DRAINING
    if isinstance(error, HandshakeError):
        return _K.HANDSHAKE_REFUSED
    if isinstance(error, ConnectError):
        # A refused TLS certificate is a configuration problem: no retry.
        return _K.CONNECT_FAILED if error.retryable else _K.HANDSHAKE_REFUSED
    if isinstance(error, (ConnectionLost, TransportError)):
        return _K.LOST_AFTER_SEND if sent or error.request_sent else _K.LOST_BEFORE_SEND
    if isinstance(error, FrameTooLarge):
        # Raised by our encoder against the node's limit: nothing was written.
        return _K.BAD_REQUEST
    if isinstance(error, (MessageError, ProtocolError)):
        return _K.CORRUPT_REPLY if sent else _K.BAD_REQUEST
    if isinstance(error, PoolError):
        return _K.POOL_BUSY
    if isinstance(error, CircuitOpen):
        return _K.CIRCUIT_OPEN
    if isinstance(error, NoAvailableNode):
        return _K.NO_NODE
    if isinstance(error, ClientClosed):
        return _K.CLOSED_AFTER_SEND if sent else _K.CLOSED_BEFORE_SEND
    if isinstance(error, InvalidArgument):
        return _K.BAD_REQUEST
    if isinstance(error, QdbError):
        return _K.UNEXPECTED
    return _K.UNEXPECTED


def outcome_table_markdown() -> str:
    """:data:`TABLE` as the markdown table docs/resilience.md prints."""
    lines = [
        "| outcome | when | breaker | latency | retry | backoff | may have applied a write"
        " | probe the node |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in TABLE:
        breaker = row.breaker.value + (f" ({row.cause})" if row.cause else "")
        lines.append(
            f"| {row.kind.value} | {row.when} | {breaker} | {row.latency.value}"
            f" | {row.retry.value} | {'yes' if row.backoff else 'no'}"
            f" | {'yes' if row.maybe_applied else 'no'} | {'yes' if row.probe else 'no'} |"
        )
    return "\n".join(lines)
