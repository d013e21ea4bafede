"""A node of the cluster as the client sees it: address, id, health, counters.

Health states:

- ``UP``: takes requests.
- ``SUSPECT``: a ping failed or a connection died; probed again quickly.
  Takes requests only when no node is UP.
- ``DOWN``: unreachable or unhealthy; takes no requests. Reconnection is
  attempted in the background with exponential backoff.

Transitions happen in ``_cluster.health`` (probes) and
``_cluster.cluster`` (operator marks); this module only records them.
"""

from __future__ import annotations

import enum
from typing import Any

import trio

from .._policies import BreakerSettings, CircuitBreaker
from .._pool import NodePool

__all__ = ["Node", "NodeState"]

#: Weight of the newest sample in the latency moving average (MongoDB uses 0.2).
EWMA_WEIGHT = 0.2


class NodeState(enum.Enum):
    """Health of a node."""

    UP = "UP"
    SUSPECT = "SUSPECT"
    DOWN = "DOWN"


class Node:
    """One QDB node: its pool, health and statistics."""

    def __init__(
        self,
        address: str,
        pool: NodePool,
        *,
        node_id: str | None = None,
        breaker: BreakerSettings | None = None,
    ) -> None:
        self.address = address
        self.pool = pool
        self.breaker = CircuitBreaker(breaker or BreakerSettings())
        #: Server-assigned id, learnt from WELCOME (or a member list).
        self.node_id = node_id
        self.state = NodeState.UP
        #: Why the node is not UP (None when UP).
        self.reason: str | None = None
        #: trio time of the last state change.
        self.changed_at = 0.0
        #: trio time it last came back UP after being DOWN (for slow start).
        self.recovered_at: float | None = None
        #: Set by an operator: stays DOWN until marked healthy.
        self.forced_down = False
        self.consecutive_failures = 0
        self.reconnect_attempts = 0
        self.next_reconnect_at: float | None = None
        self.last_ping_rtt: float | None = None
        #: Moving average of request round trips, seconds.
        self.latency_ewma: float | None = None
        self.requests_sent = 0
        self.failures = 0
        #: Named in the client's hosts (rather than learnt from a member list).
        self.configured = False
        #: Cancel scope of the node's background tasks (set once they run).
        self.tasks: trio.CancelScope | None = None

    @property
    def in_flight(self) -> int:
        """Requests reserved on this node's connections."""
        return self.pool.state.reserved

    def set_state(self, state: NodeState, now: float, reason: str | None = None) -> bool:
        """Record a transition; return True if the state changed."""
        changed = state is not self.state
        if changed:
            if state is NodeState.UP and self.state is NodeState.DOWN:
                self.recovered_at = now
                # Requests that failed while it died opened the breaker; a
                # successful health probe earns it half-open trial requests.
                self.breaker.probe_now(now)
            self.state = state
            self.changed_at = now
        self.reason = None if state is NodeState.UP else reason
        return changed

    def record_latency(self, seconds: float) -> None:
        """Fold one request round trip into the moving average."""
        if self.latency_ewma is None:
            self.latency_ewma = seconds
        else:
            self.latency_ewma += EWMA_WEIGHT * (seconds - self.latency_ewma)

    def describe(self, now: float) -> str:
        """Why this node can or can't take requests, for error messages."""
        text = self.state.value
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
            "connections": {k: pool[k] for k in ("open", "idle", "leased", "opening", "retiring")},
            "in_flight": pool["in_flight"],
            "waiting": pool["waiting"],
            "requests_sent": self.requests_sent,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_ping_rtt": self.last_ping_rtt,
            "latency_ewma": self.latency_ewma,
            "next_reconnect_in": None
            if self.next_reconnect_at is None
            else max(0.0, self.next_reconnect_at - now),
            "breaker": self.breaker.metrics(now),
        }
