"""Decisions of one node's connection pool, as plain synchronous code.

No trio here: time comes in as ``now`` and the methods return what to do
(open one more connection, close these). The trio wrapper in ``_pool.py``
carries the decisions out.

Request counts are not kept here: each record reads them from its
connection's ledger (an object with ``in_flight`` and ``max_in_flight``,
the transport's Connection in production), which also counts requests the
pool never saw end, such as orphans of cancelled callers. So the pool and
the connection can never disagree about room. Invariants, checked by the
stateful tests:

- open + opening connections never exceed ``max_connections``, and at most
  ``max_connecting`` are being opened at once;
- a connection is handed out only when its ledger has room;
- an exclusively leased connection carries nothing else, and a lease is
  returned exactly once;
- a connection idle for ``idle_timeout`` (beyond ``min_connections``) or
  older than ``max_lifetime`` is closed, but never while requests are on it:
  an old busy connection is *retired* (no new requests) and closed when it
  drains.
"""

from __future__ import annotations

from typing import Protocol

import attrs

__all__ = ["ConnectionRecord", "Ledger", "PoolLimits", "PoolState"]


class Ledger(Protocol):
    """The request counts of one connection, as its owner keeps them."""

    @property
    def in_flight(self) -> int:
        """Request slots taken."""
        ...

    @property
    def orphaned(self) -> int:
        """Slots held by requests whose callers gave up (awaiting the node's word)."""
        ...

    @property
    def pinned(self) -> int:
        """Feeds that live on it without a request slot (established subscriptions)."""
        ...

    @property
    def max_in_flight(self) -> int:
        """Request slots the connection has."""
        ...

    def has_room(self) -> bool:
        """Whether one more request may go on it now."""
        ...


@attrs.frozen(kw_only=True)
class PoolLimits:
    """Sizes and ages of one node's pool (validated by ClientConfig)."""

    min_connections: int = 1
    max_connections: int = 8
    max_connecting: int = 2
    idle_timeout: float = 60.0
    max_lifetime: float = 1800.0


@attrs.define(kw_only=True)
class ConnectionRecord:
    """What the pool knows of one open connection."""

    id: int
    opened_at: float
    last_used: float
    ledger: Ledger
    leased: bool = False
    retiring: bool = False

    @property
    def reserved(self) -> int:
        """Requests on it now (read from its ledger)."""
        return self.ledger.in_flight

    @property
    def capacity(self) -> int:
        """Requests it can carry at once (read from its ledger)."""
        return self.ledger.max_in_flight

    @property
    def idle(self) -> bool:
        """No live request or subscription on it, and not leased.

        Orphans don't count: nobody waits for them, and closing the
        connection ends them on the node as well.
        """
        ledger = self.ledger
        return ledger.in_flight == ledger.orphaned and not ledger.pinned and not self.leased

    @property
    def shareable(self) -> bool:
        """May take one more multiplexed request."""
        return not self.leased and not self.retiring and self.ledger.has_room()


