"""Health probing of one node: heartbeats while UP, quick re-probes while
SUSPECT, reconnection with backoff while DOWN.

The decisions are the pure state machine's (:mod:`.health_state`); this
module is its trio side: it runs the probes, feeds their results in as
events, and carries out the actions that come back.

- UP: every ``heartbeat_interval`` the node's connections that have been
  silent for that long are pinged (at least one connection per interval).
  A failed or late PONG makes the node SUSPECT. An attempt that met silence
  asks for a heartbeat at once (at most one per ``suspect_interval``), so a
  node that stopped answering is found out before the next interval.
  Answered heartbeats prove the node reachable: a breaker opened by
  connection failures gets to probe at once.
- SUSPECT: probed every ``suspect_interval`` (0.5 s, MongoDB's floor); each
  failure counts; ``failures_to_down`` consecutive failures make it DOWN.
  A connection failure also makes it SUSPECT with an immediate probe, and a
  probe that can't even connect makes it DOWN at once. A probe that must
  open a connection gets twice ``ping_timeout`` for it, or four times the
  node's last connect time if more (a hung handshake is a failed probe, like
  a late PONG), not the whole ``connect_timeout``; one that connects gives
  up the pool's older connects still under way (they are stuck).
- DOWN: the pool is disabled (and abandons the connects under way). A
  fresh connection is attempted after ``reconnect.delay(n)`` (exponential,
  jittered), its connect bounded as a SUSPECT probe's, the bound doubled
  after each reconnect it cut short. Success makes it UP and
  re-enables the pool, whose warm-up is capped at two connections opening at
  once, so a recovering node isn't stampeded; failure waits longer.
- AUTH_FAILED (the node refused the client's credentials): no probe, no
  reconnect, until new credentials clear the mark (:meth:`HealthMonitor.retry_now`).

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
from ..errors import ClientClosed, ConnectionDraining, ConnectTimeout, QdbError
from ..events import EventBus, HeartbeatFailed, HeartbeatSucceeded, NodeStateChanged
from .health_state import Action, HealthEvent, NodeState
from .node import Node

__all__ = ["NO_VERDICT", "HealthMonitor", "HealthSettings"]

#: A ping's result that says nothing of the node (our own close, a drain).
NO_VERDICT = ""


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
    """Background task owning one node's health probes."""

    def __init__(
        self,
        node: Node,
        settings: HealthSettings,
        *,
        connect: Callable[[], Awaitable[Connection]],
        rng: random.Random,
        on_change: Callable[[Node], None],
        events: EventBus | None = None,
    ) -> None:
        self.node = node
        self._events = events or EventBus()
        self.settings = settings
        self._connect = connect
        self._rng = rng
        self._on_change = on_change
        self._wake = trio.Event()
        self._probe_now = False
        self._retry_now = False
        self._last_early_heartbeat = -math.inf
        #: Seconds the last connection a probe opened took (None: none yet).
        self._connect_seconds: float | None = None
        #: Whether the last probe that opened a connection gave up on it at its bound.
        self._cut_short = False
        #: Reconnects in a row whose connect was given up at its bound.
        self._reconnects_cut_short = 0

    # ------------------------------------------------------------ events

    def report(self, event: HealthEvent, reason: str | None = None) -> None:
        """Feed one event to the node's health machine and carry out its actions."""
        node = self.node
        now = trio.current_time()
        previous = node.state
        actions = node.health.handle(event, now, reason)
        if not actions:
            return
        if Action.CHANGED in actions:
            self._events.emit(
                NodeStateChanged(now, node.address, previous.value, node.state.value, node.reason)
            )
        pool = node.pool
        if Action.DISABLE_POOL in actions:
            pool.disable(node.reason or "DOWN")
        if Action.ENABLE_POOL in actions:
            node.next_reconnect_at = None
            pool.enable()
        if Action.WARM_POOL in actions:
            pool.warm()
        if Action.RECOVERED in actions:
            # Requests that failed while it died opened the breaker; a
            # successful reconnect earns it half-open trial requests.
            node.breaker.probe_now(now)
        elif Action.REACHABLE in actions:
            node.breaker.node_reachable(now)
        if Action.CHANGED in actions:
            self._on_change(node)
        if Action.PROBE_NOW in actions:
            self._probe_now = True
            self._wake.set()

    def connection_failed(self, reason: str) -> None:
        """A connection to the node died: suspect it and probe at once."""
        self.report(HealthEvent.CONNECTION_LOST, reason)

    def connect_failed(self, reason: str) -> None:
        """Opening a connection failed: the node is unreachable."""
        self.report(HealthEvent.OPEN_FAILED, reason)

    def retry_now(self) -> None:
        """New credentials: reconnect to a DOWN (or AUTH_FAILED) node at once."""
        self._retry_now = True
        self._wake.set()

    def force(self, healthy: bool, reason: str = "marked unhealthy by operator") -> None:
        """Operator override: DOWN until marked healthy, or UP now."""
        if healthy:
            self.node.consecutive_failures = 0
            self._reconnects_cut_short = 0
            self.report(HealthEvent.MARKED_UP)
        else:
            self.report(HealthEvent.MARKED_DOWN, reason)

    # --------------------------------------------------------------- loop

    async def run(self) -> None:
        """Probe forever (until cancelled by the client's shutdown)."""
        while True:
            node = self.node
            if node.forced_down or (node.auth_failed is not None and node.state is NodeState.DOWN):
                # Refused credentials are never resent: wait for new ones.
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
                await self._up_step()

    async def _up_step(self) -> None:
        start = trio.current_time()
        due = start + self.settings.heartbeat_interval
        while trio.current_time() < due:
            await self._sleep_until(due)
            if self.node.state is not NodeState.UP or self.node.forced_down:
                return
            if self._probe_now:
                self._probe_now = False
                now = trio.current_time()
                if now - self._last_early_heartbeat >= self.settings.suspect_interval:
                    # An attempt met silence: check the node now, not at the interval.
                    self._last_early_heartbeat = now
                    break
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
        if not targets:
            return
        results: list[str | None] = []
        async with trio.open_nursery() as nursery:
            for connection in targets:
                nursery.start_soon(self._ping_connection, connection, results)
        failures = [r for r in results if r]
        now = trio.current_time()
        if failures:
            self._events.emit(HeartbeatFailed(now, self.node.address, failures[0]))
            self.report(HealthEvent.HEARTBEAT_FAILED, failures[0])
        elif None in results:
            self._events.emit(HeartbeatSucceeded(now, self.node.address, self.node.last_ping_rtt))
            self.report(HealthEvent.HEARTBEAT_OK)

    async def _ping_connection(self, connection: Connection, results: list[str | None]) -> None:
        reason = await self._ping(connection)
        results.append(reason)
        if reason:
            self.node.pool.retire(connection)

    async def _ping(self, connection: Connection) -> str | None:
        """Ping once; None on success, else why it failed ("" for no verdict: the
        connection was closed by us or is draining, which says nothing of the node)."""
        with trio.move_on_after(self.settings.ping_timeout):
            try:
                self.node.last_ping_rtt = await connection.ping()
                return None
            except (ClientClosed, ConnectionDraining):
                return NO_VERDICT
            except QdbError as exc:
                return f"ping failed: {exc}"
        return f"no PONG within {self.settings.ping_timeout:g} s"

    async def _suspect_probe(self) -> None:
        # A probe that must open a connection gets ping_timeout for it, as for
        # the PING (or twice what the node's last connection took, if more): a
        # handshake that hangs (its reply lost on a connection a middlebox
        # black-holed) must not keep a node that answers again SUSPECT for all
        # of connect_timeout; the next probe tries a new one.
        reason, connected = await self._probe(connect_within=self._connect_bound())
        if reason == NO_VERDICT:
            return  # the probed connection went away under us: probe again
        if reason is not None:
            self._events.emit(HeartbeatFailed(trio.current_time(), self.node.address, reason))
        if reason is None:
            self.report(HealthEvent.PROBE_OK)
        elif not connected:
            self.report(HealthEvent.PROBE_CONNECT_FAILED, reason)
        else:
            self.report(HealthEvent.PROBE_FAILED, reason)

    def _connect_bound(self) -> float:
        """Seconds a probe gives a connection it opens: twice ``ping_timeout``, or
        four times what the node's last connection took if that is more. (Twice:
        a password login may first wait up to half of it for another login under
        way, see ``Authenticator.begin``.)"""
        within = self.settings.ping_timeout
        for seconds in (self.node.pool.last_connect_seconds, self._connect_seconds):
            if seconds is not None:
                within = max(within, 2 * seconds)
        return 2 * within

    async def _probe(self, connect_within: float | None = None) -> tuple[str | None, bool]:
        """Ping over an existing connection, or over a fresh one if none is open
        (opened within ``connect_within`` seconds if given, else the client's
        ``connect_timeout``).

        Returns (why it failed or None, whether the node was reached at all:
        False when the connection was refused or failed, True when a ping was
        sent or the connect was only slow: still under way at
        ``connect_within``, or past the client's ``connect_timeout``).
        """
        connection = self.node.pool.any_connection()
        if connection is not None:
            return await self._ping(connection), True
        opened: Connection | None = None
        self._cut_short = False
        began = trio.current_time()
        try:
            with trio.move_on_after(math.inf if connect_within is None else connect_within):
                opened = await self._connect()
        except ConnectTimeout as exc:
            # Slow, not refused (connect_timeout came before our bound): a
            # failed probe like one cut short, not a reason for DOWN at once.
            self._cut_short = True
            return f"connect failed: {exc}", True
        except QdbError as exc:
            return f"connect failed: {exc}", False
        self._cut_short = opened is None
        if opened is None:
            return f"no connection within {connect_within:g} s", True
        connection = opened
        self._connect_seconds = trio.current_time() - began
        # This connection opened while older attempts of the pool's are still
        # under way: those are stuck (a lost handshake reply), and would hold
        # the pool's places until connect_timeout, then fail and call the node
        # DOWN. They are given up; the pool opens new ones as it needs them.
        self.node.pool.abandon_connects(started_before=began)
        try:
            return await self._ping(connection), True
        finally:
            await connection.aclose()

    async def _reconnect_step(self) -> None:
        node = self.node
        delay = self.settings.reconnect.delay(node.reconnect_attempts, self._rng)
        if self._retry_now:
            delay, self._retry_now = 0.0, False
        node.next_reconnect_at = wake_at = trio.current_time() + delay
        # Other failure reports must not cut the backoff short; only a
        # change of state (an operator's mark) or new credentials do.
        while trio.current_time() < wake_at and not self._retry_now:
            await self._sleep_until(wake_at)
            if node.state is not NodeState.DOWN or node.forced_down:
                return
            if node.auth_failed is not None:
                return
        self._retry_now = False
        self._probe_now = False
        node.next_reconnect_at = None
        # As a SUSPECT probe, a reconnect gives its connect a short bound (a
        # handshake that hangs is no reason to wait connect_timeout); each one
        # cut short doubles it for the next (connect_timeout still caps it),
        # so a node whose handshakes became slow still gets back.
        within = self._connect_bound() * 2 ** min(self._reconnects_cut_short, 30)
        reason, _ = await self._probe(connect_within=within)
        if self._cut_short and node.state is NodeState.DOWN and not node.forced_down:
            self._reconnects_cut_short += 1
        else:  # (an operator's mark during the probe ends the episode too)
            self._reconnects_cut_short = 0
        if reason == NO_VERDICT:
            return
        if reason is None:
            self.report(HealthEvent.RECONNECTED)
        else:
            self.report(HealthEvent.RECONNECT_FAILED, reason)
        if node.state is NodeState.DOWN:
            self._on_change(node)  # the registry may forget a member that stays gone
