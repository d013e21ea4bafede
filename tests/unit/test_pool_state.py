"""PoolState: the pure decisions of one node's pool, as a state machine and by example.

Request counts live in each connection's ledger (the transport connection in
production); here a :class:`FakeLedger` stands in, and ``reserve``/``release``
move its count the way a connection does, touching the record as the pool does.

Times in the state machine are multiples of 1/4 second so that every sum and
difference is exact in binary floating point: the checks are exact
comparisons, not approximations. (Arbitrary float times are probed by a
separate property test below.)
"""

from __future__ import annotations

import math

import attrs
import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from qdb_client._pool import PoolLimits, PoolState

#: Durations: small multiples of 1/4 s, so sums and differences are exact.
DURATIONS = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0])
STEPS = st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0])


def before(t: float) -> float:
    """The float just before ``t``: one tick earlier."""
    return math.nextafter(t, -math.inf)


class FakeLedger:
    """The request counts of one stand-in connection."""

    def __init__(self, capacity: int = 1) -> None:
        self.in_flight = 0
        self.orphaned = 0
        self.pinned = 0
        self.max_in_flight = max(1, capacity)

    def has_room(self) -> bool:
        return self.in_flight < self.max_in_flight


def reserve(state: PoolState, connection_id: int, now: float) -> None:
    """One request goes on the connection, as the pool does it: only where there is room."""
    record = state.connections[connection_id]
    if not record.shareable:
        raise AssertionError(f"connection {connection_id} has no room")
    record.ledger.in_flight += 1  # type: ignore[misc]
    state.touch(connection_id, now)


def release(state: PoolState, connection_id: int, now: float) -> None:
    """A request's reply came (a no-op if the connection closed meanwhile)."""
    record = state.connections.get(connection_id)
    if record is None:
        return
    if record.ledger.in_flight <= 0:
        raise AssertionError(f"release without reserve on connection {connection_id}")
    record.ledger.in_flight -= 1  # type: ignore[misc]
    state.touch(connection_id, now)


def open_connection(state: PoolState, connection_id: int, now: float, capacity: int = 1) -> None:
    state.open_started()
    state.open_finished(connection_id, now, FakeLedger(capacity))


def clone(state: PoolState) -> PoolState:
    """An independent copy of ``state`` (cheaper than deepcopy)."""
    twin = PoolState(state.limits)
    twin.opening = state.opening
    twin.connections = {cid: attrs.evolve(c) for cid, c in state.connections.items()}
    return twin


def acts_new(state: PoolState, t: float) -> bool:
    """Whether ``expired(t)`` would retire or close a connection that still takes work.

    Connections retired already (and idle) are closed by ``expired`` at any
    time; they are not "new" work for the maintenance timer.
    """
    probe = clone(state)
    takes_work = {cid for cid, c in state.connections.items() if not c.retiring}
    returned = set(probe.expired(t))
    newly_retired = {cid for cid in takes_work if probe.connections[cid].retiring}
    return bool(newly_retired or (returned & takes_work))


# ---------------------------------------------------------------- state machine


