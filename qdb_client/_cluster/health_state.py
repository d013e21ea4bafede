"""The health of one node as a pure state machine fed by events. No trio.

States:

- ``UP``: takes requests.
- ``SUSPECT``: a heartbeat failed or a connection died; probed again quickly.
  Takes requests only when no node is UP.
- ``DOWN``: unreachable or unhealthy; takes no requests. Reconnection is
  attempted in the background with exponential backoff.

Everything that says something about a node's health arrives as a
:class:`HealthEvent` (from the pool: a connection died, an open failed;
from the health monitor's probes: a heartbeat, a probe, a reconnect; from
an attempt that met silence; from an operator), and :meth:`NodeHealth.handle`
answers with the :class:`Action` flags the caller carries out (disable or
re-enable the pool, warm it, probe at once, tell the registry, let the
breaker try again). The transitions live here and only here, in one table
of ``if`` branches per event, in the manner of the circuit breaker.
"""

from __future__ import annotations

import enum

__all__ = ["Action", "HealthEvent", "NodeHealth", "NodeState"]


class NodeState(enum.Enum):
    """Health of a node."""

    UP = "UP"
    SUSPECT = "SUSPECT"
    DOWN = "DOWN"


class HealthEvent(enum.Enum):
    """What happened that bears on a node's health."""

    #: An open connection to the node died (not a GOAWAY, not our own close).
    CONNECTION_LOST = "connection lost"
    #: Opening a connection failed and the node has no other open connection.
    OPEN_FAILED = "open failed"
    #: A connection opened and completed its handshake.
    CONNECTION_OPENED = "connection opened"
    #: Every heartbeat PING of a round was answered.
    HEARTBEAT_OK = "heartbeat ok"
    #: A heartbeat PING went unanswered or failed.
    HEARTBEAT_FAILED = "heartbeat failed"
    #: A probe of a SUSPECT node was answered.
    PROBE_OK = "probe ok"
    #: A probe of a SUSPECT node failed over an existing connection.
    PROBE_FAILED = "probe failed"
    #: A probe of a SUSPECT node could not even connect.
    PROBE_CONNECT_FAILED = "probe connect failed"
    #: A reconnect attempt to a DOWN node succeeded.
    RECONNECTED = "reconnected"
    #: A reconnect attempt to a DOWN node failed.
    RECONNECT_FAILED = "reconnect failed"
    #: A request attempt met silence (its attempt timeout fired).
    ATTEMPT_SILENT = "attempt silent"
    #: An operator marked the node unhealthy.
    MARKED_DOWN = "marked down"
    #: An operator marked the node healthy.
    MARKED_UP = "marked up"


class Action(enum.Flag):
    """What the caller of :meth:`NodeHealth.handle` must do."""

    NONE = 0
    #: Stop the pool serving (the node is DOWN).
    DISABLE_POOL = enum.auto()
    #: Let the pool serve again and re-warm it.
    ENABLE_POOL = enum.auto()
    #: Top the pool up to its minimum now.
    WARM_POOL = enum.auto()
    #: Probe the node now instead of at the next interval.
    PROBE_NOW = enum.auto()
    #: The state changed: the registry recomputes its candidates.
    CHANGED = enum.auto()
    #: The node came back from DOWN: its breaker may probe at once.
    RECOVERED = enum.auto()
    #: The node was just reached: a breaker opened by connection failures may probe.
    REACHABLE = enum.auto()


class NodeHealth:
    """Health state of one node, changed only by :meth:`handle`."""

    def __init__(self, *, failures_to_down: int = 3, now: float = 0.0) -> None:
        self.failures_to_down = failures_to_down
        self.state = NodeState.UP
        #: Why the node is not UP (None when UP).
        self.reason: str | None = None
        #: Time of the last state change.
        self.changed_at = now
        #: Time it last came back UP after being DOWN (for slow start).
        self.recovered_at: float | None = None
        #: Set by an operator: stays DOWN until marked healthy.
        self.forced_down = False
        #: Failed probes in a row (heartbeat, suspect probes).
        self.consecutive_failures = 0
        #: Failed reconnects since it went DOWN.
        self.reconnect_attempts = 0
        #: Every failure report seen (connections lost, opens failed).
        self.failures = 0

    def handle(self, event: HealthEvent, now: float, reason: str | None = None) -> Action:
        """Apply ``event`` (``reason`` says why, for failures); return what to do."""
        state = self.state
        E = HealthEvent
        if event is E.MARKED_UP:
            self.forced_down = False
            self.consecutive_failures = 0
            self.reconnect_attempts = 0
            return self._move(NodeState.UP, now, None) | Action.ENABLE_POOL | Action.PROBE_NOW
        if event is E.MARKED_DOWN:
            self.forced_down = True
            return self._down(now, reason or "marked unhealthy by operator")
        if event is E.CONNECTION_LOST:
            self.failures += 1
            moved = Action.NONE
            if state is NodeState.UP:
                moved = self._move(NodeState.SUSPECT, now, reason)
            return moved | Action.PROBE_NOW
        if event is E.OPEN_FAILED:
            self.failures += 1
            if state is NodeState.DOWN:
                return Action.PROBE_NOW
            return self._down(now, reason) | Action.PROBE_NOW
        if event is E.CONNECTION_OPENED or event is E.HEARTBEAT_OK:
            return Action.REACHABLE
        if event is E.ATTEMPT_SILENT:
            return Action.PROBE_NOW if state is NodeState.UP else Action.NONE
        if self.forced_down:
            return Action.NONE  # an operator decided while the probe was out
        if event is E.HEARTBEAT_FAILED:
            if state is not NodeState.UP:
                return Action.NONE
            self.consecutive_failures = 1
            if self.failures_to_down <= 1:
                return self._down(now, reason)
            return self._move(NodeState.SUSPECT, now, reason)
        if event in (E.PROBE_OK, E.PROBE_FAILED, E.PROBE_CONNECT_FAILED):
            if state is not NodeState.SUSPECT:
                return Action.NONE  # another report decided while we probed
            if event is E.PROBE_OK:
                self.consecutive_failures = 0
                return self._move(NodeState.UP, now, None) | Action.WARM_POOL | Action.REACHABLE
            self.consecutive_failures += 1
            if event is E.PROBE_CONNECT_FAILED or (
                self.consecutive_failures >= self.failures_to_down
            ):
                return self._down(now, reason)
            self.reason = reason
            return Action.NONE
        if event in (E.RECONNECTED, E.RECONNECT_FAILED):
            if state is not NodeState.DOWN:
                return Action.NONE
            if event is E.RECONNECTED:
                self.consecutive_failures = 0
                self.reconnect_attempts = 0
                return self._move(NodeState.UP, now, None) | Action.ENABLE_POOL
            self.reconnect_attempts += 1
            self.reason = reason
            return Action.NONE
        raise AssertionError(f"unhandled health event {event}")

    def _down(self, now: float, reason: str | None) -> Action:
        return self._move(NodeState.DOWN, now, reason) | Action.DISABLE_POOL

    def _move(self, state: NodeState, now: float, reason: str | None) -> Action:
        previous = self.state
        self.reason = None if state is NodeState.UP else reason
        if state is previous:
            return Action.NONE
        self.state = state
        self.changed_at = now
        if state is NodeState.UP and previous is NodeState.DOWN:
            self.recovered_at = now
            return Action.CHANGED | Action.RECOVERED
        return Action.CHANGED
