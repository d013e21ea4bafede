"""Waits bounded by the expiry timer (PendingRequest.wait_until), in virtual time.

The request pipeline's attempts wait for their replies this way instead of
in a cancel scope each, so an expiry must end a wait exactly as a
cancellation does (withdrawn if unsent, CANCELled and kept as an orphan if
sent), at the exact time, and never lose a reply that arrived first.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from qdb_client._transport import Expired, Expiries
from qdb_client.protocol import Cancel

from .test_transport_connection import connected


@pytest.fixture
async def expiries(nursery):
    timer = Expiries()
    nursery.start_soon(timer.run)
    await trio.testing.wait_all_tasks_blocked()
    assert timer.running
    return timer


async def test_a_reply_before_the_expiry_is_returned_and_forgotten(autojump_clock, expiries):
    async with connected() as (conn, node, nursery):
        pending = await conn.send_request("query", {"n": 1})

        async def answer() -> None:
            await trio.sleep(0.3)
            await node.reply(await node.receive_request(), "one")

        nursery.start_soon(answer)
        assert await pending.wait_until(trio.current_time() + 1.0, expiries) == "one"
        assert len(expiries) == 0
        # The timer still wakes at the forgotten expiry, and then has nothing to do.
        await trio.sleep(2.0)
        assert conn.in_flight == 0 and conn.orphaned == 0


async def test_an_expiry_after_the_write_cancels_and_keeps_an_orphan(autojump_clock, expiries):
    async with connected() as (conn, node, _nursery):
        pending = await conn.send_request("query", {"n": 1})
        request = await node.receive_request()
        started = trio.current_time()
        with pytest.raises(Expired):
            await pending.wait_until(started + 0.75, expiries)
        assert trio.current_time() - started == pytest.approx(0.75)
        cancel = await node.receive()
        assert isinstance(cancel, Cancel) and cancel.request_id == request.request_id
        # The slot stays taken until the node confirms the orphan.
        assert conn.in_flight == 1 and conn.orphaned == 1
        await node.reply(request, "late")
        await trio.testing.wait_all_tasks_blocked()
        assert conn.in_flight == 0 and conn.late_replies_dropped == 1
        assert len(expiries) == 0


async def test_an_expiry_before_the_write_withdraws_the_frame(autojump_clock, expiries):
    async with connected(lockstep=True) as (conn, node, nursery):
        # In lockstep the first frame's write blocks until the node reads it,
        # so the second one is still queued when its expiry comes.
        first = await conn.send_request("query", {"n": 1})
        await trio.testing.wait_all_tasks_blocked()
        assert first.sent
        second = await conn.send_request("query", {"n": 2})
        with pytest.raises(Expired):
            await second.wait_until(trio.current_time() + 0.5, expiries)
        assert not second.sent and second.withdrawn
        received = await node.receive_request()
        assert received.args == {"n": 1}
        nursery.start_soon(node.reply, received, "one")
        assert await first.wait() == "one"
        await trio.testing.wait_all_tasks_blocked()
        assert conn.in_flight == 0
        # The withdrawn frame never reached the node: the next one it sees is new.
        nursery.start_soon(conn.request, "query", {"n": 3})
        assert (await node.receive_request()).args == {"n": 3}


async def test_an_earlier_expiry_wakes_the_timer_sooner(autojump_clock, expiries):
    async with connected() as (conn, _node, nursery):
        ended: dict[str, float] = {}
        start = trio.current_time()

        async def wait(name: str, after: float) -> None:
            pending = await conn.send_request("query", {"name": name})
            with pytest.raises(Expired):
                await pending.wait_until(start + after, expiries)
            ended[name] = trio.current_time() - start

        nursery.start_soon(wait, "late", 5.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, "early", 1.0)
        await trio.sleep(6.0)
        assert ended == {"early": pytest.approx(1.0), "late": pytest.approx(5.0)}


async def test_a_reply_that_lands_between_expiry_and_wakeup_wins(autojump_clock, expiries):
    async with connected() as (conn, node, _nursery):
        pending = await conn.send_request("query", {"n": 1})
        request = await node.receive_request()
        # The timer has woken the waiter (its expiry passed) but the waiter has
        # not run yet when the reply is delivered.
        woken = []

        async def waiter() -> None:
            woken.append(await pending.wait_until(trio.current_time() + 1.0, expiries))

        async with trio.open_nursery() as inner:
            inner.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            expiries._expire_due(trio.current_time() + 5.0)  # as the timer does at 1.0
            conn._deliver(request.request_id, result="answer")
        assert woken == ["answer"]
        assert conn.orphaned == 0 and conn.in_flight == 0


async def test_a_caller_cancellation_still_abandons_the_request(autojump_clock, expiries):
    async with connected() as (conn, node, _nursery):
        pending = await conn.send_request("query", {"n": 1})
        request = await node.receive_request()
        with trio.move_on_after(0.2) as scope:
            await pending.wait_until(trio.current_time() + 10.0, expiries)
        assert scope.cancelled_caught
        assert len(expiries) == 0
        cancel = await node.receive()
        assert isinstance(cancel, Cancel) and cancel.request_id == request.request_id
        assert conn.orphaned == 1


async def test_waits_outlive_a_stopped_timer_with_their_own_bound(autojump_clock):
    timer = Expiries()
    async with connected() as (conn, node, nursery):
        async with trio.open_nursery() as timer_nursery:
            timer_nursery.start_soon(timer.run)
            await trio.testing.wait_all_tasks_blocked()
            results: list[object] = []
            start = trio.current_time()

            async def wait(after: float) -> None:
                pending = await conn.send_request("query", {"after": after})
                try:
                    results.append(await pending.wait_until(start + after, timer))
                except Expired:
                    results.append(("expired", trio.current_time() - start))

            nursery.start_soon(wait, 3.0)
            nursery.start_soon(wait, 10.0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(timer) == 2
            timer_nursery.cancel_scope.cancel()
        assert not timer.running and len(timer) == 0
        # The timer is gone; each wait still ends at its own expiry, or with its reply.
        await trio.sleep(4.0)
        assert results == [("expired", pytest.approx(3.0))]
        for request in [await node.receive_request() for _ in range(2)]:
            if request.args["after"] == 10.0:
                await node.reply(request, "ten")
        await trio.testing.wait_all_tasks_blocked()
        assert results[1] == "ten"


async def test_an_expiry_never_set_leaves_the_timer_asleep(autojump_clock, expiries):
    async with connected() as (conn, node, nursery):
        pending = await conn.send_request("query", {})
        nursery.start_soon(node.reply, await node.receive_request(), "x")
        assert await pending.wait_until(math.inf, expiries) == "x"
        assert len(expiries) == 0


class _Wait:
    """What the timer needs of a waiting request (its key, and a wake-up)."""

    __slots__ = ("_timer_key", "expired_at")

    def __init__(self) -> None:
        self._timer_key = -1
        self.expired_at: float | None = None

    def _expire(self, why: object = None) -> None:
        self.expired_at = trio.current_time()


async def test_waits_with_distinct_expiries_each_expire_at_their_own_time(autojump_clock, expiries):
    start = trio.current_time()
    waits = [_Wait() for _ in range(500)]
    # Added out of order: the timer must still wake for each at its time.
    for i in reversed(range(500)):
        expiries.add(waits[i], start + 1.0 + i * 0.01)  # type: ignore[arg-type]
    await trio.sleep(10.0)
    assert [w.expired_at for w in waits] == [
        pytest.approx(start + 1.0 + i * 0.01) for i in range(500)
    ]
    assert len(expiries) == 0 and not expiries._heap


async def test_the_timer_keeps_no_more_than_twice_what_waits(autojump_clock, expiries):
    # Waits that end before their expiry (the usual case: the reply came) leave
    # their heap entry behind; the heap is rebuilt before it outgrows the live
    # waits, so memory follows what is waiting, not what was ever sent.
    start = trio.current_time()
    steady = [_Wait() for _ in range(10)]
    for wait in steady:
        expiries.add(wait, start + 100.0)  # type: ignore[arg-type]
    largest = 0
    for i in range(10_000):
        wait = _Wait()
        expiries.add(wait, start + 50.0 + i * 1e-3)  # type: ignore[arg-type]
        expiries.discard(wait)  # type: ignore[arg-type]
        largest = max(largest, len(expiries._heap))
    assert len(expiries) == 10
    assert largest <= 2 * 11 + 64 + 1
    await trio.sleep(200.0)
    assert all(w.expired_at == pytest.approx(start + 100.0) for w in steady)
