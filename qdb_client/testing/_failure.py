"""The one exception a request handler raises to answer with an ERROR."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import Error, ErrorCode, error_message

__all__ = ["RequestFailed"]


class RequestFailed(Exception):
    """Answer the current request with an ERROR of ``code``.

    Raised by method handlers, the storage layer and injected faults; the
    connection turns it into the wire message with :meth:`to_message`.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        details: Mapping[str, Any] | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.details = dict(details or {})
        self.retry_after_ms = retry_after_ms

    def to_message(self, request_id: int) -> Error:
        """The ERROR message for request ``request_id``."""
        return error_message(
            request_id,
            self.code,
            self.message,
            details=self.details,
            retry_after_ms=self.retry_after_ms,
        )
