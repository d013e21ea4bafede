"""NodePool, the trio side of the pool, against scripted nodes in virtual time.

``FakeServer.connect`` stands in for ``_transport.establish``: it makes a
``Connection`` over an in-memory stream to a ``FakeNode`` and starts its
``run`` task in the test's nursery. Every time asserted here is exact.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import trio
import trio.testing

from qdb_client._pool import NodePool, PoolLimits, PoolListener
from qdb_client._transport import Connection
from qdb_client.errors import (
    ClientClosed,
    ConnectError,
    PoolQueueFull,
    PoolTimeout,
    QdbError,
)
from qdb_client.protocol import PROTOCOL_VERSIONS, GoAway, Hello, Ping, Pong, Request

from .fake_peer import FakeNode, stream_pair

ADDRESS = "node-a:7000"
HELLO = Hello(versions=PROTOCOL_VERSIONS, client_version="test")
ALL_ZERO = {
    "open": 0,
    "idle": 0,
    "leased": 0,
    "opening": 0,
    "retiring": 0,
    "in_flight": 0,
    "orphaned": 0,
    "waiting": 0,
}


class FakeServer:
    """Opens the pool's connections, each to a fresh scripted node.

    Nodes answer PING with PONG and each REQUEST with its own args plus the
    node id, after ``args["delay"]`` seconds (never, if the delay is None).
    """

    def __init__(
        self, nursery: trio.Nursery, *, max_in_flight: int = 256, connect_delay: float = 0.0
    ) -> None:
        self.nursery = nursery
        self.max_in_flight = max_in_flight
        self.connect_delay = connect_delay
        #: When set, connection attempts fail with a ConnectError after the delay.
        self.refuse: str | None = None
        self.connect_times: list[float] = []
        self.connecting = 0
        self.most_connecting = 0
        self.nodes: list[FakeNode] = []
        self.connections: list[Connection] = []
        #: node id -> trio time at which the client closed that connection.
        self.closed_at: dict[str, float] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def connect(self, listener: Any) -> Connection:
        self.connect_times.append(trio.current_time())
        self.connecting += 1
        self.most_connecting = max(self.most_connecting, self.connecting)
        try:
            await trio.sleep(self.connect_delay)
            if self.refuse is not None:
                raise ConnectError(f"cannot connect to {ADDRESS}: {self.refuse}", node=ADDRESS)
            client_end, node_end = stream_pair()
            node = FakeNode(
                node_end, node_id=f"node-{len(self.nodes) + 1}", max_in_flight=self.max_in_flight
            )
            self.nodes.append(node)
            self._locks[node.node_id] = trio.Lock()
            self.nursery.start_soon(self._serve, node)
            connection = Connection(
                client_end,
                address=ADDRESS,
                max_frame_size=1 << 20,
                max_in_flight=256,
                listener=listener,
            )
            await self.nursery.start(connection.run, HELLO)
            self.connections.append(connection)
            return connection
        finally:
            self.connecting -= 1

    async def send(self, node: FakeNode, message: Any) -> None:
        async with self._locks[node.node_id]:
            await node.send(message)

    async def _serve(self, node: FakeNode) -> None:
        await node.handshake()
        async with trio.open_nursery() as requests:
            while (message := await node.receive()) is not None:
                if isinstance(message, Ping):
                    await self.send(node, Pong(message.request_id))
                elif isinstance(message, Request):
                    requests.start_soon(self._answer, node, message)
            self.closed_at[node.node_id] = trio.current_time()
            requests.cancel_scope.cancel()

    async def _answer(self, node: FakeNode, request: Request) -> None:
        delay = request.args.get("delay", 0.0)
        if delay is None:
            return
        await trio.sleep(delay)
        async with self._locks[node.node_id]:
            await node.reply(request, {"node": node.node_id, **request.args})


class RecordingListener(PoolListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, float, object]] = []

    def opened(self, pool, connection):
        self.events.append(("opened", trio.current_time(), connection.node_id))

    def open_failed(self, pool, error):
        self.events.append(("open_failed", trio.current_time(), error))

    def connection_failed(self, pool, connection):
        self.events.append(("connection_failed", trio.current_time(), connection.node_id))


def make_pool(
    nursery: trio.Nursery,
    server: FakeServer,
    *,
    acquire_timeout: float = 30.0,
    max_waiters: int = 100,
    **limits: Any,
) -> NodePool:
    defaults = dict(
        min_connections=0,
        max_connections=8,
        max_connecting=2,
        idle_timeout=60.0,
        max_lifetime=1800.0,
    )
    defaults.update(limits)
    return NodePool(
        ADDRESS,
        PoolLimits(**defaults),
        connect=server.connect,
        nursery=nursery,
        acquire_timeout=acquire_timeout,
        max_waiters=max_waiters,
        listener=RecordingListener(),
    )


def hold_the_only_slot(nursery: trio.Nursery, pool: NodePool, seconds: float) -> None:
    """Keep one request in flight for ``seconds`` (the only slot of a one-slot pool)."""

    async def hold() -> None:
        async with pool.reserve() as slot:
            await slot.request("query", {"delay": seconds})

    nursery.start_soon(hold)


def stats(**expected: int) -> dict[str, int]:
    return {**ALL_ZERO, **expected}


async def sleep_until(t: float) -> None:
    await trio.sleep_until(t)
    await trio.testing.wait_all_tasks_blocked()


def running_task_names() -> list[str]:
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        names.append(task.name)
        for child_nursery in task.child_nurseries:
            for child in child_nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


def connection_tasks() -> list[str]:
    return [n for n in running_task_names() if "Connection." in n or "_open_one" in n]


# ------------------------------------------------------------------ reuse


async def test_sequential_reserves_reuse_one_connection(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server)
    used = []
    for n in range(5):
        async with pool.reserve() as slot:
            connection = slot.connection
            used.append(connection)
            result = await slot.request("query", {"n": n, "delay": 1.0})
            assert result == {"node": "node-1", "n": n, "delay": 1.0}
    assert all(c is used[0] for c in used)
    assert server.connect_times == [0.0]
    assert trio.current_time() == 5.0
    assert pool.statistics() == stats(open=1, idle=1)


async def test_clean_sequential_leases_reuse_one_connection(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server)
    used = []
    for n in range(3):
        async with pool.lease() as connection:
            assert pool.statistics() == stats(open=1, leased=1)
            used.append(connection)
            await connection.request("query", {"n": n})
    assert used[0] is used[1] is used[2]
    assert server.connect_times == [0.0]
    assert pool.statistics() == stats(open=1, idle=1)


async def test_second_connection_opens_only_at_capacity_and_never_beyond_max(
    nursery, autojump_clock
):
    server = FakeServer(nursery, max_in_flight=2)
    pool = make_pool(nursery, server, max_connections=2)
    used: dict[int, Connection] = {}
    finished: dict[int, float] = {}

    async def call(n: int) -> None:
        async with pool.reserve() as slot:
            connection = slot.connection
            used[n] = connection
            await slot.request("query", {"n": n, "delay": 10.0})
            finished[n] = trio.current_time()

    nursery.start_soon(call, 1)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(call, 2)
    await trio.testing.wait_all_tasks_blocked()
    assert used[1] is used[2]
    assert used[1].max_in_flight == 2  # lowered by WELCOME
    assert server.connect_times == [0.0]
    assert pool.statistics() == stats(open=1, in_flight=2)

    nursery.start_soon(call, 3)  # first connection full: a second opens
    await trio.testing.wait_all_tasks_blocked()
    assert used[3] is not used[1]
    assert server.connect_times == [0.0, 0.0]

    nursery.start_soon(call, 4)  # room on the second
    await trio.testing.wait_all_tasks_blocked()
    assert used[4] is used[3]
    assert len(server.connect_times) == 2

    nursery.start_soon(call, 5)  # both full, max_connections reached: waits
    await trio.testing.wait_all_tasks_blocked()
    assert 5 not in used
    assert len(server.connect_times) == 2
    assert pool.statistics() == stats(open=2, in_flight=4, waiting=1)

    await sleep_until(30.0)
    assert finished == {1: 10.0, 2: 10.0, 3: 10.0, 4: 10.0, 5: 20.0}
    assert used[5] in (used[1], used[3])
    assert len(server.connect_times) == 2
    assert pool.statistics() == stats(open=2, idle=2)


async def test_at_most_max_connecting_opens_at_once(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1, connect_delay=1.0)
    pool = make_pool(nursery, server, max_connections=8, max_connecting=2, acquire_timeout=1000)
    got: list[float] = []

    async def call(n: int) -> None:
        async with pool.reserve() as slot:
            got.append(trio.current_time())
            await slot.request("query", {"n": n, "delay": 100.0})

    for n in range(10):
        nursery.start_soon(call, n)
    await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics() == stats(opening=2, waiting=10)

    await sleep_until(50.0)
    assert server.most_connecting == 2
    assert server.connect_times == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert got == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
    assert pool.statistics() == stats(open=8, in_flight=8, waiting=2)


# ---------------------------------------------------------------- waiting


async def test_pool_timeout_is_exact_and_says_what_is_in_use(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=1, acquire_timeout=2.5)

    hold_the_only_slot(nursery, pool, 100.0)
    await trio.sleep(1.0)
    with pytest.raises(PoolTimeout) as info:
        async with pool.reserve():
            pytest.fail("must not get a connection")
    assert trio.current_time() == 3.5
    error = info.value
    assert error.node == ADDRESS
    assert "within 2.5 s" in str(error)
    assert "1/1 connections open" in error.in_use
    assert "1 requests in flight" in error.in_use
    assert error.in_use in str(error)
    assert pool.statistics() == stats(open=1, in_flight=1)


@pytest.mark.parametrize("promised", [False, True])
@pytest.mark.parametrize("caller_deadline", [1.0, 2.5, 4.0])
async def test_a_waiter_ends_at_the_earlier_of_its_own_deadline_and_the_pools(
    nursery, autojump_clock, caller_deadline, promised
):
    # A caller that promises its deadline (``bounded_by``, the request
    # pipeline) waits without a scope of the pool's when that comes first; the
    # outcome is the same either way: the earlier deadline wins. (At a tie trio
    # hands the cancellation to the outermost scope: the caller's.)
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=1, acquire_timeout=2.5)

    hold_the_only_slot(nursery, pool, 100.0)
    await trio.sleep(1.0)
    started = trio.current_time()
    timed_out = None
    with trio.move_on_after(caller_deadline) as scope:
        try:
            await pool.acquire_slot(bounded_by=scope.deadline if promised else math.inf)
            pytest.fail("must not get a connection")
        except PoolTimeout as exc:
            timed_out = exc
    assert trio.current_time() - started == min(caller_deadline, 2.5)
    assert (timed_out is None) == (caller_deadline <= 2.5) == scope.cancelled_caught
    assert pool.statistics() == stats(open=1, in_flight=1)  # nobody left queued
    assert not pool._queue


@pytest.mark.parametrize("change", ["raised", "shielded"])
async def test_a_waiter_whose_deadline_moves_away_still_gets_the_pools_timeout(
    nursery, autojump_clock, change
):
    # A deadline read from the caller's scopes when it joins the queue can be
    # raised or shielded later: only a promised bound may stand in for the
    # pool's own timeout (a review found waits with no bound at all).
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=1, acquire_timeout=2.5)

    hold_the_only_slot(nursery, pool, 1000.0)
    await trio.sleep(1.0)
    started = trio.current_time()
    outer = trio.CancelScope(deadline=started + 1.0)
    inner = trio.CancelScope()

    async def move() -> None:
        await trio.sleep(0.5)
        if change == "raised":
            outer.deadline = math.inf
        else:
            inner.shield = True

    nursery.start_soon(move)
    with trio.move_on_after(50.0) as guard, outer, inner, pytest.raises(PoolTimeout):
        await pool.acquire_slot()
    assert not guard.cancelled_caught
    assert trio.current_time() - started == 2.5
    assert not pool._queue


async def test_lease_timeout_names_the_lease(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server, max_connections=1, acquire_timeout=4.0)
    async with pool.lease():
        with pytest.raises(PoolTimeout) as info:
            async with pool.reserve():
                pytest.fail("a leased connection takes nothing else")
        assert trio.current_time() == 4.0
        assert "1 leased" in info.value.in_use


async def test_queue_full_when_max_waiters_already_wait(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=1, max_waiters=2)
    served: list[tuple[int, float]] = []

    async def call(n: int, delay: float) -> None:
        async with pool.reserve() as slot:
            await slot.request("query", {"n": n, "delay": delay})
            served.append((n, trio.current_time()))

    nursery.start_soon(call, 0, 5.0)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(call, 1, 1.0)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(call, 2, 1.0)  # queued behind 1
    await trio.sleep(1.0)
    assert pool.statistics()["waiting"] == 2
    with pytest.raises(PoolQueueFull) as info:
        async with pool.reserve():
            pytest.fail("the queue is full")
    assert trio.current_time() == 1.0  # at once
    assert info.value.node == ADDRESS
    assert "2 callers waiting" in info.value.in_use
    await sleep_until(20.0)
    assert served == [(0, 5.0), (1, 6.0), (2, 7.0)]  # the waiters were not disturbed


# ------------------------------------------------------------ open failure


async def test_failed_open_wakes_waiters_with_the_connect_error_at_once(nursery, autojump_clock):
    server = FakeServer(nursery, connect_delay=1.0)
    server.refuse = "refused"
    pool = make_pool(nursery, server, acquire_timeout=30.0)
    errors: list[tuple[float, BaseException]] = []

    async def call() -> None:
        try:
            async with pool.reserve():
                pytest.fail("no connection can open")
        except QdbError as exc:
            errors.append((trio.current_time(), exc))

    for _ in range(3):
        nursery.start_soon(call)
    await sleep_until(40.0)
    assert [t for t, _ in errors] == [1.0, 1.0, 1.0]
    assert all(type(exc) is ConnectError for _, exc in errors)
    assert all("refused" in str(exc) for _, exc in errors)
    assert len({id(exc) for _, exc in errors}) == 3  # each waiter its own error
    assert server.connect_times == [0.0, 0.0]
    assert isinstance(pool.last_open_error, ConnectError)
    assert [e[0] for e in pool._listener.events] == ["open_failed", "open_failed"]
    assert pool.statistics() == ALL_ZERO


async def test_failed_opens_wake_staggered_waiters_before_the_timeout(nursery, autojump_clock):
    """Two callers arrive 0.5 s apart at a node that refuses after 1 s.

    Each caller's own connection attempt fails (at 1.0 and 1.5 s); both
    should get the ConnectError then, not wait out the 30 s acquire timeout.
    """
    server = FakeServer(nursery, connect_delay=1.0)
    server.refuse = "refused"
    pool = make_pool(nursery, server, acquire_timeout=30.0)
    outcomes: dict[str, tuple[float, str]] = {}

    async def call(name: str) -> None:
        try:
            async with pool.reserve():
                pytest.fail("no connection can open")
        except QdbError as exc:
            outcomes[name] = (trio.current_time(), type(exc).__name__)

    nursery.start_soon(call, "first")
    await trio.sleep(0.5)
    nursery.start_soon(call, "second")
    await sleep_until(40.0)
    assert outcomes["first"][1] == "ConnectError", (
        f"outcomes {outcomes} after {len(server.connect_times)} connection attempts"
    )
    assert outcomes["second"][1] == "ConnectError"
    assert outcomes["first"][0] <= 1.5 and outcomes["second"][0] <= 1.5
    assert len(server.connect_times) <= 2  # no retry storm against a refusing node


# ------------------------------------------------------------ maintenance


async def test_idle_connection_is_closed_exactly_at_idle_timeout(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, min_connections=1, idle_timeout=10.0)

    async def call(n: int) -> None:
        async with pool.reserve() as slot:
            await slot.request("query", {"n": n, "delay": 5.0})

    async with trio.open_nursery() as callers:
        callers.start_soon(call, 1)
        callers.start_soon(call, 2)
    assert trio.current_time() == 5.0
    assert server.connect_times == [0.0, 0.0]
    assert pool.statistics() == stats(open=2, idle=2)
    # Started once both are idle, so this test doesn't depend on whether
    # releases wake maintain() (see the test below for that).
    await nursery.start(pool.maintain)

    await sleep_until(14.999)
    assert pool.statistics()["open"] == 2
    assert server.closed_at == {}
    await sleep_until(15.0)
    assert pool.statistics() == stats(open=1, idle=1)
    assert list(server.closed_at.values()) == [15.0]

    await sleep_until(1000.0)  # the minimum stays
    assert pool.statistics() == stats(open=1, idle=1)
    assert len(server.closed_at) == 1


async def test_connection_idle_after_a_long_request_closes_at_idle_timeout(nursery, autojump_clock):
    """Idle expiry counts from the release, however long the request ran.

    The request holds the only connection from 0 to 20 s, past the 10 s idle
    timeout; once released it is idle, so it must close at 30 s.
    """
    server = FakeServer(nursery)
    pool = make_pool(nursery, server, min_connections=0, idle_timeout=10.0, max_lifetime=1000.0)
    await nursery.start(pool.maintain)
    async with pool.reserve() as slot:
        await slot.request("query", {"delay": 20.0})
    assert trio.current_time() == 20.0
    assert pool.state.next_expiry(20.0) == 30.0
    await sleep_until(29.5)
    assert pool.statistics() == stats(open=1, idle=1)
    await sleep_until(100.0)
    assert server.closed_at == {"node-1": 30.0}, (
        f"still open at 100 s: {pool.statistics()}; maintain() was not woken when the "
        "connection went idle at 20 s, so it sleeps on until the max_lifetime deadline"
    )
    assert pool.statistics() == ALL_ZERO


async def test_maintain_warms_min_connections_after_warm(nursery, autojump_clock):
    server = FakeServer(nursery, connect_delay=1.0)
    pool = make_pool(nursery, server, min_connections=3, max_connecting=2, idle_timeout=10.0)
    await nursery.start(pool.maintain)
    await sleep_until(5.0)
    assert server.connect_times == []  # not before warm()

    pool.warm()
    await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics() == stats(opening=2)
    await sleep_until(7.0)
    assert server.connect_times == [5.0, 5.0, 6.0]
    assert pool.statistics() == stats(open=3, idle=3)

    await sleep_until(500.0)  # idle, but within min_connections
    assert pool.statistics() == stats(open=3, idle=3)
    assert len(server.connect_times) == 3 and server.closed_at == {}


async def test_max_lifetime_rotation_never_fails_an_in_flight_request(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=4)
    pool = make_pool(nursery, server, min_connections=1, max_lifetime=10.0, idle_timeout=1000.0)
    await nursery.start(pool.maintain)
    pool.warm()
    await trio.testing.wait_all_tasks_blocked()
    assert server.connect_times == [0.0]
    results: dict[str, tuple[float, Any, Connection]] = {}

    async def call(name: str, delay: float) -> None:
        async with pool.reserve() as slot:
            connection = slot.connection
            result = await slot.request("query", {"delay": delay})
            results[name] = (trio.current_time(), result, connection)

    await trio.sleep(8.0)
    nursery.start_soon(call, "old", 5.0)  # on node-1, runs over its lifetime
    await sleep_until(10.0)
    # retired at 10 s, still busy: a replacement opens for min_connections
    assert pool.statistics() == stats(open=2, idle=1, retiring=1, in_flight=1)
    assert server.connect_times == [0.0, 10.0]
    assert server.closed_at == {}

    await sleep_until(11.0)
    nursery.start_soon(call, "new", 1.0)
    await sleep_until(19.5)  # node-2 reaches its own lifetime at 20
    assert results["old"][:2] == (13.0, {"node": "node-1", "delay": 5.0})
    assert results["new"][:2] == (12.0, {"node": "node-2", "delay": 1.0})
    assert server.closed_at == {"node-1": 13.0}  # closed once drained
    assert results["old"][2].error is not None
    assert pool.statistics() == stats(open=1, idle=1)
    assert server.connect_times == [0.0, 10.0]


async def test_maintain_closes_an_idle_connection_at_any_float_time(nursery, autojump_clock):
    """Default idle_timeout (60 s), connection opened and last used at t=5.1.

    In float arithmetic (5.1 + 60) - 5.1 < 60, so ``expired(65.1)`` closes
    nothing while ``next_expiry`` keeps answering 65.1: ``maintain()`` wakes
    at 65.1 and loops without ever blocking. Under a MockClock virtual time
    then never advances again. The guard turns that spin into a failure.
    """
    server = FakeServer(nursery)
    pool = make_pool(nursery, server, min_connections=0, idle_timeout=60.0)
    next_expiry = pool.state.next_expiry
    calls = 0

    def guarded_next_expiry(now: float) -> float | None:
        nonlocal calls
        calls += 1
        if calls > 1000:
            raise AssertionError(f"maintain() spins at t={now!r}: next_expiry={next_expiry(now)!r}")
        return next_expiry(now)

    pool.state.next_expiry = guarded_next_expiry  # type: ignore[method-assign]
    await nursery.start(pool.maintain)
    await trio.sleep(5.1)
    pool.ensure_connection()  # opened (and last used) at 5.1
    await trio.testing.wait_all_tasks_blocked()
    assert pool.state.connections[1].last_used == 5.1
    assert pool.state.next_expiry(5.1) == 5.1 + 60.0
    await sleep_until(70.0)
    assert pool.statistics() == ALL_ZERO
    assert calls < 10


# ------------------------------------------------------------------ leases


async def test_lease_returned_after_an_exception_is_not_reused(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server)
    with pytest.raises(KeyError):
        async with pool.lease() as first:
            await first.request("begin", {})
            raise KeyError("boom")
    await trio.testing.wait_all_tasks_blocked()
    assert isinstance(first.error, ClientClosed)
    assert server.closed_at == {"node-1": 0.0}
    assert pool.statistics() == ALL_ZERO

    async with pool.lease() as second:
        assert second is not first
        assert await second.request("query", {}) == {"node": "node-2"}
    assert server.connect_times == [0.0, 0.0]


async def test_lease_cancelled_midway_is_not_reused(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server)
    with trio.move_on_after(1.0):
        async with pool.lease() as first:
            await first.request("query", {"delay": 5.0})
    assert trio.current_time() == 1.0
    async with pool.lease() as second:
        assert second is not first
    await trio.testing.wait_all_tasks_blocked()
    assert server.closed_at == {"node-1": 1.0}
    assert len(server.connect_times) == 2


# ------------------------------------------------------------------ GOAWAY


async def test_goaway_retires_the_connection_and_another_opens_on_demand(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server)
    results: dict[str, tuple[float, Any]] = {}

    async def call(name: str, delay: float) -> None:
        async with pool.reserve() as slot:
            result = await slot.request("q", {"d": delay})
            results[name] = (trio.current_time(), result)

    async with pool.reserve() as first_slot:
        first = first_slot.connection
        await first_slot.request("query", {})
    await trio.sleep(1.0)

    async def slow() -> None:
        async with pool.reserve() as slot:
            connection = slot.connection
            assert connection is first
            result = await slot.request("query", {"delay": 4.0})
            results["in flight"] = (trio.current_time(), result)

    nursery.start_soon(slow)
    await trio.testing.wait_all_tasks_blocked()
    # request 2 is the last one node-1 will answer
    await server.send(server.nodes[0], GoAway(reason="shutdown", last_request_id=2))
    await trio.testing.wait_all_tasks_blocked()
    assert not first.usable
    assert pool.statistics() == stats(open=1, retiring=1, in_flight=1)
    assert pool.connections() == []
    assert pool.any_connection() is None
    assert len(server.connect_times) == 1  # replacements open on demand only

    async with pool.reserve() as second_slot:
        second = second_slot.connection
        assert second is not first
        assert await second_slot.request("query", {}) == {"node": "node-2"}
    assert trio.current_time() == 1.0
    assert len(server.connect_times) == 2

    await sleep_until(10.0)
    assert results["in flight"] == (5.0, {"node": "node-1", "delay": 4.0})
    assert server.closed_at == {"node-1": 5.0}
    assert pool.statistics() == stats(open=1, idle=1)
    events = [e[0] for e in pool._listener.events]
    assert events == ["opened", "opened"]  # a GOAWAY is not a connection failure


async def test_goaway_on_an_idle_connection_closes_it_at_once(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server)
    async with pool.reserve() as first_slot:
        first = first_slot.connection
        await first_slot.request("query", {})
    await trio.sleep(2.0)
    await server.send(server.nodes[0], GoAway(reason="idle_timeout", last_request_id=1))
    await trio.testing.wait_all_tasks_blocked()
    assert server.closed_at == {"node-1": 2.0}
    assert pool.statistics() == ALL_ZERO
    async with pool.reserve() as second_slot:
        second = second_slot.connection
        assert second is not first
    assert server.connect_times == [0.0, 2.0]


# ---------------------------------------------------------- disable, aclose


async def test_disable_fails_waiters_and_drains_connections(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=1, acquire_timeout=30.0)
    outcomes: dict[str, tuple[float, Any]] = {}

    async def call(name: str, delay: float) -> None:
        try:
            async with pool.reserve() as slot:
                result = await slot.request("query", {"delay": delay})
                outcomes[name] = (trio.current_time(), result)
        except QdbError as exc:
            outcomes[name] = (trio.current_time(), exc)

    nursery.start_soon(call, "holder", 5.0)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(call, "waiter", 1.0)
    await trio.sleep(1.0)
    assert pool.statistics()["waiting"] == 1

    pool.disable("node is DOWN")
    await trio.testing.wait_all_tasks_blocked()
    when, error = outcomes["waiter"]
    assert when == 1.0
    assert type(error) is ConnectError
    assert "not in service: node is DOWN" in str(error)
    with pytest.raises(ConnectError):
        async with pool.reserve():
            pytest.fail("disabled")
    assert pool.statistics() == stats(open=1, retiring=1, in_flight=1)

    await sleep_until(10.0)
    assert outcomes["holder"] == (5.0, {"node": "node-1", "delay": 5.0})  # drained, not cut
    assert server.closed_at == {"node-1": 5.0}
    assert pool.statistics() == ALL_ZERO
    assert len(server.connect_times) == 1

    pool.enable()
    async with pool.reserve() as slot:
        assert await slot.request("query", {}) == {"node": "node-2"}


async def test_aclose_closes_everything_and_fails_waiters(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=2, min_connections=2)
    outcomes: dict[str, Any] = {}

    async def call(name: str) -> None:
        try:
            async with pool.reserve() as slot:
                outcomes[name] = await slot.request("query", {"delay": None})
        except QdbError as exc:
            outcomes[name] = exc

    async with trio.open_nursery() as maintenance:
        await maintenance.start(pool.maintain)
        pool.warm()
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "a")  # nothing is ever answered
        async with trio.open_nursery() as callers:
            callers.start_soon(call, "b")
            callers.start_soon(call, "c")
            await trio.testing.wait_all_tasks_blocked()
            assert pool.statistics() == stats(open=2, in_flight=2, waiting=1)
            assert len([n for n in connection_tasks() if n.endswith("Connection.run")]) == 2
            await trio.sleep(1.0)
            await pool.aclose()
            assert pool.statistics() == ALL_ZERO
        # maintain() returned: this nursery exits without being cancelled
    await trio.testing.wait_all_tasks_blocked()
    assert sorted(outcomes) == ["a", "b", "c"]
    assert all(type(exc) is ClientClosed for exc in outcomes.values())
    messages = sorted(str(exc) for exc in outcomes.values())
    assert messages.count("the client is closed") == 1  # the waiter
    assert pool.statistics() == ALL_ZERO
    assert connection_tasks() == []
    assert server.closed_at == {"node-1": 1.0, "node-2": 1.0}
    assert all(isinstance(c.error, ClientClosed) for c in server.connections)
    with pytest.raises(ClientClosed):
        async with pool.reserve():
            pytest.fail("closed")


async def test_aclose_while_a_connection_is_opening(nursery, autojump_clock):
    server = FakeServer(nursery, connect_delay=2.0)
    pool = make_pool(nursery, server)
    outcomes: list[tuple[float, BaseException]] = []

    async def call() -> None:
        try:
            async with pool.reserve():
                pytest.fail("closed before the connection opened")
        except QdbError as exc:
            outcomes.append((trio.current_time(), exc))

    nursery.start_soon(call)
    await trio.sleep(1.0)
    assert pool.statistics() == stats(opening=1, waiting=1)
    await pool.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert [(t, type(e)) for t, e in outcomes] == [(1.0, ClientClosed)]
    await sleep_until(5.0)  # the late connection is closed, not kept
    assert pool.statistics() == ALL_ZERO
    assert connection_tasks() == []
    assert server.closed_at == {"node-1": 2.0}
    assert pool.connections() == []


# ------------------------------------------------------------ queue order


async def test_callers_are_served_first_come_first_served(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=1)
    order: list[int] = []

    async def call(n: int) -> None:
        async with pool.reserve() as slot:
            order.append(n)
            await slot.request("query", {"delay": 0.1})

    async with trio.open_nursery() as callers:
        for n in range(20):
            callers.start_soon(call, n)
            await trio.sleep(0.001)
    assert order == list(range(20))
    assert trio.current_time() == pytest.approx(20 * 0.1 + 0.001, abs=0.02)


async def test_shared_callers_behind_a_departed_lease_waiter_are_served(nursery, autojump_clock):
    server = FakeServer(nursery)
    pool = make_pool(nursery, server, max_connections=1)
    got: list[float] = []

    async def long_request() -> None:
        async with pool.reserve() as slot:
            await slot.request("query", {"delay": 10.0})

    async def impatient_lease() -> None:
        with trio.move_on_after(1.0):
            async with pool.lease():
                pytest.fail("the only connection is busy")

    async def shared() -> None:
        async with pool.reserve() as slot:
            got.append(trio.current_time())
            await slot.request("query", {})

    async with trio.open_nursery() as callers:
        callers.start_soon(long_request)
        await sleep_until(0.1)
        callers.start_soon(impatient_lease)
        await sleep_until(0.2)
        callers.start_soon(shared)  # queued behind the lease waiter
    assert got == [pytest.approx(1.1, abs=0.01)]  # served when the lease waiter left


async def test_a_drained_connection_is_replaced_for_queued_callers(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=1)
    got: list[float] = []

    async def first() -> None:
        async with pool.reserve() as slot:
            await slot.request("query", {"delay": 1.0})

    async def second() -> None:
        async with pool.reserve() as slot:
            got.append(trio.current_time())
            await slot.request("query", {})

    async with trio.open_nursery() as callers:
        callers.start_soon(first)
        await sleep_until(0.1)
        pool.retire(server.connections[0])  # e.g. it reached max_lifetime
        callers.start_soon(second)
    assert server.connect_times == [0.0, pytest.approx(1.0, abs=0.01)]
    assert got == [pytest.approx(1.0, abs=0.01)]


async def test_a_refused_extra_connection_is_retried_at_most_once_a_second(nursery, autojump_clock):
    server = FakeServer(nursery, max_in_flight=1)
    pool = make_pool(nursery, server, max_connections=2, acquire_timeout=10.0)
    got: list[float] = []

    async def long_request() -> None:
        async with pool.reserve() as slot:
            await slot.request("query", {"delay": 3.0})

    async def waiter() -> None:
        async with pool.reserve() as slot:
            got.append(trio.current_time())
            await slot.request("query", {})

    async with trio.open_nursery() as callers:
        callers.start_soon(long_request)
        await sleep_until(0.1)
        server.refuse = "CAPACITY_EXCEEDED"  # the node takes no more connections
        callers.start_soon(waiter)
    # One working connection, then refusals spaced by OPEN_RETRY_DELAY, not a
    # tight loop; the waiter is served when the busy connection frees up.
    assert len(server.connect_times) <= 1 + 4
    assert got == [pytest.approx(3.0, abs=0.01)]


# ------------------------------------------- gray failures: smaller defects


async def test_6_waiters_are_woken_when_the_reopen_delay_ends(nursery, autojump_clock):
    """A node refuses once, then is back 50 ms later: a caller that arrived in
    between is served when the 1 s re-open delay ends, not at its 10 s timeout."""
    server = FakeServer(nursery)
    server.refuse = "refused"
    pool = make_pool(nursery, server, acquire_timeout=10.0)
    nursery.start_soon(pool.maintain)
    with pytest.raises(ConnectError):
        async with pool.reserve():
            pytest.fail("the node refuses")
    assert trio.current_time() == 0.0
    await trio.sleep(0.05)
    server.refuse = None  # the node is back
    await trio.sleep(0.05)
    async with pool.reserve() as slot:
        assert await slot.request("query", {}) == {"node": "node-1"}
    assert trio.current_time() == pytest.approx(1.0)
    assert server.connect_times == [0.0, 1.0]


async def test_6_an_open_under_way_when_the_pool_is_disabled_is_abandoned(nursery, autojump_clock):
    """A node found to be another's alias (or DOWN) while a connection to it
    was opening: the attempt is abandoned at once, so no connection is ever
    kept unused and open, and none holds a place in the pool."""
    server = FakeServer(nursery, connect_delay=1.0)
    pool = make_pool(nursery, server)
    pool.ensure_connection()
    await trio.sleep(0.5)
    assert pool.statistics()["opening"] == 1
    pool.disable("same node as other:1")
    await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics() == ALL_ZERO
    await sleep_until(2.0)
    assert server.connections == []  # the connect never completed
    assert pool.statistics() == ALL_ZERO


async def test_6_an_open_not_yet_started_when_the_pool_is_disabled_is_abandoned(
    nursery, autojump_clock
):
    server = FakeServer(nursery, connect_delay=30.0)
    pool = make_pool(nursery, server)
    pool.ensure_connection()  # its task has not run yet
    pool.disable("DOWN")
    await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics()["opening"] == 0
    pool.enable()
    await trio.sleep(29.0)
    assert pool.statistics()["opening"] == 0 and pool.state.can_open()


async def test_6_callers_open_again_after_a_disable_and_an_enable_in_one_turn(
    nursery, autojump_clock
):
    # (An operator's mark_node_unhealthy() then mark_node_healthy().) The open
    # under way is abandoned: a caller queued behind it must not wait for it.
    server = FakeServer(nursery, connect_delay=1.0)
    pool = make_pool(nursery, server, acquire_timeout=5.0)
    nursery.start_soon(pool.maintain)
    pool.ensure_connection()
    await trio.sleep(0.5)
    pool.disable("marked unhealthy by operator")
    pool.enable()
    start = trio.current_time()
    async with pool.reserve() as slot:
        await slot.request("echo", {})
    assert trio.current_time() - start == pytest.approx(1.0)  # a new connect, not a timeout
