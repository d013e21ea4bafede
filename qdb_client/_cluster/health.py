"""Health probing of one node: heartbeats while UP, quick re-probes while
SUSPECT, reconnection with backoff while DOWN.

- UP: every ``heartbeat_interval`` the node's connections that have been
  silent for that long are pinged (at least one connection per interval).
  A failed or late PONG makes the node SUSPECT.
- SUSPECT: probed every ``suspect_interval`` (0.5 s, MongoDB's floor); each
  failure counts; ``failures_to_down`` consecutive failures make it DOWN.
  A connection failure also makes it SUSPECT with an immediate probe, and a
  probe that can't even connect makes it DOWN at once.
- DOWN: the pool is disabled. A fresh connection is attempted after
  ``reconnect.delay(n)`` (exponential, jittered). Success makes it UP and
  re-enables the pool, whose warm-up is capped at two connections opening at
  once, so a recovering node isn't stampeded; failure waits longer.

Worst-case detection time of a node that stops answering, while UP:
``heartbeat_interval + failures_to_down * ping_timeout +
(failures_to_down - 1) * suspect_interval``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from .._policies import Backoff
from .._transport import Connection
from ..errors import QdbError
from .node import Node, NodeState

__all__ = ["HealthMonitor", "HealthSettings"]


@attrs.frozen(kw_only=True)
class HealthSettings:
    """Timing of health probes (validated by ClientConfig)."""

    heartbeat_interval: float = 5.0
    suspect_interval: float = 0.5
    ping_timeout: float = 2.0
    failures_to_down: int = 3
    reconnect: Backoff = attrs.field(
        factory=lambda: Backoff(initial=1.0, maximum=30.0, multiplier=1.6, factor=0.2)
    )

    def detection_time(self) -> float:
        """Upper bound from a node going silent to it being marked DOWN."""
        n = self.failures_to_down
        return self.heartbeat_interval + n * self.ping_timeout + (n - 1) * self.suspect_interval


class HealthMonitor:
    """Background task owning one node's health transitions."""

    def __init__(
        self,
        node: Node,
        settings: HealthSettings,
        *,
        connect: Callable[[], Awaitable[Connection]],
        rng: random.Random,
        on_change: Callable[[Node], None],
    ) -> None:
        self.node = node
        self.settings = settings
        self._connect = connect
        self._rng = rng
        self._on_change = on_change
        self._wake = trio.Event()
        self._probe_now = False

    # ------------------------------------------------------------ signals

    def connection_failed(self, reason: str) -> None:
        """A connection to the node died: suspect it and probe at once."""
        self.node.failures += 1
        if self.node.state is NodeState.UP:
            self._transition(NodeState.SUSPECT, reason)
        self._probe_now = True
        self._wake.set()

    def connect_failed(self, reason: str) -> None:
        """Opening a connection failed: the node is unreachable."""
        self.node.failures += 1
        if self.node.state is not NodeState.DOWN:
            self._mark_down(reason)
        self._wake.set()

    def force(self, healthy: bool, reason: str = "marked unhealthy by operator") -> None:
        """Operator override: DOWN until marked healthy, or UP now."""
        node = self.node
        node.forced_down = not healthy
        if healthy:
            node.consecutive_failures = 0
            node.reconnect_attempts = 0
            node.next_reconnect_at = None
            self._transition(NodeState.UP, None)
            node.pool.enable()
        else:
            self._mark_down(reason)
        self._wake.set()

    # --------------------------------------------------------------- loop

    async def run(self) -> None:
        """Probe forever (until cancelled by the client's shutdown)."""
        while True:
            node = self.node
            if node.forced_down:
                await self._sleep_until(math.inf)
            elif node.state is NodeState.DOWN:
                await self._reconnect_step()
            elif node.state is NodeState.SUSPECT:
                if not self._probe_now:
                    await self._sleep_until(trio.current_time() + self.settings.suspect_interval)
                self._probe_now = False
                if node.state is NodeState.SUSPECT and not node.forced_down:
                    await self._suspect_probe()
            else:
                await self._sleep_until(trio.current_time() + self.settings.heartbeat_interval)
                if node.state is NodeState.UP and not self._probe_now:
                    await self._heartbeat()

    async def _sleep_until(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._wake.wait()
        self._wake = trio.Event()

    async def _heartbeat(self) -> None:
        silent_since = trio.current_time() - self.settings.heartbeat_interval
        connections = self.node.pool.connections()
        targets = [c for c in connections if c.usable and c.last_received <= silent_since]
        if not targets and connections:
            targets = [c for c in connections if c.usable][:1]
        failures: list[str] = []
        async with trio.open_nursery() as nursery:
            for connection in targets:
                nursery.start_soon(self._ping_connection, connection, failures)
        if failures and self.node.state is NodeState.UP and not self.node.forced_down:
            self.node.consecutive_failures = 1
            if self.settings.failures_to_down <= 1:
                self._mark_down(failures[0])
            else:
                self._transition(NodeState.SUSPECT, failures[0])

    async def _ping_connection(self, connection: Connection, failures: list[str]) -> None:
        reason = await self._ping(connection)
        if reason is not None:
            failures.append(reason)
            self.node.pool.retire(connection)

    async def _ping(self, connection: Connection) -> str | None:
        """Ping once; None on success, else why it failed."""
        with trio.move_on_after(self.settings.ping_timeout):
            try:
                self.node.last_ping_rtt = await connection.ping()
                return None
            except QdbError as exc:
                return f"ping failed: {exc}"
        return f"no PONG within {self.settings.ping_timeout:g} s"

    async def _suspect_probe(self) -> None:
        reason = await self._probe()
        node = self.node
        if node.forced_down or node.state is not NodeState.SUSPECT:
            return  # an operator (or another report) decided while we probed
        if reason is None:
            node.consecutive_failures = 0
            self._transition(NodeState.UP, None)
            node.pool.warm()
            return
        node.consecutive_failures += 1
        if reason.startswith("connect failed") or (
            node.consecutive_failures >= self.settings.failures_to_down
        ):
            self._mark_down(reason)
        else:
            node.reason = reason

    async def _probe(self) -> str | None:
        """Ping over an existing connection, or over a fresh one if none is open."""
        connection = self.node.pool.any_connection()
        if connection is not None:
            return await self._ping(connection)
        try:
            connection = await self._connect()
        except QdbError as exc:
            return f"connect failed: {exc}"
        try:
            return await self._ping(connection)
        finally:
            await connection.aclose()

    async def _reconnect_step(self) -> None:
        node = self.node
        delay = self.settings.reconnect.delay(node.reconnect_attempts, self._rng)
        node.next_reconnect_at = wake_at = trio.current_time() + delay
        # Other failure reports must not cut the backoff short; only a
        # change of state (an operator's mark) does.
        while trio.current_time() < wake_at:
            await self._sleep_until(wake_at)
            if node.state is not NodeState.DOWN or node.forced_down:
                return
        node.next_reconnect_at = None
        reason = await self._probe()
        if node.forced_down or node.state is not NodeState.DOWN:
            return  # marked by an operator while we probed
        if reason is None:
            node.consecutive_failures = 0
            node.reconnect_attempts = 0
            self._transition(NodeState.UP, None)
            node.pool.enable()
        else:
            node.reconnect_attempts += 1
            node.reason = reason

    def _mark_down(self, reason: str) -> None:
        self.node.pool.disable(reason)
        self._transition(NodeState.DOWN, reason)

    def _transition(self, state: NodeState, reason: str | None) -> None:
        if self.node.set_state(state, trio.current_time(), reason):
            self._on_change(self.node)
