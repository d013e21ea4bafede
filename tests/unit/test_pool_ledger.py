"""The pool's ledger and its waiters: orphan expiry, one refusal counted once, clean
cancellation at every await (virtual time)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client._transport import ORPHAN_GRACE
from qdb_client.errors import RequestTimeout
from qdb_client.protocol import GoAway, Request

from .fake_network import FakeNetwork, echo
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


async def test_a_waiter_is_served_when_the_orphan_holding_its_slot_expires(
    network: FakeNetwork, autojump_clock
):
    """max_in_flight=1, one connection. A read is abandoned at its 0.5 s
    deadline; the node never confirms the CANCEL, so the orphan holds the only
    slot until 0.5 + 0.5 + ORPHAN_GRACE. A second read waiting for a slot must
    get it when the orphan is forgotten, not sit until pool_acquire_timeout
    (5 s): nothing wakes pool waiters when an orphan expires."""
    seen: list[int] = []

    async def first_silent(node: FakeNode, request: Request) -> None:
        seen.append(request.request_id)
        if len(seen) == 1:
            return  # never answered; the CANCEL is ignored as by an old node
        await echo(node, request)

    network.handlers["a:1"] = first_silent
    async with qdb_client.open_client("a:1", max_connections=1, max_in_flight=1, **EXACT) as client:
        with pytest.raises(RequestTimeout):
            await client._call("query", {}, 0.5, read_only=True)
        started = trio.current_time()
        await client._call("query", {}, 20.0, read_only=True)
        waited = trio.current_time() - started
        assert waited <= 0.5 + ORPHAN_GRACE + 0.01, waited


async def test_one_refused_connect_seen_by_many_waiters_is_one_breaker_failure(
    network: FakeNetwork, autojump_clock
):
    """Eight reads queue on a node with no open connection; the opens are
    refused, the node goes DOWN and its pool is disabled. Every waiter then
    fails with a ConnectError("not in service") that carries no failure_id, so
    the breaker counts eight uncorrelated failures and opens (threshold 5)
    from what was at most two refused connects (max_connecting=2)."""
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", min_connections=0, max_retries=0, **EXACT) as client:
        node = client._cluster.find("a:1")
        fake = network.nodes_at("a:1")[0]
        network.handlers["a:1"] = "refuse"
        await fake.send(GoAway("max_lifetime", 0))  # drained and closed: no connection left
        await trio.testing.wait_all_tasks_blocked()
        assert node.pool.state.connections == {} and node.state.value == "UP"

        async def read() -> None:
            try:
                await client._call("query", {}, 5.0, read_only=True)
            except qdb_client.QdbError:
                pass

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(read)
        breaker = node.breaker
        assert breaker.state(trio.current_time()).value == "CLOSED", (
            breaker.metrics(trio.current_time()),
            breaker._consecutive_failures,
        )
        assert breaker._consecutive_failures <= 2


async def test_cancelled_at_reservation_request_entry_gives_the_slot_back(nursery, autojump_clock):
    """Reservation.request marks the slot used *before* its checkpoint: a
    caller cancelled at that checkpoint never sends, yet reserve()'s exit skips
    unreserve() because used is True, so the slot leaks for good
    (in_flight stays 1 with nothing in flight)."""
    from .test_pool_wrapper import FakeServer, make_pool

    server = FakeServer(nursery)
    pool = make_pool(nursery, server)
    with trio.CancelScope() as scope:
        async with pool.reserve() as slot:
            scope.cancel()  # cancelled before the request's first checkpoint
            await slot.request("query", {"delay": 1.0})
    await trio.testing.wait_all_tasks_blocked()
    assert pool.statistics()["in_flight"] == 0, pool.statistics()


@pytest.mark.parametrize("half_open", [False, True])
async def test_cancellation_at_every_point_of_a_call_leaves_a_clean_ledger(
    network: FakeNetwork, autojump_clock, half_open
):
    """Regression guard: 40 callers, one connection with 2 slots, a node that
    answers after 0.3 s; each caller is cancelled at its own offset (in the
    pool queue, just after the write, while waiting, after the reply).
    Afterwards no slot, orphan, waiter or half-open
    probe is left behind, and the breaker saw no failure."""

    send_lock = trio.Lock()

    async def slow(node: FakeNode, request: Request) -> None:
        await trio.sleep(0.3)
        async with send_lock:
            await echo(node, request)

    async def serve(node: FakeNode, request: Request) -> None:
        node_nursery.start_soon(slow, node, request)  # answers concurrently

    network.handlers["a:1"] = serve
    async with trio.open_nursery() as node_nursery:
        async with qdb_client.open_client(
            "a:1",
            max_connections=1,
            max_in_flight=2,
            breaker_half_open_probes=40,
            **EXACT,
        ) as client:
            node = client._cluster.find("a:1")
            if half_open:
                now = trio.current_time()
                for _ in range(5):
                    node.breaker.record_failure(now)
                node.breaker.probe_now(now)
            failures_before = node.breaker.failed_requests

            async def caller(i: int) -> None:
                with trio.move_on_after(0.037 * i):
                    try:
                        await client._call("query", {}, 10.0, read_only=True)
                    except RequestTimeout:
                        pass
                    except qdb_client.errors.CircuitOpen:
                        pass

            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(caller, i)
            await trio.sleep(5.0)
            stats = client.statistics()["nodes"][0]
            assert (stats["in_flight"], stats["orphaned"], stats["waiting"]) == (0, 0, 0), stats
            assert node.breaker._probes == 0
            assert node.breaker.failed_requests == failures_before
            connection = node.pool.connections()[0]
            assert connection._waiting == {} and not connection._outbox
            assert connection.late_replies_dropped > 0  # orphans were made and confirmed
        node_nursery.cancel_scope.cancel()