class PoolStateMachine(RuleBasedStateMachine):
    """Random sequences of pool events against a model of time and ownership."""

    @initialize(
        min_connections=st.integers(0, 3),
        extra=st.integers(0, 3),
        max_connecting=st.integers(1, 3),
        idle_timeout=DURATIONS,
        lifetime_factor=st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0, 8.0]),
        warm=st.lists(st.tuples(STEPS, st.integers(1, 3)), min_size=1, max_size=5),
    )
    def setup(self, min_connections, extra, max_connecting, idle_timeout, lifetime_factor, warm):
        max_lifetime = idle_timeout * lifetime_factor  # exact: powers of two times quarters
        self.limits = PoolLimits(
            min_connections=min_connections,
            max_connections=max(1, min_connections + extra),
            max_connecting=max_connecting,
            idle_timeout=idle_timeout,
            max_lifetime=max_lifetime,
        )
        self.state = PoolState(self.limits)
        self.now = 0.0
        self.ids = 0
        self.pending_opens = 0
        #: One entry per reserved request not yet released: its connection id.
        self.requests: list[int] = []
        #: Connection ids under a lease not yet returned.
        self.leases: list[int] = []
        # Start with a few connections opened at staggered times.
        for dt, capacity in warm:
            self.now += dt
            if self.state.can_open():
                self.open_at_once(capacity)

    # ------------------------------------------------------------------ time

    @rule(dt=STEPS)
    def advance(self, dt):
        self.now += dt

    @rule()
    def advance_to_next_expiry(self):
        due = self.state.next_expiry(self.now)
        if due is not None and due > self.now:
            self.now = due

    @rule(data=st.data())
    def advance_to_a_deadline(self, data):
        """Jump to some connection's lifetime or idle deadline (boundaries matter)."""
        limits = self.limits
        deadlines = sorted(
            {c.opened_at + limits.max_lifetime for c in self.state.connections.values()}
            | {c.last_used + limits.idle_timeout for c in self.state.connections.values()}
        )
        future = [t for t in deadlines if t > self.now]
        if future:
            self.now = data.draw(st.sampled_from(future))

    # ---------------------------------------------------------------- opening

    @precondition(lambda self: self.state.can_open())
    @rule()
    def start_open(self):
        self.state.open_started()
        self.pending_opens += 1

    @precondition(lambda self: self.state.can_open())
    @rule(capacity=st.integers(1, 3))
    def open_at_once(self, capacity):
        self.state.open_started()
        self.ids += 1
        self.state.open_finished(self.ids, self.now, FakeLedger(capacity))

    @precondition(lambda self: self.pending_opens > 0)
    @rule(ok=st.booleans(), capacity=st.integers(0, 4))
    def finish_open(self, ok, capacity):
        self.pending_opens -= 1
        if ok:
            self.ids += 1
            self.state.open_finished(self.ids, self.now, FakeLedger(capacity))
            record = self.state.connections[self.ids]
            assert record.capacity == max(1, capacity)
            assert record.idle and not record.retiring
        else:
            self.state.open_finished(None, self.now)

    # --------------------------------------------------------------- requests

    @rule()
    def reserve(self):
        shareable = [c for c in self.state.connections.values() if c.shareable]
        record = self.state.pick_shared()
        if not shareable:
            assert record is None
            return
        assert record is not None and record.shareable
        assert record.reserved == max(c.reserved for c in shareable)
        reserve(self.state, record.id, self.now)
        assert record.last_used == self.now
        self.requests.append(record.id)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def release(self, data):
        index = data.draw(st.integers(0, len(self.requests) - 1))
        connection_id = self.requests.pop(index)
        release(self.state, connection_id, self.now)  # a no-op if closed meanwhile

    @rule()
    def lease(self):
        free = [c for c in self.state.connections.values() if c.idle and not c.retiring]
        record = self.state.pick_exclusive()
        if not free:
            assert record is None
            return
        assert record is not None and record.idle and not record.retiring
        self.state.lease(record.id, self.now)
        assert record.leased and record.last_used == self.now
        self.leases.append(record.id)

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), reusable=st.booleans())
    def return_lease(self, data, reusable):
        index = data.draw(st.integers(0, len(self.leases) - 1))
        connection_id = self.leases.pop(index)
        self.state.return_lease(connection_id, self.now, reusable=reusable)
        record = self.state.connections.get(connection_id)
        if record is not None:
            assert not record.leased
            if not reusable:
                assert record.retiring
            with pytest.raises(AssertionError):
                self.state.return_lease(connection_id, self.now, reusable=True)

    # ----------------------------------------------------------- connections

    @precondition(lambda self: self.state.connections)
    @rule(data=st.data())
    def retire(self, data):
        connection_id = data.draw(st.sampled_from(sorted(self.state.connections)))
        self.state.retire(connection_id)
        assert self.state.connections[connection_id].retiring
        assert not self.state.connections[connection_id].shareable

    @precondition(lambda self: self.state.connections)
    @rule(data=st.data())
    def close(self, data):
        connection_id = data.draw(st.sampled_from(sorted(self.state.connections)))
        self.state.closed(connection_id)
        assert connection_id not in self.state.connections

    @rule()
    def run_expired(self):
        state, limits, now = self.state, self.limits, self.now
        old = clone(state).connections
        due_by_age = {
            cid
            for cid, c in old.items()
            if not c.retiring and now - c.opened_at >= limits.max_lifetime
        }
        returned = state.expired(now)

        assert len(returned) == len(set(returned))
        for cid in returned:
            record = state.connections[cid]
            # never a connection with requests on it, or leased
            assert record.reserved == 0 and not record.leased
            assert old[cid].idle
        # every connection that no longer takes work and has nothing on it is closed
        for cid, record in state.connections.items():
            if record.retiring and record.idle:
                assert cid in returned
        # expired() only retires by age
        for cid, record in state.connections.items():
            if record.retiring and not old[cid].retiring:
                assert cid in due_by_age

        remaining = {cid: c for cid, c in state.connections.items() if cid not in returned}
        # nothing older than max_lifetime still takes work
        for record in remaining.values():
            if now - record.opened_at >= limits.max_lifetime:
                assert record.retiring
        active_after = sum(1 for c in remaining.values() if not c.retiring)
        # nothing beyond min_connections stays idle past idle_timeout
        if active_after > limits.min_connections:
            for record in remaining.values():
                if not record.retiring and record.idle:
                    assert now - record.last_used < limits.idle_timeout
        # idle expiry never eats into min_connections
        idle_expired = [cid for cid in returned if not old[cid].retiring and cid not in due_by_age]
        if idle_expired:
            assert active_after >= limits.min_connections, (
                f"idle-expired {idle_expired} leaving {active_after} connections "
                f"that take work, below min_connections={limits.min_connections}"
            )

        for cid in returned:
            state.closed(cid)

    # ------------------------------------------------------------ invariants

    @invariant()
    def limits_hold(self):
        state, limits = self.state, self.limits
        assert len(state.connections) + state.opening <= limits.max_connections
        assert 0 <= state.opening <= limits.max_connecting
        assert state.opening == self.pending_opens
        if not state.can_open():
            with pytest.raises(AssertionError):
                state.open_started()
            assert state.opening == self.pending_opens
        for record in state.connections.values():
            assert 0 <= record.reserved <= record.capacity
            if record.leased:
                assert record.reserved == 0

    @invariant()
    def bookkeeping_matches_the_model(self):
        state = self.state
        for cid, record in state.connections.items():
            assert record.reserved == self.requests.count(cid)
            assert record.leased == (cid in self.leases)
            assert self.leases.count(cid) <= 1
        assert state.reserved == sum(1 for cid in self.requests if cid in state.connections)
        assert state.leased == sum(1 for cid in self.leases if cid in state.connections)

    @invariant()
    def next_expiry_is_the_first_time_expired_acts(self):
        state, now = self.state, self.now
        due = state.next_expiry(now)
        if due is None:
            far = now + 10 * (self.limits.max_lifetime + self.limits.idle_timeout)
            assert not acts_new(state, far)
            return
        if due > now:
            assert not acts_new(state, before(due)), f"expired acts before next_expiry={due}"
        assert acts_new(state, max(due, now)), f"nothing expires at next_expiry={due}"


