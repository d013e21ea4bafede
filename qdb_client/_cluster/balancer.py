"""Load balancing: which of the usable nodes takes the next request.

Both policies see the same candidates (UP nodes, or SUSPECT ones when none
is UP, minus the nodes this request already failed on) and an injected
random source, so they are deterministic under test.

- :class:`RoundRobin` (default): each candidate in turn.
- :class:`LatencyAware`: power of two choices (Finagle, Envoy, MongoDB):
  draw two candidates, keep the one with the lower ``(in_flight + 1) *
  latency``. A slow node accumulates in-flight requests and a high
  average, so it is picked less without ever being starved of probes.
  ``latency`` is the node's load average (replies, and penalties for
  attempts that met silence), raised to the age of its oldest request still
  waiting: a node that stopped answering looks slower with every second,
  before any timeout fires. Streams and subscriptions are not weighed:
  open as long as their consumer wants, neither their slots nor their age
  say how loaded or slow their node is. A node with no estimate yet counts as the
  typical (median) node among the candidates, not as the fastest.

Slow start: a node that just came back from DOWN is accepted with
probability growing linearly from 10% to 100% over ``slow_start`` seconds,
so it isn't hit by the whole load at once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .node import Node

__all__ = ["Balancer", "LatencyAware", "RoundRobin", "load", "make_balancer"]

_MIN_RAMP = 0.1


class Balancer:
    """Interface: choose one node among candidates."""

    name = "abstract"

    def __init__(self, rng: random.Random, *, slow_start: float = 0.0) -> None:
        self.rng = rng
        self.slow_start = slow_start

    def pick(self, candidates: Sequence[Node], now: float) -> Node:
        """One of ``candidates`` (never empty)."""
        raise NotImplementedError

    def ramp(self, node: Node, now: float) -> float:
        """Share of its normal traffic a recovering node takes now (0.1..1)."""
        if self.slow_start <= 0 or node.recovered_at is None:
            return 1.0
        elapsed = now - node.recovered_at
        if elapsed >= self.slow_start:
            return 1.0
        return max(_MIN_RAMP, elapsed / self.slow_start)

    def _accepts(self, node: Node, now: float) -> bool:
        share = self.ramp(node, now)
        return share >= 1.0 or self.rng.random() < share


class RoundRobin(Balancer):
    """Each candidate in turn."""

    name = "round_robin"

    def __init__(self, rng: random.Random, *, slow_start: float = 0.0) -> None:
        super().__init__(rng, slow_start=slow_start)
        self._next = 0

    def pick(self, candidates: Sequence[Node], now: float) -> Node:
        count = len(candidates)
        node = candidates[self._next % count]
        # Never reduced modulo this count: a pick among fewer candidates (a
        # retry or a hedge that excludes nodes) must not send the rotation
        # back to the first node.
        self._next += 1
        if count > 1 and not self._accepts(node, now):
            # Give the turn to another node at random, keeping the rotation
            # as is, so the ramping node gets exactly its share of turns.
            others = [c for c in candidates if c is not node]
            settled = [c for c in others if self.ramp(c, now) >= 1.0]
            node = self.rng.choice(settled or others)
        return node


class LatencyAware(Balancer):
    """Power of two choices by ``(in_flight + 1) * latency``."""

    name = "latency_aware"

    def pick(self, candidates: Sequence[Node], now: float) -> Node:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self.rng.sample(list(candidates), 2)
        if not self._accepts(first, now):
            return second
        if not self._accepts(second, now):
            return first
        typical: float | None = None
        if first.latency_ewma is None or second.latency_ewma is None:
            typical = _typical_latency(candidates)
        return first if load(first, now, typical) <= load(second, now, typical) else second


def load(node: Node, now: float, typical: float | None = None) -> float:
    """What the latency-aware balancer weighs: ``(in_flight + 1) * latency``
    (streams and subscriptions left out of both)."""
    latency = node.latency_ewma
    if latency is None:
        latency = typical if typical is not None else 0.0
    oldest = node.oldest_in_flight()
    if oldest is not None and now - oldest > latency:
        latency = now - oldest
    return (_requests(node) + 1) * (latency + 1e-6)


def _requests(node: Node) -> int:
    """The node's requests in flight, less the slots its streams hold."""
    return node.in_flight - sum(c.feed_slots() for c in node.pool.connections())


def _typical_latency(candidates: Sequence[Node]) -> float | None:
    known = sorted(n.latency_ewma for n in candidates if n.latency_ewma is not None)
    return known[len(known) // 2] if known else None


def make_balancer(name: str, rng: random.Random, *, slow_start: float) -> Balancer:
    """The balancer called ``name`` (``round_robin`` or ``latency_aware``)."""
    for cls in (RoundRobin, LatencyAware):
        if cls.name == name:
            return cls(rng, slow_start=slow_start)
    raise ValueError(f"unknown load balancing policy {name!r}")
