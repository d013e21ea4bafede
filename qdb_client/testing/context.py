"""What a method handler sees of a request and of the node, and what it answers.

:class:`MethodContext` is built by the connection: the node's parts and the
caller's identity, and nothing else (handlers know neither the node nor the
connection classes). :class:`Call` is one data request; :class:`Outcome`
a handler's answer. :class:`SessionState` is the protocol's session of the
connection as the node keeps it: docs/protocol.md sections 10.2 and 10.3
scope transactions and prepared statements to it (an id means something only
on the connection that was given it); it is created with each connection and
closed with it, which ends its open transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from .faults import Faults
from .prepared import DEFAULT_MAX_PREPARED, PreparedStatements
from .stats import NodeStatistics
from .storage import Storage
from .transactions import NodeTransactions, SessionTransactions

__all__ = [
    "DEFAULT_TRANSACTION_IDLE_TIMEOUT",
    "Call",
    "MethodContext",
    "Outcome",
    "SessionState",
]


#: Seconds a transaction may stay idle between requests unless configured otherwise.
DEFAULT_TRANSACTION_IDLE_TIMEOUT = 30.0


class SessionState:
    """Transactions and prepared statements of one connection's session.

    ``close_connection`` closes a transaction's SQLite connection (the
    storage's); ``spawn`` starts a task in the connection's nursery (None:
    idle transactions are found out only when their next request arrives).
    """

    def __init__(
        self,
        *,
        node_transactions: NodeTransactions,
        close_connection: Callable[[sqlite3.Connection], None],
        max_prepared: int = DEFAULT_MAX_PREPARED,
        transaction_idle_timeout: float = DEFAULT_TRANSACTION_IDLE_TIMEOUT,
        spawn: Callable[[Callable[[], Any]], None] | None = None,
    ) -> None:
        #: The session's transactions (at most one open).
        self.transactions = SessionTransactions(
            node_transactions, close=close_connection, spawn=spawn
        )
        #: The session's prepared statements.
        self.prepared = PreparedStatements(max_prepared)
        #: Default and cap of a transaction's idle timeout (``begin`` ``timeout_ms``).
        self.transaction_idle_timeout = transaction_idle_timeout

    def arrived(self, method: str, args: Any, request_id: int) -> None:
        """A request arrived: the reader calls this in arrival order, before it runs."""
        self.transactions.arrived(method, args, request_id)

    def finished(self, request_id: int, error: str | None = None) -> None:
        """A request is over (replied to or not; ``error``: the name of its ERROR)."""
        self.transactions.finished(request_id, error)

    def close(self) -> None:
        """The connection closed: its open transaction ends (rolled back)."""
        self.transactions.close_all()


def _default_session(ctx: MethodContext) -> SessionState:
    return SessionState(
        node_transactions=NodeTransactions(stats=ctx.stats),
        close_connection=ctx.storage.close_connection,
    )


@attrs.frozen
class MethodContext:
    """What a method handler may use: the node's parts and the caller's identity.

    ``scope`` is the authenticated user ("" without credentials), which
    idempotency keys are stored under; ``is_control_client``: the caller is
    the control tool (exempt from faults, left out of the statistics).
    The callables are the node actions control methods need:
    ``drop_other_connections`` / ``count_other_connections`` spare the
    caller's own connection; ``start_shutdown(grace)``; ``statistics()``.
    ``max_frame`` is the largest frame the client accepts (its HELLO
    ``max_frame``): no result may be larger. ``session`` is the connection's
    :class:`SessionState` (transactions, prepared statements);
    by default a fresh one of its own.
    """

    node_id: str
    storage: Storage
    faults: Faults
    stats: NodeStatistics
    test_mode: bool
    scope: str
    is_control_client: bool
    #: Who is calling (``host:port``), for log lines.
    peer: str
    drop_other_connections: Callable[[], int]
    count_other_connections: Callable[[], int]
    start_shutdown: Callable[[float], None]
    statistics: Callable[[], dict[str, Any]]
    max_frame: int | None = None
    session: SessionState = attrs.field(default=attrs.Factory(_default_session, takes_self=True))


@attrs.frozen
class Outcome:
    """A method's result, and what to do once the RESPONSE has been written.

    ``replayed``: the result is a keyed write's stored one (nothing ran).
    ``drop_connection``: close the connection abruptly instead of replying.
    ``applied``: a write that took effect (executed and committed, or
    replayed), so an ERROR sent instead of its RESPONSE says ``executed``.
    """

    result: Any
    #: Called once the RESPONSE is written (its return value is ignored).
    after_reply: Callable[[], object] | None = None
    replayed: bool = False
    drop_connection: bool = False
    applied: bool = False


@attrs.frozen
class Call:
    """One data request as its handler sees it.

    ``scope`` is the authenticated user ("" without credentials), which
    idempotency keys are stored under; ``counted`` is False for the control
    tool, whose traffic stays out of the statistics.
    """

    args: Mapping[str, Any]
    deadline: float
    idem_key: str | None = None
    scope: str = ""
    counted: bool = True
    #: The request's id (transactions run their requests in arrival order by it).
    request_id: int = 0
