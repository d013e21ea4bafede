"""Counters a node keeps about its traffic, reported by ``statistics()``.

Traffic of the control tool itself (connections whose HELLO carries the
node's control token, and every ``control.*`` request) is left out, so that
observing a node does not change what is observed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["CONTROL_CLIENT_NAME", "UNKNOWN_METHOD", "NodeStatistics"]

#: HELLO ``client`` name of :class:`~qdb_client.testing.NodeControl` connections. Only a
#: name: what makes a connection the control tool is the node's control token.
CONTROL_CLIENT_NAME = "qdb_client.testing.control"
#: The ``requests_by_method`` entry counting every method name the node does not know,
#: so that a client sending random names can't grow the statistics.
UNKNOWN_METHOD = "<unknown>"


class NodeStatistics:
    """Mutable counters of one node; :meth:`snapshot` gives a plain dict.

    ``connections_accepted``: client connections accepted (including ones
    later closed); ``connections_refused``: connections turned away because
    ``max_connections`` were open; ``requests_by_method``: REQUESTs received
    per method name, every unknown name under :data:`UNKNOWN_METHOD` (see
    :meth:`count_request`); ``errors_sent``: ERROR messages sent per symbolic name;
    ``bad_frames``: frames that could not be used (bad checksum, CBOR, body,
    kind, header); ``pings_answered``: PING frames answered with PONG;
    ``requests_cancelled``: requests stopped by the client's CANCEL and
    answered CANCELLED (also counted in ``errors_sent``);
    ``idempotent_stored``: keyed writes executed with their result stored
    under the key; ``idempotent_hits``: keyed writes answered with a stored
    result instead of executing; ``idempotent_conflicts``: keyed writes
    refused because the key was stored for a different request (a
    ``commit`` is a keyed write too). ``transactions_begun`` /
    ``_committed`` / ``_rolled_back`` (by ``rollback``) / ``_aborted`` (any
    other end: write conflict, deadline, cancel, idle timeout, connection
    closed, a commit that did not apply): ``begin`` transactions and how they
    ended; ``write_conflicts``: requests answered WRITE_CONFLICT;
    ``commit_fences``: commits asked again that found no outcome and stored
    "not committed"; ``statements_prepared``: ``prepare`` requests answered.
    The node's limits (docs/security.md): ``handshake_timeouts``: sockets
    closed because their handshake (TLS, HELLO) did not complete within
    ``handshake_timeout``; ``handshakes_evicted``: sockets still in their handshake closed at
    ``max_pending_handshakes``; ``address_limit_refused``: at
    ``max_connections_per_address``; ``slow_readers_closed``: connections
    closed because a write blocked for ``write_timeout`` or their replies
    waiting to be written passed ``max_queued_reply_bytes``;
    ``control_refused``: HELLOs with a wrong control token, and ``control.*``
    requests from a connection that is not the control tool.
    """

    def __init__(self) -> None:
        self.connections_accepted = 0
        self.connections_refused = 0
        self.bad_frames = 0
        self.pings_answered = 0
        self.requests_cancelled = 0
        self.idempotent_stored = 0
        self.idempotent_hits = 0
        self.idempotent_conflicts = 0
        self.transactions_begun = 0
        self.transactions_committed = 0
        self.transactions_rolled_back = 0
        self.transactions_aborted = 0
        self.write_conflicts = 0
        self.commit_fences = 0
        self.statements_prepared = 0
        self.handshake_timeouts = 0
        self.handshakes_evicted = 0
        self.address_limit_refused = 0
        self.slow_readers_closed = 0
        self.control_refused = 0
        self.requests_by_method: Counter[str] = Counter()
        self.errors_sent: Counter[str] = Counter()

    def count_request(self, method: str, *, known: bool) -> None:
        """Count one REQUEST: under its name if ``known``, else under :data:`UNKNOWN_METHOD`."""
        self.requests_by_method[method if known else UNKNOWN_METHOD] += 1

    def reset(self) -> None:
        """Zero every counter."""
        self.__init__()  # type: ignore[misc]

    def snapshot(self, *, connections_open: int, **extra: Any) -> dict[str, Any]:
        """A plain-dict copy of the counters, plus the live gauges given."""
        return {
            "connections_accepted": self.connections_accepted,
            "connections_open": connections_open,
            "connections_refused": self.connections_refused,
            "requests_by_method": dict(self.requests_by_method),
            "errors_sent": dict(self.errors_sent),
            "bad_frames": self.bad_frames,
            "pings_answered": self.pings_answered,
            "requests_cancelled": self.requests_cancelled,
            "idempotent_stored": self.idempotent_stored,
            "idempotent_hits": self.idempotent_hits,
            "idempotent_conflicts": self.idempotent_conflicts,
            "transactions_begun": self.transactions_begun,
            "transactions_committed": self.transactions_committed,
            "transactions_rolled_back": self.transactions_rolled_back,
            "transactions_aborted": self.transactions_aborted,
            "write_conflicts": self.write_conflicts,
            "commit_fences": self.commit_fences,
            "statements_prepared": self.statements_prepared,
            "handshake_timeouts": self.handshake_timeouts,
            "handshakes_evicted": self.handshakes_evicted,
            "address_limit_refused": self.address_limit_refused,
            "slow_readers_closed": self.slow_readers_closed,
            "control_refused": self.control_refused,
            **extra,
        }
