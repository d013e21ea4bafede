"""The qdb_client error tree.

Every error a user of the driver can see is a subclass of :class:`QdbError`.
Errors from trio, the operating system or cbor2 are translated at the layer
that meets them and chained with ``raise ... from``. The protocol's own
errors and the node's structured errors are defined beside the protocol
(:mod:`qdb_client.protocol.errors`, :mod:`qdb_client.protocol.server_errors`)
and re-exported here; this module holds no wire mapping.

::

    QdbError
    ├── ConfigError                  a configuration value is invalid
    ├── ProtocolError                bytes on the wire break protocol v1
    │   ├── FrameError               connection-level: the stream can't be resynchronised
    │   │   └── FrameTooLarge
    │   ├── ProtocolViolation        connection-level: a message out of order or direction
    │   └── MessageError             per-message: the frame is intact, its content is not
    ├── InvalidArgument              a method was called with an argument of the wrong shape
    │   └── ValueNotEncodable        a parameter can't be sent (no CBOR form)
    ├── TransportError               the connection to a node failed
    │   ├── ConnectError             could not open a connection
    │   │   ├── ConnectTimeout
    │   │   └── TlsError             the TLS handshake failed (certificate, host name, plain node)
    │   ├── HandshakeError           the node refused the handshake
    │   │   └── VersionMismatch
    │   ├── ConnectionLost           an open connection died; in-flight outcomes unknown
    │   └── ConnectionDraining       the node sent GOAWAY; the request was never processed
    ├── NoAvailableNode              no configured node could be reached
    ├── PoolError                    a node's connection pool could not serve in time
    │   ├── PoolTimeout              waited pool_acquire_timeout for a connection
    │   └── PoolQueueFull            too many callers already waiting
    ├── RequestTimeout               the client-side deadline passed
    ├── RetryExhausted               retries stopped; carries every attempt and the last error
    ├── OutcomeUnknown               a write without idempotency key may or may not have run
    ├── CircuitOpen                  every usable node's circuit breaker is open
    ├── BulkheadFull                 the client's concurrent-request cap is reached
    ├── UnexpectedRowCount           QueryResult.one() found no row or several
    ├── StreamError                  a result stream or subscription stopped (what was delivered)
    │   ├── StreamCorrupted          pages out of order, wrong rows, digest or row count mismatch
    │   ├── StreamResumeFailed       a broken stream could not be continued on any node
    │   └── SubscriptionLost         a subscription could not be resumed
    │       └── SubscriptionGap      the change log no longer holds the next event (trimmed)
    ├── ServerError                  the node answered with a structured error
    │   ├── Unauthenticated
    │   │   └── AuthenticationFailed credentials or session token refused: final
    │   ├── ParseError, InvalidRequest, MethodNotFound,
    │   │   PermissionDenied, ReadOnlyViolation, NotFound, Conflict,
    │   │   FrameRejected, SqlError, ConstraintViolation, ServerTimeout,
    │   │   RequestCancelled, Overloaded, CapacityExceeded, Unavailable,
    │   │   ShuttingDown, InternalServerError, Unprepared
    │   └── TransactionAborted       the transaction was rolled back (nothing applied)
    │       └── WriteConflict        another transaction held the write lock
    └── ClientClosed                 the client was used after it was closed

``retryable`` tells whether the same request may succeed if tried again
(possibly on another node). Whether a failed write may have been applied is
a separate fact: every error raised by a call carries ``request_sent``,
``maybe_applied`` and ``idempotency_key`` (see :class:`QdbError`), and
``attempts``, one :class:`Attempt` per try (node, timing, outcome, and why
it was or wasn't retried).
"""

from __future__ import annotations

from typing import Any

from ._error_base import Attempt, InvalidArgument, QdbError
from .protocol.errors import (
    FrameError,
    FrameTooLarge,
    MessageError,
    ProtocolError,
    ProtocolViolation,
    ValueNotEncodable,
)
from .protocol.server_errors import (
    AuthenticationFailed,
    CapacityExceeded,
    Conflict,
    ConstraintViolation,
    FrameRejected,
    InternalServerError,
    InvalidRequest,
    MethodNotFound,
    NotFound,
    Overloaded,
    ParseError,
    PermissionDenied,
    ReadOnlyViolation,
    RequestCancelled,
    ServerError,
    ServerTimeout,
    ShuttingDown,
    SqlError,
    TransactionAborted,
    Unauthenticated,
    Unavailable,
    Unprepared,
    WriteConflict,
    server_error_from_wire,
)

