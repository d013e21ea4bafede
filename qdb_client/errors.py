"""The qdb_client error tree.

Every error a user of the driver can see is a subclass of :class:`QdbError`.
Errors from trio, the operating system or cbor2 are translated at the layer
that meets them and chained with ``raise ... from``.

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
    │   │   └── ConnectTimeout
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
    ├── ServerError                  the node answered with a structured error
    │   ├── ParseError, InvalidRequest, MethodNotFound, Unauthenticated,
    │   │   PermissionDenied, NotFound, Conflict, FrameRejected, SqlError,
    │   │   ConstraintViolation, ServerTimeout, Overloaded, CapacityExceeded,
    │   │   Unavailable, ShuttingDown, InternalServerError
    └── ClientClosed                 the client was used after it was closed

``retryable`` tells whether the same request may succeed if tried again
(possibly on another node). It says nothing about whether a write that
failed with it was applied: a write whose outcome can't be known raises
:class:`OutcomeUnknown`.

Every error raised by a client call carries ``attempts``: one
:class:`Attempt` per try (node, timing, outcome, and why it was or wasn't
retried).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

__all__ = [
    "Attempt",
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
    "RequestTimeout",
    "RetryExhausted",
    "ServerError",
    "ServerTimeout",
    "ShuttingDown",
    "SqlError",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "ValueNotEncodable",
    "VersionMismatch",
    "server_error_from_wire",
]


@attrs.frozen
class Attempt:
    """One try of a client call, as recorded in ``QdbError.attempts``.

    ``started`` and ``elapsed`` are seconds from the start of the call and
    of the attempt; ``outcome`` is ``"ok"`` or the error's class and
    message; ``retried`` and ``reason`` say whether another attempt followed
    and why (or why not).
    """

    number: int
    node: str | None
    started: float
    elapsed: float
    outcome: str
    retried: bool
    reason: str

    def __str__(self) -> str:
        verdict = "retried" if self.retried else "not retried"
        return (
            f"#{self.number} on {self.node or '(no node)'} at +{self.started:.3f}s"
            f" took {self.elapsed:.3f}s: {self.outcome}; {verdict}: {self.reason}"
        )


class QdbError(Exception):
    """Base class of every error raised by qdb_client."""

    #: True when repeating the request (perhaps elsewhere) may succeed.
    retryable: ClassVar[bool] = False
    #: The attempts of the call that raised this error (empty if none was made).
    attempts: tuple[Attempt, ...] = ()


class ConfigError(QdbError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


# --------------------------------------------------------------------- protocol


class ProtocolError(QdbError):
    """Bytes received from a peer do not follow protocol v1."""


class FrameError(ProtocolError):
    """A frame header is broken; the byte stream can no longer be trusted.

    The connection that produced it must be closed.
    """


class FrameTooLarge(FrameError):
    """A frame header announces more bytes than the negotiated maximum.

    Raised from the header alone, before any buffer for the body exists.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum of {limit} bytes")
        self.size = size
        self.limit = limit


class ProtocolViolation(ProtocolError):
    """A peer sent a message that its role or the connection state forbids.

    For example a REQUEST before the handshake finished. Connection-level.
    """


