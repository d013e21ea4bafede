"""The multiplexed connection over in-memory streams, in virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from qdb_client._transport import Connection
from qdb_client.errors import (
    ClientClosed,
    ConnectionDraining,
    ConnectionLost,
    FrameTooLarge,
    HandshakeError,
    MessageError,
    SqlError,
    Unavailable,
    ValueNotEncodable,
    VersionMismatch,
)
from qdb_client.protocol import (
    PROTOCOL_VERSIONS,
    Cancel,
    ErrorCode,
    GoAway,
    Hello,
    Ping,
    Pong,
    Response,
    encode_message,
    error_message,
)

from .fake_peer import FakeNode, stream_pair

HELLO = Hello(versions=PROTOCOL_VERSIONS, client_version="test")


@asynccontextmanager
async def connected(
    *, lockstep: bool = False, max_in_flight: int = 256, node_max_in_flight: int = 256
) -> AsyncIterator[tuple[Connection, FakeNode, trio.Nursery]]:
    client_end, node_end = stream_pair(lockstep)
    node = FakeNode(node_end, max_in_flight=node_max_in_flight)
    connection = Connection(
        client_end, address="fake:1", max_frame_size=1 << 20, max_in_flight=max_in_flight
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.handshake)
        await nursery.start(connection.run, HELLO)
        yield connection, node, nursery
        nursery.cancel_scope.cancel()


async def test_handshake_reports_welcome_and_lowers_in_flight_cap():
    async with connected(max_in_flight=100, node_max_in_flight=8) as (conn, _node, _):
        assert conn.node_id == "fake-1"
        assert conn.welcome is not None and conn.welcome.session_id == "session-1"
        assert conn.max_in_flight == 8
        assert conn.usable


async def test_replies_out_of_order_reach_their_own_callers():
    async with connected() as (conn, node, nursery):
        results: dict[int, object] = {}

        async def call(n: int) -> None:
            results[n] = await conn.request("query", {"n": n})

        for n in range(5):
            nursery.start_soon(call, n)
        requests = [await node.receive_request() for _ in range(5)]
        for request in reversed(requests):
            await node.reply(request, {"echo": request.args["n"]})
        await trio.testing.wait_all_tasks_blocked()
        assert results == {n: {"echo": n} for n in range(5)}
        assert conn.in_flight == 0


async def test_request_ids_are_never_reused():
    async with connected() as (conn, node, nursery):
        seen = []
        for _ in range(3):
            nursery.start_soon(conn.request, "ping", {})
            request = await node.receive_request()
            seen.append(request.request_id)
            await node.reply(request, {})
        assert len(set(seen)) == 3 and seen == sorted(seen)


async def test_cancel_before_write_means_never_sent(autojump_clock):
    # Lockstep: the writer's send_all blocks until the node reads, so the
    # second request is still queued when its caller gives up.
    async with connected(lockstep=True) as (conn, node, nursery):
        first = await conn.send_request("query", {"n": 1})
        await trio.testing.wait_all_tasks_blocked()
        assert first.sent
        second = await conn.send_request("query", {"n": 2})
        with trio.move_on_after(1.0):
            await second.wait()
        assert not second.sent
        # The withdrawn frame keeps its slot until the writer drops it, so
        # abandoned frames can't pile up behind a stalled peer.
        assert conn.in_flight == 2
        received = await node.receive_request()
        assert received.args == {"n": 1}
        nursery.start_soon(node.reply, received, "one")
        assert await first.wait() == "one"
        await trio.testing.wait_all_tasks_blocked()
        assert conn.in_flight == 0
        # Nothing else was written: a third request is the next frame the node sees.
        nursery.start_soon(conn.request, "query", {"n": 3})
        assert (await node.receive_request()).args == {"n": 3}


async def test_cancel_after_write_sends_cancel_and_drops_late_reply(autojump_clock):
    async with connected() as (conn, node, nursery):
        with trio.move_on_after(0.5) as scope:
            pending = await conn.send_request("query", {"n": 1})
            abandoned = await node.receive_request()
            await pending.wait()
        assert scope.cancelled_caught and pending.sent
        cancel = await node.receive()
        assert isinstance(cancel, Cancel) and cancel.request_id == abandoned.request_id

        # Another caller's request is in flight when the abandoned reply shows up.
        got = []

        async def next_caller() -> None:
            got.append(await conn.request("query", {"n": 2}))

        nursery.start_soon(next_caller)
        fresh = await node.receive_request()
        await node.reply(abandoned, "stale answer for request 1")
        await node.reply(fresh, "answer for request 2")
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["answer for request 2"]
        assert conn.late_replies_dropped == 1


async def test_server_error_is_typed_and_connection_survives():
    async with connected() as (conn, node, nursery):

        async def fail_then_answer() -> None:
            await node.fail(await node.receive_request(), ErrorCode.SQL_ERROR, "no such table: t")
            await node.reply(await node.receive_request(), 42)

        nursery.start_soon(fail_then_answer)
        with pytest.raises(SqlError) as info:
            await conn.request("query", {"sql": "select * from t"})
        assert info.value.code == 422 and info.value.name == "SQL_ERROR"
        assert not info.value.retryable and info.value.node == "fake:1"
        assert await conn.request("query", {}) == 42


async def test_retry_after_and_details_are_carried():
    async with connected() as (conn, node, nursery):

        async def overload() -> None:
            request = await node.receive_request()
            await node.fail(
                request, ErrorCode.UNAVAILABLE, "busy", retry_after_ms=250, details={"queue": 9}
            )

        nursery.start_soon(overload)
        with pytest.raises(Unavailable) as info:
            await conn.request("query", {})
        assert info.value.retryable and info.value.retry_after_ms == 250
        assert info.value.details == {"queue": 9}


async def test_corrupted_reply_fails_only_its_caller():
    async with connected() as (conn, node, nursery):

        async def corrupt_then_answer() -> None:
            request = await node.receive_request()
            frame = bytearray(encode_message(Response(request.request_id, "x" * 10)))
            frame[-1] ^= 0xFF
            await node.send_raw(bytes(frame))
            await node.reply(await node.receive_request(), "fine")

        nursery.start_soon(corrupt_then_answer)
        with pytest.raises(MessageError):
            await conn.request("query", {})
        assert conn.usable
        assert await conn.request("query", {}) == "fine"


async def test_broken_header_fails_every_waiter_with_connection_lost():
    async with connected() as (conn, node, nursery):
        errors: list[BaseException] = []

        async def call() -> None:
            try:
                await conn.request("query", {})
            except ConnectionLost as exc:
                errors.append(exc)

        for _ in range(3):
            nursery.start_soon(call)
        for _ in range(3):
            await node.receive_request()
        await node.send_raw(b"XX" + b"\x00" * 30)
        await trio.testing.wait_all_tasks_blocked()
        assert len(errors) == 3 and all(e.request_sent for e in errors)
        assert not conn.usable
        with pytest.raises(ConnectionLost) as info:
            await conn.request("query", {})
        assert not info.value.request_sent


async def test_peer_close_fails_waiters():
    async with connected() as (conn, node, nursery):
        nursery.start_soon(node.stream.aclose)
        with pytest.raises(ConnectionLost):
            await conn.request("query", {})


async def test_goaway_fails_unprocessed_requests_as_draining():
    async with connected() as (conn, node, nursery):
        first = await conn.send_request("query", {"n": 1})
        second = await conn.send_request("query", {"n": 2})
        r1 = await node.receive_request()
        await node.receive_request()
        await node.send(GoAway(reason="shutdown", last_request_id=r1.request_id))
        with pytest.raises(ConnectionDraining) as info:
            await second.wait()
        assert info.value.reason == "shutdown" and not info.value.request_sent
        assert not conn.usable
        with pytest.raises(ConnectionDraining):
            await conn.send_request("query", {})
        nursery.start_soon(node.reply, r1, "processed before shutdown")
        assert await first.wait() == "processed before shutdown"


async def test_in_flight_cap_makes_callers_wait_for_a_slot():
    async with connected(max_in_flight=2) as (conn, node, nursery):
        await conn.send_request("query", {"n": 1})
        await conn.send_request("query", {"n": 2})
        third = []

        async def third_caller() -> None:
            third.append(await conn.send_request("query", {"n": 3}))

        nursery.start_soon(third_caller)
        await trio.testing.wait_all_tasks_blocked()
        assert third == [] and conn.in_flight == 2
        r1 = await node.receive_request()
        await node.receive_request()
        await node.reply(r1, None)
        await trio.testing.wait_all_tasks_blocked()
        assert len(third) == 1 and conn.in_flight == 2


async def test_ping_measures_round_trip_in_virtual_time(autojump_clock):
    async with connected() as (conn, node, nursery):

        async def slow_pong() -> None:
            ping = await node.receive()
            assert isinstance(ping, Ping)
            await trio.sleep(0.25)
            await node.send(Pong(ping.request_id))

        nursery.start_soon(slow_pong)
        assert await conn.ping() == pytest.approx(0.25, abs=1e-9)


async def test_node_ping_is_answered():
    async with connected() as (_conn, node, _):
        await node.send(Ping(77))
        pong = await node.receive()
        assert isinstance(pong, Pong) and pong.request_id == 77


async def test_unencodable_argument_and_oversized_frame_send_nothing():
    async with connected() as (conn, node, nursery):
        with pytest.raises(ValueNotEncodable):
            await conn.send_request("query", {"params": [object()]})
        with pytest.raises(FrameTooLarge):
            await conn.send_request("query", {"blob": b"x" * (2 << 20)})
        assert conn.in_flight == 0 and conn.usable
        nursery.start_soon(conn.request, "query", {"n": 1})
        assert (await node.receive_request()).args == {"n": 1}


async def test_close_fails_waiters_with_client_closed():
    async with connected() as (conn, node, _):
        pending = await conn.send_request("query", {})
        await node.receive_request()
        await conn.aclose()
        with pytest.raises(ClientClosed):
            await pending.wait()
        with pytest.raises(ClientClosed):
            await conn.send_request("query", {})


async def test_version_mismatch_during_handshake():
    client_end, node_end = stream_pair()
    node = FakeNode(node_end)
    conn = Connection(client_end, address="fake:1", max_frame_size=1 << 20, max_in_flight=8)

    async def refuse() -> None:
        await node.receive()
        await node.send(
            error_message(0, ErrorCode.VERSION_MISMATCH, "no", details={"supported_versions": [7]})
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        with pytest.raises(VersionMismatch) as info:
            await nursery.start(conn.run, HELLO)
    assert info.value.supported_versions == [7]


async def test_handshake_garbage_is_a_handshake_error():
    client_end, node_end = stream_pair()
    conn = Connection(client_end, address="fake:1", max_frame_size=1 << 20, max_in_flight=8)

    async def garbage() -> None:
        await node_end.receive_some(65536)
        await node_end.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(garbage)
        with pytest.raises(HandshakeError):
            await nursery.start(conn.run, HELLO)


async def test_abandoned_frames_cannot_pile_up_behind_a_stalled_peer(autojump_clock):
    # The node never reads: every caller gives up; the outbox stays bounded
    # by the in-flight cap however many callers come and go.
    async with connected(lockstep=True, max_in_flight=8) as (conn, _node, nursery):

        async def impatient(n: int) -> None:
            with trio.move_on_after(0.1):
                await conn.request("execute", {"blob": "x" * 10_000, "n": n})

        for n in range(200):
            nursery.start_soon(impatient, n)
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.in_flight <= 8
        # 8 queued requests at most, plus the CANCEL of the one being written.
        assert len(conn._outbox) <= 9
        assert conn._queued_bytes < 9 * 10_100