class PoolState:
    """Bookkeeping and decisions for one node's pool."""

    def __init__(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.connections: dict[int, ConnectionRecord] = {}
        self.opening = 0

    # --------------------------------------------------------------- counts

    @property
    def active(self) -> int:
        """Open connections that still take new work."""
        return sum(1 for c in self.connections.values() if not c.retiring)

    @property
    def reserved(self) -> int:
        """Requests currently reserved across all connections."""
        return sum(c.reserved for c in self.connections.values())

    @property
    def leased(self) -> int:
        """Connections under an exclusive lease."""
        return sum(1 for c in self.connections.values() if c.leased)

    @property
    def idle(self) -> int:
        """Open connections with nothing on them."""
        return sum(1 for c in self.connections.values() if c.idle)

    # ------------------------------------------------------------ decisions

    def can_open(self) -> bool:
        """Whether one more connection may be opened now."""
        total = len(self.connections) + self.opening
        return total < self.limits.max_connections and self.opening < self.limits.max_connecting

    def deficit(self) -> int:
        """Connections to open to reach ``min_connections`` (counting those opening)."""
        return max(0, self.limits.min_connections - self.active - self.opening)

    def pick_shared(self) -> ConnectionRecord | None:
        """The connection for one more multiplexed request, or None.

        Packs requests onto the busiest connection that has room, so that
        surplus connections go idle and expire instead of all staying warm.
        """
        best: ConnectionRecord | None = None
        for record in self.connections.values():
            if record.shareable and (best is None or record.reserved > best.reserved):
                best = record
        return best

    def pick_exclusive(self) -> ConnectionRecord | None:
        """An idle connection that can be leased exclusively, or None."""
        for record in self.connections.values():
            if record.idle and not record.retiring:
                return record
        return None

    def expired(self, now: float) -> list[int]:
        """Retire what is too old, and return the ids to close now."""
        # Same sums as next_expiry, so waking at that time always acts
        # (now - t >= d can be False at now == t + d in floating point).
        for record in self.connections.values():
            if not record.retiring and now >= record.opened_at + self.limits.max_lifetime:
                record.retiring = True
        # Retire first, then count spares: a retired connection no longer
        # stands for min_connections.
        spare = self.active - self.limits.min_connections
        close: list[int] = []
        for record in sorted(self.connections.values(), key=lambda r: r.last_used):
            if record.retiring:
                if record.idle:
                    close.append(record.id)
            elif record.idle and spare > 0 and now >= record.last_used + self.limits.idle_timeout:
                close.append(record.id)
                spare -= 1
        return close

    def next_expiry(self, now: float) -> float | None:
        """The earliest time ``expired`` could close or retire something."""
        times = []
        spare = self.active > self.limits.min_connections
        for record in self.connections.values():
            if not record.retiring:
                times.append(record.opened_at + self.limits.max_lifetime)
                if spare and record.idle:
                    times.append(record.last_used + self.limits.idle_timeout)
        return min(times, default=None)

    # --------------------------------------------------------------- events

    def open_started(self) -> None:
        """A connection attempt began."""
        if not self.can_open():
            raise AssertionError("open_started beyond the pool's limits")
        self.opening += 1

    def open_finished(
        self, connection_id: int | None, now: float, ledger: Ledger | None = None
    ) -> None:
        """A connection attempt ended, successfully if ``connection_id`` is given
        (then ``ledger`` is the new connection's request counts)."""
        self.opening -= 1
        if connection_id is not None:
            if ledger is None:
                raise AssertionError("an opened connection needs its ledger")
            self.connections[connection_id] = ConnectionRecord(
                id=connection_id, opened_at=now, last_used=now, ledger=ledger
            )

    def touch(self, connection_id: int, now: float) -> None:
        """A request went on, or came off, this connection."""
        record = self.connections.get(connection_id)
        if record is not None:
            record.last_used = now

    def lease(self, connection_id: int, now: float) -> None:
        """Hand the whole connection to one owner."""
        record = self.connections[connection_id]
        if not record.idle or record.retiring:
            raise AssertionError(f"connection {connection_id} is not free to lease")
        record.leased = True
        record.last_used = now

    def return_lease(self, connection_id: int, now: float, *, reusable: bool) -> None:
        """The owner is done; an unusable (dirty) connection is retired."""
        record = self.connections.get(connection_id)
        if record is None:
            return
        if not record.leased:
            raise AssertionError(f"connection {connection_id} returned twice")
        record.leased = False
        record.last_used = now
        if not reusable:
            record.retiring = True

    def retire(self, connection_id: int) -> None:
        """No new work for this connection (draining, or found broken)."""
        record = self.connections.get(connection_id)
        if record is not None:
            record.retiring = True

    def closed(self, connection_id: int) -> None:
        """The connection is gone."""
        self.connections.pop(connection_id, None)