__all__ = [
    "Attempt",
    "AuthenticationFailed",
    "BulkheadFull",
    "CapacityExceeded",
    "CircuitOpen",
    "ClientClosed",
    "ConfigError",
    "Conflict",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionDraining",
    "ConnectionLost",
    "ConstraintViolation",
    "FrameError",
    "FrameRejected",
    "FrameTooLarge",
    "HandshakeError",
    "InternalServerError",
    "InvalidArgument",
    "InvalidRequest",
    "MessageError",
    "MethodNotFound",
    "NoAvailableNode",
    "NotFound",
    "OutcomeUnknown",
    "Overloaded",
    "ParseError",
    "PermissionDenied",
    "PoolError",
    "PoolQueueFull",
    "PoolTimeout",
    "ProtocolError",
    "ProtocolViolation",
    "QdbError",
    "ReadOnlyViolation",
    "RequestCancelled",
    "RequestTimeout",
    "RetryExhausted",
    "ServerError",
    "ServerTimeout",
    "ShuttingDown",
    "SqlError",
    "StreamCorrupted",
    "StreamError",
    "StreamResumeFailed",
    "SubscriptionGap",
    "SubscriptionLost",
    "TlsError",
    "TransactionAborted",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedRowCount",
    "Unprepared",
    "ValueNotEncodable",
    "VersionMismatch",
    "WriteConflict",
    "server_error_from_wire",
]


