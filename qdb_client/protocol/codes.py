"""Structured error codes of protocol v1.

Each symbolic name belongs to a numeric class borrowed from HTTP, so that the
retry rules of the reliability catalogue apply unchanged: classes 408, 429,
500, 502, 503 and 504 are retryable; 400, 401, 403, 404, 409, 413, 422,
426 and 499 are not. The ERROR message carries the ``retryable`` flag explicitly as
well, and receivers trust the flag over the class.
"""

from __future__ import annotations

import enum

__all__ = ["RETRYABLE_CLASSES", "ErrorCode"]

#: Numeric classes whose errors may succeed when repeated.
RETRYABLE_CLASSES = frozenset({408, 429, 500, 502, 503, 504})


class ErrorCode(enum.Enum):
    """A symbolic error name with its numeric class.

    ``ErrorCode.SQL_ERROR.code == 422``; ``ErrorCode("SQL_ERROR")`` looks a
    name up; ``.retryable`` follows the class.
    """

    PARSE_ERROR = "PARSE_ERROR"
    INVALID_REQUEST = "INVALID_REQUEST"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    READ_ONLY = "READ_ONLY"
    METHOD_NOT_FOUND = "METHOD_NOT_FOUND"
    NOT_FOUND = "NOT_FOUND"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    CONFLICT = "CONFLICT"
    TX_ABORTED = "TX_ABORTED"
    WRITE_CONFLICT = "WRITE_CONFLICT"
    UNPREPARED = "UNPREPARED"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    CONSTRAINT_VIOLATION = "CONSTRAINT_VIOLATION"
    SQL_ERROR = "SQL_ERROR"
    VERSION_MISMATCH = "VERSION_MISMATCH"
    OVERLOADED = "OVERLOADED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    CAPACITY_EXCEEDED = "CAPACITY_EXCEEDED"

    @property
    def code(self) -> int:
        """The numeric class sent beside the name."""
        return _CLASS_OF[self.value]

    @property
    def retryable(self) -> bool:
        """Whether errors of this name are worth repeating (their class is one of
        RETRYABLE_CLASSES, or the name is a conflict that may clear up)."""
        return self.code in RETRYABLE_CLASSES or self.value in _RETRYABLE_NAMES


#: Names retryable although their class is not: a write conflict clears up
#: once the other transaction ends (the whole transaction may run again).
_RETRYABLE_NAMES = frozenset({"WRITE_CONFLICT"})

_CLASS_OF = {
    "PARSE_ERROR": 400,
    "INVALID_REQUEST": 400,  # arguments missing, of the wrong type or out of range
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "READ_ONLY": 403,  # a write sent through a read-only method (query)
    "METHOD_NOT_FOUND": 404,
    "NOT_FOUND": 404,  # a session, stream or resume token is unknown
    "TIMEOUT": 408,
    "CANCELLED": 499,  # the request was stopped on CANCEL (the acknowledgement)
    "CONFLICT": 409,  # e.g. an idempotency key reused for a different request
    "TX_ABORTED": 409,  # the transaction is gone (rolled back): idle, unknown, connection closed
    "WRITE_CONFLICT": 409,  # another transaction held the write lock: this one was rolled back
    "UNPREPARED": 404,  # the prepared statement id is unknown to this session
    "FRAME_TOO_LARGE": 413,
    "CONSTRAINT_VIOLATION": 422,
    "SQL_ERROR": 422,
    "VERSION_MISMATCH": 426,
    "OVERLOADED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "SHUTTING_DOWN": 503,
    "CAPACITY_EXCEEDED": 503,  # connection or in-flight limit reached
}
