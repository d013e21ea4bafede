"""The connection as the in-flight ledger: orphans, their confirmation and expiry,
frame bytes released once written, and a bad reply failing only its own request.

In-memory streams, virtual time.
"""

from __future__ import annotations

import tracemalloc

import pytest
import trio
import trio.testing

from qdb_client._transport import ORPHAN_GRACE, connection_io
from qdb_client.errors import ConnectionLost, MessageError, QdbError
from qdb_client.protocol import Cancel, ErrorCode, GoAway, Request, Response, error_message

from .test_transport_connection import connected


async def _orphan(conn, node, nursery, *, deadline_ms: int = 1000) -> Request:
    """A request written, then abandoned by its caller: its id is orphaned."""
    with trio.move_on_after(0.1):
        conn.reserve()
        await conn.send_reserved("query", {}, deadline_ms=deadline_ms).wait()
    request = await node.receive_request()
    assert isinstance(await node.receive(), Cancel)
    return request


async def test_5_a_cancelled_request_keeps_its_slot_until_the_node_confirms(autojump_clock):
    """Orphaned ids hold their slot, so cancellations never overrun the node."""
    async with connected(node_max_in_flight=2) as (conn, node, nursery):
        request = await _orphan(conn, node, nursery)
        assert (conn.in_flight, conn.orphaned) == (1, 1)
        assert conn.has_room()
        conn.reserve()
        conn.send_reserved("query", {})
        assert not conn.has_room()  # 1 live + 1 orphan = the node's limit of 2
        await node.send(
            error_message(request.request_id, ErrorCode.CANCELLED, "stopped", details={})
        )
        await trio.testing.wait_all_tasks_blocked()
        assert (conn.in_flight, conn.orphaned) == (1, 0)
        assert conn.late_replies_dropped == 1 and conn.has_room()


async def test_5_a_late_reply_confirms_an_orphan_like_a_cancelled_ack(autojump_clock):
    async with connected() as (conn, node, nursery):
        request = await _orphan(conn, node, nursery)
        await node.reply(request, {"late": True})
        await trio.testing.wait_all_tasks_blocked()
        assert (conn.in_flight, conn.orphaned, conn.late_replies_dropped) == (0, 0, 1)


async def test_5_an_unconfirmed_orphan_is_forgotten_after_its_deadline_and_grace(
    autojump_clock,
):
    async with connected(node_max_in_flight=1) as (conn, node, nursery):
        await _orphan(conn, node, nursery, deadline_ms=1000)
        sent_at = trio.current_time() - 0.1
        assert not conn.has_room()
        await trio.sleep_until(sent_at + 1.0 + ORPHAN_GRACE - 0.01)
        assert not conn.has_room()
        await trio.sleep_until(sent_at + 1.0 + ORPHAN_GRACE + 0.01)
        assert conn.has_room()
        assert (conn.in_flight, conn.orphaned, conn.orphans_expired) == (0, 0, 1)


async def test_5_goaway_frees_the_orphans_the_node_will_not_process(autojump_clock):
    async with connected() as (conn, node, nursery):
        request = await _orphan(conn, node, nursery)
        await node.send(GoAway("shutdown", request.request_id - 1))
        await trio.testing.wait_all_tasks_blocked()
        assert (conn.in_flight, conn.orphaned) == (0, 0)


async def test_6_sent_frames_are_released_once_written(autojump_clock):
    """40 writes of 500 kB in flight hold no copy of their frames once written."""
    async with connected() as (conn, node, nursery):

        async def drain() -> None:
            while await node.receive() is not None:
                pass

        nursery.start_soon(drain)
        payload = "x" * 500_000
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            pendings = []
            for n in range(40):
                conn.reserve()
                pendings.append(conn.send_reserved("execute", {"n": n, "blob": payload}))
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert all(p.sent and p.data == b"" for p in pendings)
        assert conn.in_flight == 40
        assert held < 5_000_000, f"{held} bytes still held for 40 x 500 kB frames"