# No shrink phase: shrinking this machine takes ~30 s, over the suite's time
# budget. A failure prints the whole (unshrunk) step list; the example tests
# below are the minimal reproductions. Add Phase.shrink back when debugging.
PoolStateMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=25,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolStateMachine = PoolStateMachine.TestCase


# ------------------------------------------------------------------- examples

LIMITS = PoolLimits(
    min_connections=0, max_connections=4, max_connecting=2, idle_timeout=10.0, max_lifetime=100.0
)


def test_lease_returned_twice_raises():
    state = PoolState(LIMITS)
    open_connection(state, 1, 0.0)
    state.lease(1, 1.0)
    state.return_lease(1, 2.0, reusable=True)
    with pytest.raises(AssertionError, match="returned twice"):
        state.return_lease(1, 3.0, reusable=True)
    with pytest.raises(AssertionError, match="returned twice"):
        state.return_lease(1, 3.0, reusable=False)
    assert not state.connections[1].retiring  # the bad second return changed nothing
    assert state.connections[1].last_used == 2.0


def test_lease_and_reserve_exclude_each_other():
    state = PoolState(LIMITS)
    open_connection(state, 1, 0.0, capacity=4)
    state.lease(1, 0.0)
    assert state.pick_shared() is None
    with pytest.raises(AssertionError):
        reserve(state, 1, 0.0)
    state.return_lease(1, 1.0, reusable=True)
    reserve(state, 1, 1.0)
    assert state.pick_exclusive() is None
    with pytest.raises(AssertionError):
        state.lease(1, 1.0)


def test_a_connection_whose_ledger_is_full_is_not_shared():
    state = PoolState(LIMITS)
    open_connection(state, 1, 0.0, capacity=2)
    reserve(state, 1, 0.0)
    reserve(state, 1, 0.0)
    assert state.pick_shared() is None
    assert not state.connections[1].shareable
    release(state, 1, 1.0)
    assert state.pick_shared() is state.connections[1]


