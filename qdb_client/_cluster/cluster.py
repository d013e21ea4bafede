"""The node registry: nodes, their pools and health monitors, node selection.

Nodes come from the configured hosts and from the members a node announces
in WELCOME (deduplicated by node id, at most ``max_members`` nodes in all).
A discovered member that no WELCOME has announced for ``forget_after``
seconds and that has been DOWN that long is forgotten: its pool, monitor
and reconnect loop stop. Configured hosts are never forgotten.
``select()`` asks the balancer for a node among the usable ones and waits,
at most ``node_selection_timeout``, for one to become usable before
raising NoAvailableNode with each node's state and reason; that selection
is :class:`.selection.NodeSelector`, which ``Cluster`` inherits.

Pool events reach each node's health monitor as health events (the pure
machine of :mod:`.health_state` decides what they mean).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from .._policies import BreakerSettings, BreakerState
from .._pool import NodePool, PoolLimits, PoolListener
from .._transport import Connection, ConnectionListener
from ..config import parse_address
from ..errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidArgument,
    QdbError,
    TlsError,
)
from ..events import (
    AuthenticationRefused,
    BreakerStateChanged,
    EventBus,
    MemberAdded,
    MemberForgotten,
    MemberSkipped,
)
from .balancer import Balancer
from .health import HealthMonitor, HealthSettings
from .health_state import HealthEvent
from .node import Node, NodeState
from .selection import NodeSelector, again

__all__ = ["Cluster", "ClusterSettings"]

#: Announced members reported as skipped (each once) at most.
_MAX_SKIPPED_REPORTED = 256

#: Opens a connection to an address; the listener hears what happens to it.
Connect = Callable[[str, ConnectionListener | None], Awaitable[Connection]]


@attrs.frozen(kw_only=True)
class ClusterSettings:
    """Everything the registry needs from ClientConfig."""

    pool: PoolLimits
    health: HealthSettings
    breaker: BreakerSettings = attrs.field(factory=BreakerSettings)
    acquire_timeout: float
    max_waiters: int
    selection_timeout: float
    startup_timeout: float
    discover_members: bool = True
    #: Nodes known at most (configured ones included); more announced members are skipped.
    max_members: int = 64
    #: Seconds a discovered member may stay DOWN and unannounced before it is forgotten.
    forget_after: float = 60.0
    #: Hosts (lower case) an announced member must be on to be used: those of the
    #: configured addresses, when the client has credentials to protect. None: any.
    trusted_hosts: frozenset[str] | None = None


class _NodeListener(PoolListener):
    """Routes pool events of one node to its monitor and the registry."""

    node: Node

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def opened(self, pool: NodePool, connection: Connection) -> None:
        self.cluster._on_opened(self.node, connection)
        monitor = self.cluster._monitors.get(self.node.address)
        if monitor is not None:
            monitor.report(HealthEvent.CONNECTION_OPENED)

    def open_failed(self, pool: NodePool, error: QdbError) -> None:
        monitor = self.cluster._monitors.get(self.node.address)
        if monitor is None:
            return  # the node was merged into another one meanwhile
        if pool.any_connection() is not None:
            # The node works over the connections it has; it only refused
            # one more (e.g. CAPACITY_EXCEEDED). Not a reason to call it DOWN.
            return
        monitor.connect_failed(f"connect failed: {error}")
        self.cluster._changed()

    def connection_failed(self, pool: NodePool, connection: Connection) -> None:
        monitor = self.cluster._monitors.get(self.node.address)
        if monitor is not None:
            monitor.connection_failed(f"connection lost: {connection.error}")
            self.cluster._changed()


class Cluster(NodeSelector):
    """All known nodes of one client."""

    def __init__(
        self,
        settings: ClusterSettings,
        *,
        connect: Connect,
        nursery: trio.Nursery,
        balancer: Balancer,
        rng: random.Random,
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        #: Where the cluster's events go (listeners and the qdb_client loggers).
        self.events = events or EventBus()
        self.balancer = balancer
        self.nodes: list[Node] = []
        self._connect = connect
        self._nursery = nursery
        self._rng = rng
        self._by_address: dict[str, Node] = {}
        self._monitors: dict[str, HealthMonitor] = {}
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        #: Cached ``candidates()`` without exclusions; None when stale.
        self._live: list[Node] | None = None
        #: Nodes whose breaker is not CLOSED (none: every breaker admits, so the
        #: request path need not ask each one).
        self._not_closed: set[Node] = set()
        #: Pools of nodes merged into another (closed with the client).
        self._merged_pools: list[NodePool] = []
        #: Announced members not added because ``max_members`` nodes are known.
        self.members_skipped = 0
        #: Discovered members forgotten after staying DOWN and unannounced.
        self.members_forgotten = 0
        #: Announced members not used because their host is not trusted with the
        #: credentials (``trust_announced_members``), by address (each reported once).
        self.untrusted_members: dict[str, str | None] = {}
        self._reported_skips: set[str] = set()
        #: Counts ``clear_auth_failures`` (new credentials): a refusal of an attempt
        #: that began before the last one is about credentials no longer in use.
        self._credentials_epoch = 0

    # ------------------------------------------------------------ registry

    def add_node(
        self, address: str, node_id: str | None = None, *, configured: bool = False
    ) -> Node:
        """Register a node and start its pool maintenance and health monitor.

        ``configured``: named in the client's hosts (kept over an alias
        learnt from a member list when both turn out to be one node).
        """
        existing = self._by_address.get(address)
        if existing is not None:
            return existing
        listener = _NodeListener(self)
        pool = NodePool(
            address,
            self.settings.pool,
            connect=functools.partial(self.connect, address),
            nursery=self._nursery,
            acquire_timeout=self.settings.acquire_timeout,
            max_waiters=self.settings.max_waiters,
            listener=listener,
            events=self.events,
        )
        now = trio.current_time()
        node = listener.node = Node(
            address,
            pool,
            node_id=node_id,
            breaker=self.settings.breaker,
            failures_to_down=self.settings.health.failures_to_down,
            now=now,
        )
        node.configured = configured
        if not configured:
            node.announced_at = now
        node.tasks = trio.CancelScope()
        monitor = HealthMonitor(
            node,
            self.settings.health,
            connect=functools.partial(self.connect, address, None),
            rng=self._rng,
            on_change=self._on_health_change,
            events=self.events,
        )
        node.breaker.on_transition = functools.partial(self._breaker_moved, node)
        self.nodes.append(node)
        self._by_address[address] = node
        self._monitors[address] = monitor
        self._live = None
        self._nursery.start_soon(self._run_node, node, monitor)
        pool.warm()
        return node

    async def _run_node(self, node: Node, monitor: HealthMonitor) -> None:
        """A node's background tasks, in the scope ``_remove`` cancels."""
        assert node.tasks is not None
        with node.tasks:  # cancelled before it starts? then it ends at once
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node.pool.maintain)
                nursery.start_soon(monitor.run)

    def _remove(self, node: Node, alias_of: Node) -> None:
        """Forget ``node``: it is ``alias_of`` under another address.

        Its pool stops taking work; requests already on its connections
        finish (the connections close as they drain) and nothing it does
        reaches the registry any more.
        """
        node.pool.set_listener(PoolListener())
        node.pool.disable(f"same node as {alias_of.address}")
        if node.tasks is not None:
            node.tasks.cancel()
        self._merged_pools.append(node.pool)
        self.nodes.remove(node)
        node.breaker.on_transition = None  # attempts still on it no longer count here
        self._not_closed.discard(node)
        self._monitors.pop(node.address, None)
        self._by_address[node.address] = alias_of
        self._changed()

    async def connect(self, address: str, listener: ConnectionListener | None = None) -> Connection:
        """Open a connection to ``address`` (every connection of the client goes
        through here: pools, health probes, session refreshes).

        A node marked AUTH_FAILED is not contacted at all: its refusal is
        raised again at once, so refused credentials are never resent. A new
        refusal marks the node, unless the credentials were replaced since
        the attempt began (the marks were cleared for the new ones).
        """
        node = self._by_address.get(address)
        if node is not None and node.auth_failed is not None:
            await trio.lowlevel.checkpoint()
            raise again(node.auth_failed)
        epoch = self._credentials_epoch
        try:
            return await self._connect(address, listener)
        except AuthenticationFailed as exc:
            if node is not None and node in self.nodes and epoch == self._credentials_epoch:
                self._mark_auth_failed(node, exc)
            raise

    def _mark_auth_failed(self, node: Node, error: AuthenticationFailed) -> None:
        first = node.auth_failed is None
        node.auth_failed = error
        if first:
            self.events.emit(AuthenticationRefused(trio.current_time(), node.address, str(error)))
        self._changed()

    def clear_auth_failures(self) -> list[Node]:
        """Forget every AUTH_FAILED mark (new credentials); return the nodes that had one."""
        self._credentials_epoch += 1
        cleared = [node for node in self.nodes if node.auth_failed is not None]
        for node in cleared:
            node.auth_failed = None
            monitor = self._monitors.get(node.address)
            if monitor is not None:
                monitor.retry_now()
        self._changed()
        return cleared

    def trusts(self, address: str) -> bool:
        """Whether an announced member at ``address`` may get the client's credentials."""
        hosts = self.settings.trusted_hosts
        if hosts is None:
            return True
        try:
            host = parse_address(address)[0]
        except ConfigError:
            return False
        return host.lower() in hosts

    def enforce_member_trust(self) -> None:
        """Forget discovered members the trust policy no longer admits (the client
        got credentials after they were added)."""
        for node in list(self.nodes):
            if not node.configured and not self.trusts(node.address):
                self.untrusted_members.setdefault(node.address, node.node_id)
                self._forget(node)

    def find(self, ref: str) -> Node:
        """The node with this address or node id."""
        if not isinstance(ref, str):
            raise InvalidArgument(f"a node is named by its address or node id, not {ref!r}")
        node = self._by_address.get(ref)
        if node is None:
            node = next((n for n in self.nodes if n.node_id == ref), None)
        if node is None:
            known = [f"{n.address} ({n.node_id})" for n in self.nodes]
            raise ConfigError(f"no node {ref!r}; known nodes: {known}")
        return node

    def statistics_totals(self) -> dict[str, Any]:
        """Registry counters: members skipped by the cap, members forgotten, members
        not trusted with the credentials (and their addresses)."""
        return {
            "members_skipped": self.members_skipped,
            "members_forgotten": self.members_forgotten,
            "members_untrusted": len(self.untrusted_members),
            "untrusted_members": sorted(self.untrusted_members),
        }

    def mark(self, ref: str, *, healthy: bool) -> None:
        """Operator override of a node's health."""
        node = self.find(ref)
        self._monitors[node.address].force(healthy)
        self._changed()

    def _on_opened(self, node: Node, connection: Connection) -> None:
        welcome = connection.welcome
        if welcome is None or node not in self.nodes:
            return
        node.node_id = welcome.node_id
        twin = next((n for n in self.nodes if n is not node and n.node_id == node.node_id), None)
        if twin is not None:
            # One node reached under two addresses (say localhost and
            # 127.0.0.1): keep the configured one, else the older.
            keep, drop = (node, twin) if node.configured and not twin.configured else (twin, node)
            self._remove(drop, alias_of=keep)
            if drop is node:
                return
        if self.settings.discover_members:
            self._learn_members(welcome.members)
        self._changed()

    def _learn_members(self, members: Sequence[Any]) -> None:
        now = trio.current_time()
        by_id = {n.node_id: n for n in self.nodes if n.node_id is not None}
        for member in members:
            known = by_id.get(member.node_id) or self._by_address.get(member.address)
            if known is not None:
                known.announced_at = now
                continue
            try:
                parse_address(member.address)
            except ConfigError:
                continue  # a node announced something that isn't host:port
            if not self.trusts(member.address):
                # Credentials go only where the user said: an announcement is
                # no proof (docs/security.md). Not used; reported once.
                if len(self.untrusted_members) < _MAX_SKIPPED_REPORTED:
                    self.untrusted_members.setdefault(member.address, member.node_id)
                self._skipped(
                    member,
                    "its host is not one of the configured hosts, so the client's"
                    " credentials are not sent there (trust_announced_members=False)",
                )
                continue
            if len(self.nodes) >= self.settings.max_members:
                self.members_skipped += 1
                self._skipped(member, f"max_members ({self.settings.max_members}) are known")
                continue
            by_id[member.node_id] = self.add_node(member.address, member.node_id)
            self.events.emit(MemberAdded(now, member.address, member.node_id))

    def _skipped(self, member: Any, reason: str) -> None:
        if member.address in self._reported_skips:
            return
        if len(self._reported_skips) < _MAX_SKIPPED_REPORTED:
            self._reported_skips.add(member.address)
            self.events.emit(
                MemberSkipped(trio.current_time(), member.address, member.node_id, reason)
            )

    def _breaker_moved(
        self, node: Node, previous: BreakerState, state: BreakerState, now: float
    ) -> None:
        self._lot.unpark_all()  # callers waiting for an admitting breaker look again
        if state is BreakerState.CLOSED:
            self._not_closed.discard(node)
        else:
            self._not_closed.add(node)
        self.events.emit(
            BreakerStateChanged(
                now,
                node.address,
                previous.value,
                state.value,
                tuple(sorted(node.breaker.opened_by)) if state is BreakerState.OPEN else (),
            )
        )

    def _on_health_change(self, node: Node) -> None:
        self._changed()
        if (
            not node.configured
            and node.state is NodeState.DOWN
            and node in self.nodes
            and not node.forced_down
        ):
            now = trio.current_time()
            window = self.settings.forget_after
            announced = node.announced_at if node.announced_at is not None else -window
            if now - node.changed_at >= window and now - announced >= window:
                self._forget(node)

    def _forget(self, node: Node) -> None:
        """Stop tracking a discovered member that is gone (DOWN and unannounced)."""
        self.members_forgotten += 1
        self.events.emit(MemberForgotten(trio.current_time(), node.address))
        node.pool.set_listener(PoolListener())
        node.pool.disable("forgotten: no longer announced by the cluster")
        if node.tasks is not None:
            node.tasks.cancel()
        self.nodes.remove(node)
        node.breaker.on_transition = None  # attempts still on it no longer count here
        self._not_closed.discard(node)
        self._monitors.pop(node.address, None)
        self._by_address.pop(node.address, None)
        self._nursery.start_soon(node.pool.abandon, "no longer announced and DOWN")
        self._changed()

    def report_silence(self, node: Node) -> None:
        """An attempt on ``node`` met silence: its monitor checks it now."""
        monitor = self._monitors.get(node.address)
        if monitor is not None:
            monitor.report(HealthEvent.ATTEMPT_SILENT)

    def _changed(self) -> None:
        self._live = None
        self._lot.unpark_all()

    # ------------------------------------------------------------ lifecycle

    async def start(self, hosts: Sequence[str]) -> None:
        """Register ``hosts`` and wait until one of them holds a connection."""
        for address in hosts:
            self.add_node(address, configured=True).pool.ensure_connection()
        with trio.move_on_after(self.settings.startup_timeout):
            while True:
                if any(node.pool.state.connections for node in self.nodes):
                    return
                if all(node.state is NodeState.DOWN for node in self.nodes):
                    break
                await self._lot.park()
        refused = [node.auth_failed for node in self.nodes if node.auth_failed is not None]
        if refused:
            # Wrong credentials are final: say so, not "no available node".
            raise again(refused[0])
        tls_errors = [
            e for node in self.nodes if isinstance(e := node.pool.last_open_error, TlsError)
        ]
        if (
            self.nodes
            and len(tls_errors) == len(self.nodes)
            and not any(e.retryable for e in tls_errors)
        ):  # a TLS configuration problem on every node: say which
            raise again(tls_errors[0])
        raise self._no_node()

    async def aclose(self) -> None:
        """Close every pool; the owner cancels the background tasks after."""
        self._closed = True
        self._changed()
        for pool in [node.pool for node in self.nodes] + self._merged_pools:
            await pool.aclose()

    def statistics(self) -> list[dict[str, Any]]:
        """Per-node snapshots."""
        now = trio.current_time()
        return [node.statistics(now) for node in self.nodes]