class ConfigError(QdbError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


# -------------------------------------------------------------------- transport


class TransportError(QdbError):
    """The connection to a node failed.

    ``node`` is the ``host:port`` address involved, when known.
    ``request_sent`` tells whether the request's bytes had been written when
    it failed: False means the node never saw it and any request may be
    retried safely. ``failure_id`` names the one event behind the error (a
    connection's death, a failed connect): every request that one event
    failed carries the same id, so it counts once against the node.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        request_sent: bool = False,
        failure_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.node = node
        self.request_sent = request_sent
        self.failure_id = failure_id


class ConnectError(TransportError):
    """A connection to a node could not be opened (refused, unreachable)."""


class ConnectTimeout(ConnectError):
    """Opening a connection (TCP connect plus handshake) took longer than allowed."""


class TlsError(ConnectError):
    """The TLS handshake with a node failed; nothing was sent to it (no HELLO,
    no credentials).

    ``verification_failed`` is True when the node's certificate was refused:
    an unknown or wrong certificate authority, an expired certificate, or one
    that does not name the host connected to. That, like a node that does not
    speak TLS at all (or one that requires it, spoken to in plain text:
    ``tls_required``), is a configuration problem: not ``retryable``. A TLS
    handshake cut short by the network is retryable like any ConnectError.
    """

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        verification_failed: bool = False,
        retryable: bool = False,
        tls_required: bool = False,
    ) -> None:
        super().__init__(message, node=node)
        self.verification_failed = verification_failed
        self.tls_required = tls_required
        self.retryable = retryable and not verification_failed


class HandshakeError(TransportError):
    """The node refused the handshake, or answered it with something invalid."""

    retryable = False


class VersionMismatch(HandshakeError):
    """Client and node share no protocol version.

    ``supported_versions`` lists what the node speaks.
    """

    def __init__(
        self, message: str, *, supported_versions: list[int], node: str | None = None
    ) -> None:
        super().__init__(message, node=node)
        self.supported_versions = list(supported_versions)


class ConnectionLost(TransportError):
    """An open connection died (closed, reset, corrupted or poisoned).

    Requests that were in flight on it have an unknown outcome:
    ``request_sent`` is True for them.
    """


class ConnectionDraining(TransportError):
    """The node sent GOAWAY; this request was not processed and may be retried.

    ``reason`` is the node's stated reason (``"shutdown"``, ``"idle_timeout"``...).
    """

    def __init__(self, message: str, *, reason: str, node: str | None = None) -> None:
        super().__init__(message, node=node, request_sent=False)
        self.reason = reason


class NoAvailableNode(QdbError):
    """No node could take the request.

    ``reasons`` maps each node address to why it was not usable; ``errors``
    holds the exception behind each reason.
    """

    retryable = True

    def __init__(
        self, reasons: dict[str, str], errors: dict[str, BaseException] | None = None
    ) -> None:
        listing = "; ".join(f"{node}: {why}" for node, why in reasons.items()) or "no nodes"
        super().__init__(f"no available node ({listing})")
        self.reasons = dict(reasons)
        #: The exception behind each reason, where there was one.
        self.errors = dict(errors or {})


class PoolError(QdbError):
    """A node's connection pool could not provide a connection.

    ``node`` is the address; ``in_use`` describes the pool at that moment.
    """

    retryable = True

    def __init__(self, message: str, *, node: str, in_use: str) -> None:
        super().__init__(f"{message} ({in_use})")
        self.node = node
        self.in_use = in_use


class PoolTimeout(PoolError):
    """No connection of a node's pool had room within ``pool_acquire_timeout``."""


class PoolQueueFull(PoolError):
    """The bounded queue of callers waiting for a node's pool is full."""


class RequestTimeout(QdbError):
    """The client-side deadline for a request passed before its reply arrived.

    ``request_sent`` tells whether the request may have reached the node.
    """

    retryable = True

    def __init__(self, message: str, *, timeout: float, request_sent: bool = True) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.request_sent = request_sent


class RetryExhausted(QdbError):
    """A call failed with retryable errors and retrying stopped.

    Stopped because ``max_retries`` were used, the deadline couldn't fit
    another attempt, or the retry budget was spent. ``last_error`` is the
    final attempt's error (also the ``__cause__``); ``attempts`` lists them all.
    """

    def __init__(
        self, message: str, *, last_error: BaseException, attempts: tuple[Attempt, ...]
    ) -> None:
        lines = "\n  ".join(str(a) for a in attempts)
        super().__init__(f"{message} after {len(attempts)} attempt(s):\n  {lines}")
        self.last_error = last_error
        self.attempts = attempts


class OutcomeUnknown(QdbError):
    """A write reached a node but its result never came back.

    Without an idempotency key the driver can't repeat it safely nor know
    whether it was applied. Check the data, or send writes with keys (the
    default) so they can be retried exactly once. ``__cause__`` is the
    underlying ConnectionLost or RequestTimeout.
    """


class CircuitOpen(QdbError):
    """The circuit breakers of all usable nodes are open; failing fast, nothing sent.

    Raised as such only when no attempt of the call reached a node; when an
    earlier attempt did, the call ends in :class:`RetryExhausted` (whose
    ``last_error`` is this) so that ``request_sent``/``maybe_applied`` stay true.

    ``reopens_in`` maps each node to seconds until its breaker lets a probe
    through.
    """

    retryable = True

    def __init__(self, message: str, *, reopens_in: dict[str, float]) -> None:
        super().__init__(message)
        self.reopens_in = dict(reopens_in)


class BulkheadFull(QdbError):
    """The client already runs ``max_concurrent_requests`` calls; this one was refused."""

    retryable = True


class UnexpectedRowCount(QdbError, LookupError):
    """A result did not have the number of rows asked for (``QueryResult.one()``).

    ``count`` is how many it had.
    """

    def __init__(self, message: str, *, count: int) -> None:
        super().__init__(message)
        self.count = count


class ClientClosed(QdbError):
    """The client (or connection) was used after it was closed."""


# ---------------------------------------------------------- streams, subscriptions


class StreamError(QdbError):
    """A result stream (``client.stream``) or a subscription (``client.subscribe``)
    stopped before its end.

    Carries what had been delivered: ``rows_delivered`` and ``pages_delivered``
    (a stream), ``last_seq`` (the last page received, None before the first),
    ``last_event_id`` (a subscription: the last event delivered, None before
    the first) and ``reason``.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        rows_delivered: int = 0,
        pages_delivered: int = 0,
        last_seq: int | None = None,
        last_event_id: int | None = None,
        resume_attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.rows_delivered = rows_delivered
        self.pages_delivered = pages_delivered
        self.last_seq = last_seq
        self.last_event_id = last_event_id
        #: Resume attempts made since the last page (or event) arrived.
        self.resume_attempts = resume_attempts


class StreamCorrupted(StreamError):
    """The node sent a stream that contradicts itself: a page out of sequence, a
    row of the wrong width, more pages than the credit granted, a malformed
    page, or a STREAM_END whose ``row_count`` or SHA-256 digest does not match
    the rows received (docs/protocol.md section 12.4).

    Never retried: rows this stream delivered must not be trusted. The driver
    cancels the stream on the node.
    """


class StreamResumeFailed(StreamError):
    """A broken stream could not be continued: the node no longer has it (its
    resume token is unknown or expired: ``reason`` says which), every resume
    attempt failed, or the stream's deadline passed.

    The last failure is the ``__cause__``. Running the stream again from the
    start may succeed (``retryable``).
    """

    retryable = True


class SubscriptionLost(StreamError):
    """A subscription could not be resumed after a lost connection or node
    (every attempt failed, or the deadline passed).

    ``last_event_id`` is the last event delivered: subscribe again with
    ``from_event=last_event_id + 1`` to continue exactly after it.
    """

    retryable = True


class SubscriptionGap(SubscriptionLost):
    """The change log no longer holds the events after ``last_event_id`` (it was
    trimmed: ``oldest_event_id`` is the oldest one kept), so the subscription
    can't continue without missing changes. Not retryable: read the table again,
    then subscribe from its current position.
    """

    retryable = False

    def __init__(self, message: str, *, oldest_event_id: int | None = None, **facts: Any) -> None:
        super().__init__(message, **facts)
        self.oldest_event_id = oldest_event_id