def test_unreusable_lease_is_retired_and_closed_on_the_next_expiry_pass():
    state = PoolState(LIMITS)
    open_connection(state, 1, 0.0)
    state.lease(1, 1.0)
    state.return_lease(1, 2.0, reusable=False)
    assert state.connections[1].retiring
    assert state.pick_exclusive() is None and state.pick_shared() is None
    assert state.expired(2.0) == [1]


def test_idle_expiry_happens_exactly_at_idle_timeout():
    state = PoolState(LIMITS)
    open_connection(state, 1, 0.0)
    reserve(state, 1, 3.0)
    release(state, 1, 5.0)
    assert state.next_expiry(5.0) == 15.0
    assert state.expired(before(15.0)) == []
    assert state.expired(14.75) == []
    assert 1 in state.connections
    assert state.expired(15.0) == [1]


def test_use_pushes_idle_expiry_back():
    state = PoolState(LIMITS)
    open_connection(state, 1, 0.0)
    state.lease(1, 8.0)
    state.return_lease(1, 9.0, reusable=True)
    assert state.next_expiry(9.0) == 19.0
    assert state.expired(18.75) == []
    assert state.expired(19.0) == [1]


def test_lifetime_retires_a_busy_connection_and_closes_it_when_the_last_request_ends():
    state = PoolState(LIMITS)
    open_connection(state, 1, 0.0, capacity=4)
    reserve(state, 1, 90.0)
    reserve(state, 1, 95.0)
    assert state.next_expiry(95.0) == 100.0
    assert state.expired(before(100.0)) == []
    assert not state.connections[1].retiring

    assert state.expired(100.0) == []  # busy: retired, not closed
    record = state.connections[1]
    assert record.retiring and not record.shareable
    assert state.pick_shared() is None and state.active == 0
    assert state.next_expiry(100.0) is None  # nothing left to time; it closes on release

    release(state, 1, 120.0)
    assert state.expired(120.0) == []  # one request still on it
    release(state, 1, 130.0)
    assert state.expired(130.0) == [1]


def test_lifetime_retires_an_idle_connection_at_once():
    limits = PoolLimits(min_connections=1, idle_timeout=1000.0, max_lifetime=100.0)
    state = PoolState(limits)
    open_connection(state, 1, 0.0)
    assert state.next_expiry(0.0) == 100.0
    assert state.expired(99.75) == []
    assert state.expired(100.0) == [1]
    assert state.deficit() == 1


def test_min_connections_are_never_idle_expired():
    limits = PoolLimits(
        min_connections=2, max_connections=4, idle_timeout=10.0, max_lifetime=1000.0
    )
    state = PoolState(limits)
    open_connection(state, 1, 0.0)
    open_connection(state, 2, 0.0)
    reserve(state, 1, 1.0)
    release(state, 1, 1.0)
    assert state.next_expiry(1.0) == 1000.0  # no idle expiry at the minimum
    assert state.expired(999.0) == []
    assert sorted(state.connections) == [1, 2]


def test_idle_expiry_closes_only_the_surplus_least_recently_used_first():
    limits = PoolLimits(
        min_connections=2, max_connections=4, idle_timeout=10.0, max_lifetime=1000.0
    )
    state = PoolState(limits)
    for cid in (1, 2, 3, 4):
        open_connection(state, cid, 0.0)
    for cid, t in ((3, 1.0), (1, 2.0), (4, 3.0), (2, 4.0)):
        reserve(state, cid, t)
        release(state, cid, t)
    assert state.next_expiry(4.0) == 11.0
    assert state.expired(11.75) == [3]
    assert state.expired(12.0) == [3, 1]
    assert state.expired(20.0) == [3, 1]  # never more than the surplus
    for cid in (3, 1):
        state.closed(cid)
    assert state.next_expiry(20.0) == 1000.0
    assert state.expired(999.0) == []
    assert sorted(state.connections) == [2, 4]


def test_lifetime_retirement_does_not_let_idle_expiry_eat_into_min_connections():
    """A retired old connection no longer counts towards min_connections.

    With min_connections=1, connection 1 (old, idle) and connection 2 (idle
    for long): at t=100 connection 1 reaches max_lifetime and is closed.
    Connection 2 is then the only one left, i.e. within min_connections, so
    it must not be idle-expired in the same pass.
    """
    limits = PoolLimits(min_connections=1, max_connections=4, idle_timeout=10.0, max_lifetime=100.0)
    state = PoolState(limits)
    open_connection(state, 1, 0.0)
    open_connection(state, 2, 5.0)
    closed = state.expired(100.0)
    assert 1 in closed
    assert closed == [1], f"expired(100) closed {closed}; connection 2 is the minimum"
    assert state.active == 1