class MessageError(ProtocolError):
    """One frame arrived whole but its content is unusable.

    A checksum mismatch, undecodable CBOR or a body that does not match its
    message kind. The connection stays usable; ``request_id`` names the
    request the frame claimed to belong to (0 when unknown).
    """

    def __init__(self, message: str, *, request_id: int = 0, kind: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.kind = kind


class InvalidArgument(QdbError, TypeError):
    """A driver method was called with an argument of the wrong type or shape."""


class ValueNotEncodable(InvalidArgument):
    """A value given to the driver has no representation in protocol v1."""


# -------------------------------------------------------------------- transport


class TransportError(QdbError):
    """The connection to a node failed.

    ``node`` is the ``host:port`` address involved, when known.
    ``request_sent`` tells whether the request's bytes had been written when
    it failed: False means the node never saw it and any request may be
    retried safely.
    """

    retryable = True

    def __init__(
        self, message: str, *, node: str | None = None, request_sent: bool = False
    ) -> None:
        super().__init__(message)
        self.node = node
        self.request_sent = request_sent


class ConnectError(TransportError):
    """A connection to a node could not be opened (refused, unreachable)."""


class ConnectTimeout(ConnectError):
    """Opening a connection (TCP connect plus handshake) took longer than allowed."""


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
    """The circuit breakers of all usable nodes are open; failing fast.

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


class ClientClosed(QdbError):
    """The client (or connection) was used after it was closed."""


# ----------------------------------------------------------------------- server


class ServerError(QdbError):
    """A node answered a request with a structured error.

    Attributes mirror the wire ERROR message: ``code`` (numeric class, as in
    HTTP), ``name`` (symbolic, e.g. ``"SQL_ERROR"``), ``message``,
    ``retryable``, ``retry_after_ms`` and ``details``.
    """

    #: Symbolic name this class stands for; ServerError itself covers unknown names.
    wire_name: ClassVar[str] = ""

    def __init__(
        self,
        message: str,
        *,
        code: int,
        name: str,
        retryable: bool = False,
        retry_after_ms: int | None = None,
        details: dict[str, Any] | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__(f"{name} ({code}): {message}")
        self.code = code
        self.name = name
        self.message = message
        self.retryable = retryable  # type: ignore[misc]  # instance overrides class default
        self.retry_after_ms = retry_after_ms
        self.details = dict(details or {})
        self.node = node


class ParseError(ServerError):
    """The node could not parse a frame."""

    wire_name = "PARSE_ERROR"


class InvalidRequest(ServerError):
    """The request's arguments are invalid."""

    wire_name = "INVALID_REQUEST"


class MethodNotFound(ServerError):
    """The node has no method of that name."""

    wire_name = "METHOD_NOT_FOUND"


class Unauthenticated(ServerError):
    """Credentials are missing or wrong."""

    wire_name = "UNAUTHENTICATED"


class PermissionDenied(ServerError):
    """The session may not do this."""

    wire_name = "PERMISSION_DENIED"


class NotFound(ServerError):
    """A named session, stream or object is unknown."""

    wire_name = "NOT_FOUND"


class Conflict(ServerError):
    """The request conflicts with earlier state (e.g. a reused key)."""

    wire_name = "CONFLICT"


class FrameRejected(ServerError):
    """The node refused a frame larger than its limit."""

    wire_name = "FRAME_TOO_LARGE"


class SqlError(ServerError):
    """The SQL statement failed."""

    wire_name = "SQL_ERROR"


class ConstraintViolation(ServerError):
    """The statement broke a table constraint."""

    wire_name = "CONSTRAINT_VIOLATION"


class ServerTimeout(ServerError):
    """The node gave up on the request at its deadline."""

    wire_name = "TIMEOUT"


class Overloaded(ServerError):
    """The node is shedding load."""

    wire_name = "OVERLOADED"


class CapacityExceeded(ServerError):
    """The node is at its connection or request limit."""

    wire_name = "CAPACITY_EXCEEDED"


class Unavailable(ServerError):
    """The node cannot serve right now."""

    wire_name = "UNAVAILABLE"


class ShuttingDown(ServerError):
    """The node is shutting down."""

    wire_name = "SHUTTING_DOWN"


class InternalServerError(ServerError):
    """The node failed unexpectedly."""

    wire_name = "INTERNAL"


_BY_WIRE_NAME: dict[str, type[ServerError]] = {
    cls.wire_name: cls
    for cls in (
        ParseError,
        InvalidRequest,
        MethodNotFound,
        Unauthenticated,
        PermissionDenied,
        NotFound,
        Conflict,
        FrameRejected,
        SqlError,
        ConstraintViolation,
        ServerTimeout,
        Overloaded,
        CapacityExceeded,
        Unavailable,
        ShuttingDown,
        InternalServerError,
    )
}


def server_error_from_wire(
    *,
    code: int,
    name: str,
    message: str,
    retryable: bool,
    retry_after_ms: int | None = None,
    details: dict[str, Any] | None = None,
    node: str | None = None,
) -> ServerError:
    """Build the ServerError subclass matching a wire ERROR's symbolic name."""
    cls = _BY_WIRE_NAME.get(name, ServerError)
    return cls(
        message,
        code=code,
        name=name,
        retryable=retryable,
        retry_after_ms=retry_after_ms,
        details=details,
        node=node,
    )