async def test_6_a_reply_that_breaks_the_reader_fails_only_its_own_request(monkeypatch):
    """An exception while turning one reply into its result fails that request
    alone; its neighbours on the connection get their replies."""
    real = connection_io.error_from_message

    def fragile(error, *, node=None):
        if error.message == "poison":
            raise ValueError("cannot build this error")
        return real(error, node=node)

    monkeypatch.setattr(connection_io, "error_from_message", fragile)
    async with connected() as (conn, node, nursery):
        results: dict[int, object] = {}

        async def call(n: int) -> None:
            try:
                results[n] = await conn.request("query", {"n": n})
            except Exception as exc:
                results[n] = exc

        for n in range(3):
            nursery.start_soon(call, n)
        requests = {r.args["n"]: r for r in [await node.receive_request() for _ in range(3)]}
        await node.send(error_message(requests[1].request_id, ErrorCode.INTERNAL, "poison"))
        await node.reply(requests[0], {"n": 0})
        await node.reply(requests[2], {"n": 2})
        await trio.testing.wait_all_tasks_blocked()
        assert results[0] == {"n": 0} and results[2] == {"n": 2}
        assert isinstance(results[1], MessageError)
        assert conn.usable


@pytest.mark.parametrize("unused", [True, False])
async def test_a_reserved_slot_is_given_back_or_handed_to_the_request(unused):
    async with connected() as (conn, node, _):
        conn.reserve()
        assert conn.in_flight == 1
        if unused:
            conn.unreserve()
            assert conn.in_flight == 0
        else:
            pending = conn.send_reserved("query", {})
            request = await node.receive_request()
            await node.reply(request, {})
            assert await pending.wait() == {}
            assert conn.in_flight == 0


async def test_a_reservation_whose_send_fails_is_given_back():
    async with connected() as (conn, _node, _):
        conn.reserve()
        with pytest.raises(Exception, match="encode"):
            conn.send_reserved("query", {"bad": object()})
        assert conn.in_flight == 0


async def test_a_reservation_beyond_the_limit_is_refused(autojump_clock):
    """reserve() never takes more slots than the node allows (has_room() first)."""
    async with connected(node_max_in_flight=1) as (conn, _node, _nursery):
        conn.reserve()
        with pytest.raises(AssertionError, match="no request slot left"):
            conn.reserve()
        assert conn.in_flight == 1


async def test_pins_take_no_slot_and_end_with_the_connection(autojump_clock):
    """An established subscription pins its connection without a request slot."""
    async with connected(node_max_in_flight=1) as (conn, _node, _nursery):
        conn.pin()
        conn.pin()
        assert (conn.in_flight, conn.pinned) == (0, 2) and conn.has_room()
        conn.unpin()
        assert conn.pinned == 1
        conn.close()
        assert conn.pinned == 0


async def test_a_batch_of_replies_frees_a_slot_for_each_waiting_sender(autojump_clock):
    # Replies that arrive in one read are handed out together and their freed
    # slots announced once: every sender waiting for a slot must still get one.
    async with connected(max_in_flight=2, node_max_in_flight=2) as (conn, node, nursery):
        results: dict[int, object] = {}

        async def call(n: int) -> None:
            results[n] = await conn.request("query", {"n": n})

        for n in range(4):
            nursery.start_soon(call, n)
        first = [await node.receive_request() for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        assert conn.in_flight == 2  # the other two wait for a slot
        await node.send_raw(
            b"".join(node.protocol.send(Response(r.request_id, r.args["n"])) for r in first)
        )
        with trio.fail_after(5):  # (virtual time: a slot never freed fails here)
            second = [await node.receive_request() for _ in range(2)]
        for request in second:
            await node.reply(request, request.args["n"])
        await trio.testing.wait_all_tasks_blocked()
        assert results == {0: 0, 1: 1, 2: 2, 3: 3}
        assert conn.in_flight == 0


async def test_replies_in_front_of_a_broken_frame_reach_their_callers(autojump_clock):
    async with connected() as (conn, node, nursery):
        got: dict[str, object] = {}

        async def call() -> None:
            try:
                got["reply"] = await conn.request("query", {})
            except QdbError as exc:
                got["reply"] = exc

        nursery.start_soon(call)
        request = await node.receive_request()
        # One read: an intact reply, then bytes that can't start a frame.
        await node.send_raw(node.protocol.send(Response(request.request_id, "answer")) + b"XX" * 20)
        await trio.testing.wait_all_tasks_blocked()
        assert got == {"reply": "answer"}
        assert not conn.usable and isinstance(conn.error, ConnectionLost)