def test_busy_old_connection_being_retired_does_not_count_as_spare():
    """Same as above with the old connection busy: it is retired, 2 must stay."""
    limits = PoolLimits(min_connections=1, max_connections=4, idle_timeout=10.0, max_lifetime=100.0)
    state = PoolState(limits)
    open_connection(state, 1, 0.0)
    open_connection(state, 2, 5.0)
    reserve(state, 1, 50.0)
    closed = state.expired(100.0)
    assert state.connections[1].retiring
    assert closed == [], f"expired(100) closed {closed}; connection 2 is the minimum"


def test_pick_shared_packs_onto_the_busiest_connection_with_room():
    state = PoolState(LIMITS)
    for cid in (1, 2, 3, 4):
        open_connection(state, cid, 0.0, capacity=3)
    for cid, count in ((1, 1), (2, 2), (3, 0), (4, 3)):
        for _ in range(count):
            reserve(state, cid, 0.0)
    # 4 is full, 2 is the busiest with room
    assert state.pick_shared().id == 2
    reserve(state, 2, 0.0)
    assert state.pick_shared().id == 1  # 2 and 4 full now
    state.retire(1)
    assert state.pick_shared().id == 3  # retiring connections take no new work
    state.lease(3, 0.0)
    assert state.pick_shared() is None
    release(state, 4, 1.0)
    assert state.pick_shared().id == 4


def test_can_open_and_deficit_count_connections_being_opened():
    limits = PoolLimits(min_connections=3, max_connections=4, max_connecting=2)
    state = PoolState(limits)
    assert state.deficit() == 3
    state.open_started()
    state.open_started()
    assert not state.can_open()  # max_connecting
    assert state.deficit() == 1
    state.open_finished(1, 0.0, FakeLedger())
    state.open_finished(None, 0.0)
    assert state.deficit() == 2
    state.open_started()
    state.open_finished(2, 0.0, FakeLedger())
    state.open_started()
    state.open_finished(3, 0.0, FakeLedger())
    state.open_started()
    assert not state.can_open()  # max_connections: 3 open + 1 opening
    state.retire(1)
    assert state.deficit() == 0  # 2 active + 1 opening
    assert not state.can_open()  # the retiring one still holds its place


#: Times as a clock reports them (millisecond steps) and configured durations.
CLOCK_TIMES = st.integers(0, 10**8).map(lambda ms: ms / 1000)
CONFIG_DURATIONS = st.one_of(
    st.sampled_from([0.1, 0.3, 0.7, 1.5, 2.5, 30.0, 60.0, 300.0, 1800.0, 3600.0]),
    st.floats(0.001, 1e4, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@example(opened_at=5.1, last_used_after=0.0, idle_timeout=60.0, max_lifetime=1800.0)
@example(opened_at=127.0, last_used_after=0.0, idle_timeout=60.0, max_lifetime=1.9269131062522575)
@given(
    opened_at=st.one_of(CLOCK_TIMES, st.floats(0, 1e6, allow_nan=False)),
    last_used_after=st.one_of(CLOCK_TIMES, st.just(0.0)),
    idle_timeout=CONFIG_DURATIONS,
    max_lifetime=CONFIG_DURATIONS,
)
def test_something_expires_at_next_expiry_with_any_float_times(
    opened_at, last_used_after, idle_timeout, max_lifetime
):
    """``expired(next_expiry(now))`` must act, whatever the float times.

    The maintenance task sleeps until ``next_expiry`` and calls ``expired``
    with the (virtual) time it wakes at, which is exactly that deadline
    under a MockClock. If nothing expires then, ``next_expiry`` returns the
    same, already-passed deadline and the task spins without ever blocking.
    """
    limits = PoolLimits(
        min_connections=0, max_connections=2, idle_timeout=idle_timeout, max_lifetime=max_lifetime
    )
    state = PoolState(limits)
    open_connection(state, 1, opened_at)
    last_used = opened_at + last_used_after
    assume(last_used - opened_at < max_lifetime)
    reserve(state, 1, last_used)
    release(state, 1, last_used)
    due = state.next_expiry(last_used)
    assert due is not None
    assert acts_new(state, due), (
        f"next_expiry={due!r} but expired({due!r}) does nothing "
        f"(opened_at={opened_at!r}, last_used={last_used!r})"
    )
