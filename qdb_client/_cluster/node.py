"""A node of the cluster as the client sees it: address, id, health, latency, counters.

Its health (UP/SUSPECT/DOWN) is the pure state machine of
:mod:`.health_state`, driven by the node's health monitor; its latency
estimates are a :class:`~qdb_client._policies.LatencyTracker` fed by the
outcome of every attempt; its breaker a
:class:`~qdb_client._policies.CircuitBreaker` fed the same way.
"""

from __future__ import annotations

from typing import Any

import trio

from .._policies import BreakerSettings, CircuitBreaker, LatencyTracker
from .._pool import NodePool
from ..errors import QdbError
from .health_state import NodeHealth, NodeState

__all__ = ["Node", "NodeState"]


class Node:
    """One QDB node: its pool, health, latency and statistics."""

    def __init__(
        self,
        address: str,
        pool: NodePool,
        *,
        node_id: str | None = None,
        breaker: BreakerSettings | None = None,
        failures_to_down: int = 3,
        now: float = 0.0,
    ) -> None:
        self.address = address
        self.pool = pool
        self.breaker = CircuitBreaker(breaker or BreakerSettings())
        self.health = NodeHealth(failures_to_down=failures_to_down, now=now)
        self.latency = LatencyTracker()
        #: Server-assigned id, learnt from WELCOME (or a member list).
        self.node_id = node_id
        self.next_reconnect_at: float | None = None
        self.last_ping_rtt: float | None = None
        self.requests_sent = 0
        #: Named in the client's hosts (rather than learnt from a member list).
        self.configured = False
        #: trio time a member list last named this node (None: never, or configured).
        self.announced_at: float | None = None
        #: Cancel scope of the node's background tasks (set once they run).
        self.tasks: trio.CancelScope | None = None
        #: Set when the node refused the client's credentials (AUTH_FAILED):
        #: nothing is sent to it until new credentials clear it.
        self.auth_failed: QdbError | None = None

    # ------------------------------------------------------------- health

    @property
    def state(self) -> NodeState:
        """UP, SUSPECT or DOWN."""
        return self.health.state

    @property
    def reason(self) -> str | None:
        """Why the node is not UP (None when UP)."""
        return self.health.reason

    @property
    def changed_at(self) -> float:
        """trio time of the last state change."""
        return self.health.changed_at

    @property
    def recovered_at(self) -> float | None:
        """trio time it last came back UP after being DOWN (for slow start)."""
        return self.health.recovered_at

    @recovered_at.setter
    def recovered_at(self, value: float | None) -> None:
        self.health.recovered_at = value

    @property
    def forced_down(self) -> bool:
        """Marked unhealthy by an operator: stays DOWN until marked healthy."""
        return self.health.forced_down

    @property
    def consecutive_failures(self) -> int:
        """Failed probes in a row."""
        return self.health.consecutive_failures

    @consecutive_failures.setter
    def consecutive_failures(self, value: int) -> None:
        self.health.consecutive_failures = value

    @property
    def reconnect_attempts(self) -> int:
        """Failed reconnects since the node went DOWN."""
        return self.health.reconnect_attempts

    @property
    def failures(self) -> int:
        """Connections lost and opens failed, in all."""
        return self.health.failures

    # ------------------------------------------------------------ latency

    @property
    def latency_ewma(self) -> float | None:
        """Moving average of reply times and penalties, seconds (what balancing weighs)."""
        return self.latency.load

    @latency_ewma.setter
    def latency_ewma(self, value: float | None) -> None:
        self.latency.load = value

    @property
    def in_flight(self) -> int:
        """Requests on this node's connections (orphans of cancelled callers included)."""
        return self.pool.state.reserved

    def oldest_in_flight(self) -> float | None:
        """trio time the oldest request still waiting on this node was sent."""
        oldest: float | None = None
        for connection in self.pool.connections():
            started = connection.oldest_started()
            if started is not None and (oldest is None or started < oldest):
                oldest = started
        return oldest

    # ---------------------------------------------------------- reporting

    def describe(self, now: float) -> str:
        """Why this node can or can't take requests, for error messages."""
        text = self.state.value
        if self.auth_failed is not None:
            return f"AUTH_FAILED ({self.auth_failed})"
        if self.reason:
            text += f" ({self.reason})"
        if self.state is NodeState.DOWN and self.next_reconnect_at is not None:
            text += f", next reconnect in {max(0.0, self.next_reconnect_at - now):.2f} s"
        return text

    def statistics(self, now: float) -> dict[str, Any]:
        """A snapshot for ``Client.statistics()``."""
        pool = self.pool.statistics()
        return {
            "address": self.address,
            "node_id": self.node_id,
            "state": self.state.value,
            "reason": self.reason,
            "configured": self.configured,
            "auth_failed": self.auth_failed is not None,
            "connections": {k: pool[k] for k in ("open", "idle", "leased", "opening", "retiring")},
            "in_flight": pool["in_flight"],
            "orphaned": pool["orphaned"],
            "waiting": pool["waiting"],
            "requests_sent": self.requests_sent,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_ping_rtt": self.last_ping_rtt,
            "latency_ewma": self.latency.load,
            "reply_time": self.latency.srtt,
            "reply_time_quantile": self.latency.reply_quantile,
            "next_reconnect_in": None
            if self.next_reconnect_at is None
            else max(0.0, self.next_reconnect_at - now),
            "breaker": self.breaker.metrics(now),
        }
