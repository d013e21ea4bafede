"""Node selection of :class:`~.cluster.Cluster`: which nodes may take a request,
which one does, and what to raise when none can.

Candidates are the UP nodes, else the SUSPECT ones, those a call already
failed on last. ``select_now`` picks among them without waiting (the request
path's fast way); ``select`` waits, at most ``node_selection_timeout``, for a
node to become usable and whose circuit breaker admits, failing fast with
CircuitOpen when every breaker is OPEN and with NoAvailableNode (each node's
state and reason) when no node comes. ``has_alternative`` and
``may_open_on_silence`` answer the breakers' question of whether another node
is there to take the load.

This is a policy over the registry's state, not a part of keeping it: the
registry (:mod:`.cluster`) adds, merges and forgets nodes and tracks their
health; it inherits these methods and sets the state they read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

import trio

from .._policies import BreakerState
from ..errors import CircuitOpen, ClientClosed, NoAvailableNode, QdbError
from .balancer import Balancer
from .node import Node, NodeState

if TYPE_CHECKING:
    from .cluster import ClusterSettings

__all__ = ["NodeSelector", "again"]

E = TypeVar("E", bound=QdbError)

#: Seconds between looks at a HALF_OPEN breaker whose probes are all out.
_PROBE_POLL = 0.05


class NodeSelector:
    """The node selection of :class:`~.cluster.Cluster` (its state is set there)."""

    settings: ClusterSettings
    balancer: Balancer
    nodes: list[Node]
    _lot: trio.lowlevel.ParkingLot
    _closed: bool
    #: Cached ``candidates()`` without exclusions; None when stale.
    _live: list[Node] | None
    #: Nodes whose breaker is not CLOSED.
    _not_closed: set[Node]

    # ------------------------------------------------------------ selection

    def candidates(self, exclude: Sequence[Node] = ()) -> list[Node]:
        """Nodes that may take a request: UP ones, else SUSPECT ones.

        Nodes in ``exclude`` (already failed this request) are used only if
        nothing else is left.
        """
        if not exclude:
            # The common case, cached until a node changes state.
            if self._live is None:
                self._live = self._compute_candidates(())
            return self._live
        return self._compute_candidates(exclude)

    def _compute_candidates(self, exclude: Sequence[Node]) -> list[Node]:
        for pool in (
            [n for n in self.nodes if n.state is NodeState.UP and n not in exclude],
            [n for n in self.nodes if n.state is NodeState.SUSPECT and n not in exclude],
            [n for n in self.nodes if n.state is NodeState.UP],
            [n for n in self.nodes if n.state is NodeState.SUSPECT],
        ):
            if pool:
                return pool
        return []

    def select_now(self, exclude: Sequence[Node], now: float) -> Node | None:
        """The node :meth:`select` would return without waiting at trio time
        ``now``, or None when it would wait or fail (then call it, and it will).
        No checkpoint."""
        if self._closed:
            return None
        candidates = self.candidates(exclude)
        if self._not_closed:
            candidates = [n for n in candidates if n.breaker.would_allow(now)]
        return self.balancer.pick(candidates, now) if candidates else None

    async def select(self, exclude: Sequence[Node] = ()) -> Node:
        """A node for the next attempt, waiting for one to come UP if needed.

        Fails fast with CircuitOpen when every usable node's breaker is OPEN;
        when one is HALF_OPEN with its probes in flight, waits (at most
        ``node_selection_timeout``) for a probe to finish instead.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        candidates = self.candidates(exclude)
        if candidates and not self._closed:
            node = self._admit(candidates, exclude)  # fast path, no timer
            if node is not None:
                return node
        refused = [n.auth_failed for n in self.nodes if n.auth_failed is not None]
        if not candidates and refused and len(refused) == len(self.nodes):
            raise again(refused[0])  # every node refused us: waiting can't help
        busy_probes = False
        with trio.move_on_after(self.settings.selection_timeout):
            while True:
                if self._closed:
                    raise ClientClosed("the client is closed")
                candidates = self.candidates(exclude)
                if candidates:
                    node = self._admit(candidates, exclude)
                    if node is not None:
                        return node
                    busy_probes = True
                    # A probe's end frees its slot without a state change: look again soon.
                    with trio.move_on_after(_PROBE_POLL):
                        await self._lot.park()
                else:
                    await self._lot.park()
        if busy_probes:
            raise self._circuit_open(self.candidates(exclude), trio.current_time())
        raise self._no_node()

    def _admit(self, candidates: list[Node], exclude: Sequence[Node]) -> Node | None:
        """Pick among candidates whose breaker admits; fail fast if every breaker is
        OPEN; None when the only hope is a HALF_OPEN breaker whose probes are busy."""
        now = trio.current_time()
        admitted = [n for n in candidates if n.breaker.would_allow(now)]
        if not admitted:
            admitted = self._any_admitting(now)
            # No node left to be slower than: breakers that silence alone opened
            # are probed again (every one of them, hence the list).
            if not admitted and any([n.breaker.rejudge(now) for n in self._usable()]):
                admitted = self._any_admitting(now)
        if admitted:
            return self.balancer.pick(admitted, now)
        if any(
            n.breaker.state(now) is BreakerState.HALF_OPEN
            for n in self.nodes
            if n.state is not NodeState.DOWN
        ):
            return None
        raise self._circuit_open(candidates, now)

    def _usable(self) -> list[Node]:
        return [n for n in self.nodes if n.state is not NodeState.DOWN]

    def _any_admitting(self, now: float) -> list[Node]:
        """Nodes not DOWN whose breaker admits, UP ones first: nodes a call already
        failed on are still better than none, and a SUSPECT node beats failing fast."""
        admitted = [n for n in self._usable() if n.breaker.would_allow(now)]
        up = [n for n in admitted if n.state is NodeState.UP]
        return up or admitted

    def _circuit_open(self, candidates: list[Node], now: float) -> CircuitOpen:
        for node in candidates:
            node.breaker.record_rejection()
        reopens = {n.address: max(0.0, (n.breaker.reopens_at() or now) - now) for n in candidates}
        listing = ", ".join(f"{a} reopens in {t:.2f} s" for a, t in reopens.items())
        return CircuitOpen(
            f"circuit breakers open for every usable node ({listing})", reopens_in=reopens
        )

    def _no_node(self) -> NoAvailableNode:
        now = trio.current_time()
        errors: dict[str, BaseException] = {}
        for node in self.nodes:
            if node.pool.last_open_error is not None:
                errors[node.address] = node.pool.last_open_error
        return NoAvailableNode({node.address: node.describe(now) for node in self.nodes}, errors)

    def has_alternative(self, node: Node, tried: Sequence[Node], now: float) -> bool:
        """Whether a candidate other than ``node`` and those in ``tried`` exists
        whose breaker would admit a request at trio time ``now``."""
        if not tried and not self._not_closed:
            # Every breaker is CLOSED, so any other candidate would do.
            candidates = self.candidates(())
            return len(candidates) > 1 or (len(candidates) == 1 and candidates[0] is not node)
        candidates = self.candidates(tried)
        if not tried and len(candidates) == 2 and node in candidates:
            # The common case (cached candidates): a glance at the other node.
            other = candidates[1] if candidates[0] is node else candidates[0]
            return other.breaker.would_allow(now)
        return any(
            n is not node and n not in tried and n.breaker.would_allow(now) for n in candidates
        )

    def may_open_on_silence(self, node: Node) -> bool:
        """Whether silence on ``node`` may open its breaker: only beside another
        candidate whose breaker is CLOSED (a HALF_OPEN one has proved nothing yet).
        When there is none, the nodes that silence alone shut out are probed again
        (their breakers go HALF_OPEN): the node going silent now may be the slow
        one, and one of them may have recovered.
        """
        now = trio.current_time()
        if any(
            other is not node and other.breaker.state(now) is BreakerState.CLOSED
            for other in self.candidates(())
        ):
            return True
        for other in self._usable():
            if other is not node:
                other.breaker.rejudge(now)
        return False


def again(error: E) -> E:
    """A fresh copy of a recorded refusal for one more caller (the original as cause)."""
    fresh = error.__class__.__new__(error.__class__)
    fresh.__dict__.update(error.__dict__)
    fresh.args = error.args
    fresh.__cause__ = error
    return fresh
