"""What the parts of a transaction share: the client interface they use
(:class:`Host`), the counters of how transactions ended, and the errors a
transaction raises on the driver's side, with the facts every error owes its
caller (nothing of a transaction is applied before its commit).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .._request import RequestPipeline
from ..config import ClientConfig
from ..errors import ProtocolError, QdbError, TransactionAborted
from ..events import EventBus
from ..results import ExecuteResult

if TYPE_CHECKING:
    from .._cluster import Cluster

__all__ = [
    "Host",
    "TransactionCounters",
    "aborted_error",
    "check_committed",
    "copy_aborted",
    "describe",
    "ms_until",
    "rows_affected",
    "with_facts",
]


class TransactionCounters:
    """How the client's transactions ended (``statistics()["transactions"]``)."""

    __slots__ = (
        "aborted",
        "begun",
        "commits_recovered",
        "committed",
        "outcome_unknown",
        "rolled_back",
    )

    def __init__(self) -> None:
        self.begun = 0
        self.committed = 0
        #: Commits whose reply was lost and that a node confirmed from the stored outcome.
        self.commits_recovered = 0
        self.rolled_back = 0
        self.aborted = 0
        self.outcome_unknown = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {name: getattr(self, name) for name in sorted(self.__slots__)}


class Host(Protocol):
    """What a transaction needs of its client (the public Client provides it)."""

    config: ClientConfig
    events: EventBus
    _pipeline: RequestPipeline | None
    _rng: random.Random
    _transactions: TransactionCounters

    _active: int

    def _budget(self, timeout: float | None) -> float: ...

    async def _admit(self) -> None: ...

    def _fresh_key(self) -> str: ...

    def _require_cluster(self) -> Cluster: ...


def aborted_error(
    message: str, *, node: str | None, cause: BaseException | None, retryable: bool = True
) -> TransactionAborted:
    """A TransactionAborted raised on the driver's side, as the node would say it
    (the node rolls back every transaction of a connection that closes)."""
    error = TransactionAborted(
        message,
        code=409,
        name="TX_ABORTED",
        retryable=retryable,
        details={"executed": False, "reason": message},
        node=node,
    )
    error.__cause__ = cause
    return error


def with_facts(error: QdbError, *, sent: bool, key: str | None = None) -> QdbError:
    """Set what the caller is owed on ``error``: nothing of a transaction is applied
    before its commit."""
    error.request_sent = sent
    error.maybe_applied = False
    if key is not None:
        error.idempotency_key = key
    return error


def describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def copy_aborted(error: TransactionAborted) -> TransactionAborted:
    """A fresh exception of the same kind (each raise its own traceback)."""
    fresh = type(error)(
        error.message,
        code=error.code,
        name=error.name,
        retryable=error.retryable,
        retry_after_ms=error.retry_after_ms,
        details=error.details,
        node=error.node,
    )
    fresh.__cause__ = error.__cause__
    return fresh


def ms_until(deadline: float) -> int:
    return max(1, math.ceil((deadline - trio.current_time()) * 1000))


def check_committed(reply: Any) -> Any:
    if not (isinstance(reply, Mapping) and reply.get("committed") is True):
        raise ProtocolError(f"malformed commit result from node: {reply!r:.100}")
    return reply


def rows_affected(result: Any) -> int:
    """The ``rows_affected`` of an executemany result (ProtocolError if malformed)."""
    parsed = ExecuteResult.from_wire(result)
    return parsed.rows_affected
