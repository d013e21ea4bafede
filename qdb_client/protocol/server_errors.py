"""The exception classes of the node's structured errors, the mapping from a
wire ERROR to them, and :func:`error_message`, the ERROR a node sends for an
:class:`~.codes.ErrorCode`.

Each class stands for one symbolic name of section 9 of docs/protocol.md;
an unknown name becomes a plain :class:`ServerError` that keeps its code,
name and ``retryable`` flag. :mod:`qdb_client.errors` re-exports them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .._error_base import QdbError
from .codes import ErrorCode
from .messages import Error

__all__ = [
    "AuthenticationFailed",
    "CapacityExceeded",
    "Conflict",
    "ConstraintViolation",
    "FrameRejected",
    "InternalServerError",
    "InvalidRequest",
    "MethodNotFound",
    "NotFound",
    "Overloaded",
    "ParseError",
    "PermissionDenied",
    "ReadOnlyViolation",
    "RequestCancelled",
    "ServerError",
    "ServerTimeout",
    "ShuttingDown",
    "SqlError",
    "TransactionAborted",
    "Unauthenticated",
    "Unavailable",
    "Unprepared",
    "WriteConflict",
    "error_from_message",
    "error_message",
    "server_error_from_wire",
]


class ServerError(QdbError):
    """A node answered a request with a structured error.

    Attributes mirror the wire ERROR message: ``code`` (numeric class, as in
    HTTP), ``name`` (symbolic, e.g. ``"SQL_ERROR"``), ``message``,
    ``retryable``, ``retry_after_ms`` and ``details``. ``node`` is the
    address of the node that answered.
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
        self.retryable = retryable  # the instance's own, over the class default
        self.retry_after_ms = retry_after_ms
        self.details = dict(details or {})
        self.node = node

    @property
    def executed(self) -> bool | None:
        """What the node says of the request's effect: False when it states that
        nothing was executed (``details.executed``), else None (not stated)."""
        value = self.details.get("executed")
        return value if isinstance(value, bool) else None


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


class AuthenticationFailed(Unauthenticated):
    """The node refused the client's credentials (or its session token with no
    password left to fall back on): final, never retried.

    What the driver raises for every ``UNAUTHENTICATED``. The node that
    refused is marked ``AUTH_FAILED``: nothing is sent to it again, not even
    by background reconnects, until ``client.reauthenticate(...)`` gives new
    credentials (or a new client is opened). ``reason`` is the node's
    ``details.reason``: ``"credentials"`` or ``"session"`` (docs/protocol.md
    section 7.3).
    """

    wire_name = "UNAUTHENTICATED"

    @property
    def reason(self) -> str:
        """``"session"`` when a session token alone was refused, else ``"credentials"``."""
        return "session" if self.details.get("reason") == "session" else "credentials"


class PermissionDenied(ServerError):
    """The session may not do this."""

    wire_name = "PERMISSION_DENIED"


class ReadOnlyViolation(ServerError):
    """A read-only call (``query()``) carried a statement that writes.

    The node refused it before anything changed; send writes with ``execute()``.
    """

    wire_name = "READ_ONLY"


class NotFound(ServerError):
    """A named session, stream or object is unknown."""

    wire_name = "NOT_FOUND"


class Conflict(ServerError):
    """The request conflicts with earlier state (e.g. a reused key)."""

    wire_name = "CONFLICT"


class TransactionAborted(ServerError):
    """The transaction is over and nothing of it was applied (the node rolled it back).

    Its connection was lost, it stayed idle past its timeout, a write
    conflicted with another transaction (:class:`WriteConflict`), or the node
    does not know it. ``retryable`` says whether running the whole
    transaction again may succeed (``client.run_in_transaction`` does that).
    """

    wire_name = "TX_ABORTED"


class WriteConflict(TransactionAborted):
    """Another transaction (on any node of the cluster) held the write lock
    until the deadline: this transaction was rolled back; running it again may
    succeed (retryable)."""

    wire_name = "WRITE_CONFLICT"


class Unprepared(ServerError):
    """The node does not know the prepared statement id (a new connection or
    node, or it was evicted); the driver prepares it again by itself."""

    wire_name = "UNPREPARED"


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


class RequestCancelled(ServerError):
    """The node stopped the request because the client sent CANCEL.

    The driver normally sees it only as the acknowledgement that frees a
    cancelled request's slot. A node that stops a request nobody cancelled
    (with ``details.executed = false``) is treated as unavailable for it: the
    request is retried elsewhere, and this error is only seen if retrying stops.
    """

    wire_name = "CANCELLED"


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
        AuthenticationFailed,
        PermissionDenied,
        ReadOnlyViolation,
        NotFound,
        Conflict,
        FrameRejected,
        SqlError,
        ConstraintViolation,
        ServerTimeout,
        RequestCancelled,
        TransactionAborted,
        WriteConflict,
        Unprepared,
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


def error_from_message(error: Error, *, node: str | None = None) -> ServerError:
    """The exception a received ERROR message stands for."""
    return server_error_from_wire(
        code=error.code,
        name=error.name,
        message=error.message,
        retryable=error.retryable,
        retry_after_ms=error.retry_after_ms,
        details=dict(error.details),
        node=node,
    )


def error_message(request_id: int, code: ErrorCode, message: str, **extra: Any) -> Error:
    """Build an ERROR for ``code`` with its numeric class and retryable flag filled in."""
    return Error(
        request_id=request_id,
        code=code.code,
        name=code.value,
        message=message,
        retryable=code.retryable,
        **extra,
    )
