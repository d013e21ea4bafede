"""Issue 9: a test node that bad clients can't abuse (it runs in users' CI).

One test per item of the issue's list, named after it: handshake timeout and
the cap on connections that have not authenticated, the per-address cap, the
write timeout and the cap on queued reply bytes, bounded statistics, control
methods behind a per-node token (never a client name), numbers bounded as the
spec says, HELLO/WELCOME after the handshake answered with their request id,
``zeroblob(200000000)`` refused before it is built, and the 118-byte
``/**/`` statement. In-memory streams and virtual time, except where a real
clock is the point (statement timing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import pytest
import trio
import trio.testing

from qdb_client.protocol import (
    PROTOCOL_VERSIONS,
    Error,
    GoAway,
    Hello,
    Kind,
    Ping,
    Pong,
    Response,
    Welcome,
    encode_frame,
)
from qdb_client.testing import CONTROL_CLIENT_NAME, QdbNode, ServerConfig
from qdb_client.testing.stats import UNKNOWN_METHOD

from ..common.raw_client import RawClient


def make_node(**config: Any) -> QdbNode:
    config.setdefault("client_idle_timeout", 600.0)
    config.setdefault("request_timeout", 60.0)
    config.setdefault("test_mode", True)
    return QdbNode(ServerConfig(**config))


async def attach(
    node: QdbNode,
    nursery: trio.Nursery,
    *,
    peer: str = "memory",
    lockstep: bool = False,
    **hello: Any,
) -> RawClient:
    """A new in-memory connection to ``node``; handshaken unless ``hello`` is None."""
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_end, node_end = pair()
    nursery.start_soon(lambda: node.serve_connection(node_end, peer=peer))
    # Two scheduling rounds: the node's task has taken its places (admission is its
    # first step), so connections are admitted in the order they were attached.
    await trio.lowlevel.checkpoint()
    await trio.lowlevel.checkpoint()
    client = RawClient(client_end, timeout=1000.0)
    if hello.pop("handshake", True):
        await client.handshake(**hello)
    return client


@asynccontextmanager
async def running(**config: Any) -> AsyncIterator[tuple[QdbNode, trio.Nursery]]:
    node = make_node(**config)
    async with trio.open_nursery() as nursery:
        try:
            yield node, nursery
        finally:
            await node.aclose()


def as_control(node: QdbNode, **auth: str) -> dict[str, Any]:
    return {"credentials": {**auth, "control_token": node.control_token}}


# ---------------------------------------------------------------- handshake


async def test_handshake_timeout_closes_a_socket_that_never_sends_hello(autojump_clock):
    # The idle timeout (600 s here) no longer applies before the handshake:
    # a connection that sends nothing is told TIMEOUT and closed at handshake_timeout.
    async with running(handshake_timeout=3.0) as (node, nursery):
        client = await attach(node, nursery, handshake=False)
        start = trio.current_time()
        messages = await client.read_until_eof()
        assert trio.current_time() - start == pytest.approx(3.0)
        assert [(type(m), m.name) for m in messages] == [(Error, "TIMEOUT")], messages
        assert messages[0].request_id == 0 and "3 s" in messages[0].message
        assert node.statistics()["handshake_timeouts"] == 1
        assert node.statistics()["pending_handshakes"] == 0


async def test_handshake_timeout_holds_against_a_hello_sent_one_byte_at_a_time(autojump_clock):
    async with running(handshake_timeout=3.0) as (node, nursery):
        client = await attach(node, nursery, handshake=False)
        hello = Hello(versions=PROTOCOL_VERSIONS)
        data = client.proto.send(hello)
        start = trio.current_time()

        async def trickle() -> None:
            try:
                for i in range(len(data)):
                    await client.send_bytes(data[i : i + 1])
                    await trio.sleep(1.0)
            except trio.BrokenResourceError:
                pass  # the node closed it

        nursery.start_soon(trickle)
        messages = await client.read_until_eof()
        assert trio.current_time() - start == pytest.approx(3.0)
        assert [m.name for m in messages if isinstance(m, Error)] == ["TIMEOUT"]


async def test_handshake_timeout_ends_once_welcome_is_sent(autojump_clock):
    async with running(handshake_timeout=3.0, client_idle_timeout=20.0) as (node, nursery):
        client = await attach(node, nursery)
        await trio.sleep(10.0)  # far past the handshake timeout: the idle one applies now
        await client.send(Ping(1))
        assert isinstance(await client.receive(), Pong)
        assert node.statistics()["handshake_timeouts"] == 0


async def test_cap_on_connections_that_have_not_authenticated(autojump_clock):
    async with running(max_pending_handshakes=2, handshake_timeout=5.0) as (node, nursery):
        silent = [await attach(node, nursery, handshake=False) for _ in range(2)]
        await trio.sleep(0.1)
        assert node.statistics()["pending_handshakes"] == 2
        # A third one makes room by closing the oldest that has not said HELLO,
        # so silent sockets can never keep a real client out.
        third = await attach(node, nursery)
        assert isinstance(third.welcome, Welcome)
        assert await silent[0].read_until_eof() == []
        assert node.statistics()["handshakes_evicted"] == 1
        assert node.statistics()["pending_handshakes"] == 1
        # A connection past its handshake is never evicted.
        fourth = await attach(node, nursery, handshake=False)
        fifth = await attach(node, nursery, handshake=False)
        await trio.sleep(0.1)
        await third.send(Ping(1))
        assert isinstance(await third.receive(), Pong)
        assert await silent[1].read_until_eof() == []
        assert node.statistics()["handshakes_evicted"] == 2
        # The silent ones left are closed at their handshake timeout.
        assert [m.name for m in await fourth.read_until_eof()] == ["TIMEOUT"]
        assert [m.name for m in await fifth.read_until_eof()] == ["TIMEOUT"]
        assert node.statistics()["pending_handshakes"] == 0


async def test_an_optional_per_client_address_connection_cap(autojump_clock):
    async with running(max_connections_per_address=2) as (node, nursery):
        a1 = await attach(node, nursery, peer="10.0.0.1")
        await attach(node, nursery, peer="10.0.0.1")
        other = await attach(node, nursery, peer="10.0.0.2")  # another address: its own count
        assert isinstance(other.welcome, Welcome)
        third = await attach(node, nursery, peer="10.0.0.1", handshake=False)
        refused = await third.read_until_eof()
        assert [m.name for m in refused] == ["CAPACITY_EXCEEDED"]
        assert "from this address" in refused[0].message
        assert node.statistics()["address_limit_refused"] == 1
        await a1.aclose()
        await trio.sleep(1.0)
        again = await attach(node, nursery, peer="10.0.0.1")
        assert isinstance(again.welcome, Welcome)


async def test_no_per_address_cap_by_default(autojump_clock):
    async with running() as (node, nursery):
        clients = [await attach(node, nursery, peer="10.0.0.1") for _ in range(20)]
        assert all(isinstance(c.welcome, Welcome) for c in clients)


# ----------------------------------------------------- clients that don't read


async def test_write_timeout_disconnects_a_peer_that_stops_reading(autojump_clock):
    # lockstep: a write returns only once the peer read it, and this one never reads.
    async with running(write_timeout=4.0) as (node, nursery):
        client = await attach(node, nursery, lockstep=True)
        start = trio.current_time()
        await client.send_request("query", {"sql": "select zeroblob(1000)"})
        with trio.move_on_after(60.0):
            while node.statistics()["connections_open"]:  # noqa: ASYNC110 - a counter
                await trio.sleep(0.01)
        assert node.statistics()["connections_open"] == 0
        assert trio.current_time() - start == pytest.approx(4.0, abs=0.05)
        assert node.statistics()["slow_readers_closed"] == 1


async def test_cap_on_queued_reply_bytes_disconnects_a_peer_and_releases_them(autojump_clock):
    # Replies pile up behind a write the client never reads; past the cap the
    # connection goes at once (long before the write timeout), and its memory with it.
    cap = 200_000
    async with running(write_timeout=600.0, max_queued_reply_bytes=cap) as (node, nursery):
        client = await attach(node, nursery, lockstep=True)
        sent = 0
        peak = 0
        with trio.move_on_after(30.0):
            while node.statistics()["connections_open"]:
                if sent < 100:
                    with trio.move_on_after(0.1):
                        await client.send_request("query", {"sql": "select zeroblob(50000)"})
                        sent += 1
                peak = max(peak, node.statistics()["queued_reply_bytes"])
                await trio.sleep(0.01)
        stats = node.statistics()
        assert stats["connections_open"] == 0 and stats["slow_readers_closed"] == 1
        assert trio.current_time() < 30.0  # long before the write timeout
        assert 0 < peak <= cap
        assert stats["queued_reply_bytes"] == 0


async def test_one_large_reply_always_fits_an_empty_queue(autojump_clock):
    async with running(max_queued_reply_bytes=1024) as (node, nursery):
        client = await attach(node, nursery)
        reply = await client.request("query", {"sql": "select zeroblob(100000)"})
        assert isinstance(reply, Response), reply


# ------------------------------------------------------------- statistics


async def test_statistics_bounded_unknown_method_names_counted_together(autojump_clock):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        for i in range(500):
            reply = await client.request(f"no.such.method.{i}")
            assert isinstance(reply, Error) and reply.name == "METHOD_NOT_FOUND"
        await client.call("ping")
        by_method = node.statistics()["requests_by_method"]
        assert by_method == {UNKNOWN_METHOD: 500, "ping": 1}


# ------------------------------------------------------------ control token


async def test_control_methods_require_the_control_token_never_a_client_name(autojump_clock):
    # Before: a HELLO naming the control tool bypassed faults and vanished from the
    # statistics. Now the name is only a name.
    async with running() as (node, nursery):
        impostor = await attach(node, nursery, client_name=CONTROL_CLIENT_NAME)
        reply = await impostor.request("control.stats")
        assert isinstance(reply, Error) and reply.name == "PERMISSION_DENIED", reply
        assert not reply.retryable
        node.faults.fail_next(1, code="UNAVAILABLE", methods=["ping"])
        failed = await impostor.request("ping")
        assert isinstance(failed, Error) and failed.name == "UNAVAILABLE"  # faults apply
        stats = node.statistics()
        assert stats["connections_accepted"] == 1 and stats["connections_open"] == 1
        assert stats["requests_by_method"] == {"ping": 1}
        assert stats["control_refused"] == 1


async def test_control_token_opens_control_methods_exempt_from_faults_and_statistics(
    autojump_clock,
):
    async with running() as (node, nursery):
        control = await attach(node, nursery, **as_control(node))
        node.faults.stop_pings(True)
        assert (await control.call("ping")) == {"node_id": node.node_id}
        stats = await control.call("control.stats")
        assert stats["connections_accepted"] == 0 and stats["connections_open"] == 0
        assert stats["requests_by_method"] == {}


async def test_a_wrong_control_token_is_refused_at_the_handshake(autojump_clock):
    async with running() as (node, nursery):
        client = await attach(node, nursery, handshake=False)
        reply = await client.hello(credentials={"control_token": "guess"})
        assert isinstance(reply, Error) and reply.name == "UNAUTHENTICATED", reply
        assert reply.details == {"reason": "control_token"}
        assert node.statistics()["control_refused"] == 1


async def test_control_methods_do_not_exist_outside_test_mode_even_with_the_token(
    autojump_clock,
):
    async with running(test_mode=False) as (node, nursery):
        client = await attach(node, nursery, **as_control(node))
        reply = await client.request("control.shutdown")
        assert isinstance(reply, Error) and reply.name == "METHOD_NOT_FOUND"
        assert not node.stopped


async def test_each_node_draws_its_own_control_token():
    a, b = make_node(), make_node()
    assert a.control_token != b.control_token and len(a.control_token) >= 43
    assert a.control_token not in repr(a.config) and a.control_token not in str(a.statistics())


async def test_the_control_token_alone_on_a_node_with_credentials_gives_no_data_access(
    autojump_clock,
):
    async with running(credentials={"ada": "pw"}) as (node, nursery):
        control = await attach(node, nursery, **as_control(node))
        assert control.welcome is not None and control.welcome.session_token is None
        assert (await control.call("ping"))["node_id"] == node.node_id
        assert "auth" in await control.call("control.stats")
        denied = await control.request("query", {"sql": "select 1"})
        assert isinstance(denied, Error) and denied.name == "PERMISSION_DENIED"
        # With the user's credentials as well, it works as that user.
        both = await attach(node, nursery, **as_control(node, user="ada", password="pw"))
        assert (await both.call("query", {"sql": "select 1"}))["rows"] == [[1]]
        assert node.statistics()["auth"]["password_hellos"] == 0  # not counted


# ------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    "value",
    [10**5000, -(10**5000), 2**64, -(2**63) - 1],
    ids=["5001 digits", "minus 5001 digits", "2**64", "-2**63-1"],
)
async def test_huge_integer_parameters_are_invalid_request_not_retryable(autojump_clock, value):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        for method in ("query", "execute"):
            reply = await client.request(method, {"sql": "select ?", "params": [value]})
            assert isinstance(reply, Error), reply
            assert (reply.name, reply.retryable) == ("INVALID_REQUEST", False), reply
            assert reply.details["parameter"] == 0
            assert len(reply.message) < 200


async def test_deadline_ms_2_pow_1100_is_answered_with_an_error_not_a_closed_connection(
    autojump_clock,
):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        body = {"method": "ping", "args": {}, "deadline_ms": 2**1100}
        await client.send_bytes(encode_frame(Kind.REQUEST, 7, cbor2.dumps(body)))
        reply = await client.receive()
        assert isinstance(reply, Error) and reply.request_id == 7, reply
        assert reply.name == "PARSE_ERROR" and "deadline_ms" in reply.message
        assert (await client.call("ping"))["node_id"] == node.node_id  # still serving


@pytest.mark.parametrize(
    ("kind", "body", "field"),
    [
        (Kind.REQUEST, {"method": "ping", "args": {}, "deadline_ms": 2**64}, "deadline_ms"),
        (Kind.STREAM_CREDIT, {"pages": 2**64}, "pages"),
        (Kind.GOAWAY, {"reason": "client_close", "last_request_id": 2**64}, "last_request_id"),
    ],
)
async def test_u64_means_u64(autojump_clock, kind, body, field):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        await client.send_bytes(encode_frame(kind, 9, cbor2.dumps(body)))
        reply = await client.receive()
        assert isinstance(reply, Error) and reply.name == "PARSE_ERROR", reply
        assert field in reply.message
        assert (await client.call("ping"))["node_id"] == node.node_id


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ({"sql": "select 1", "expect_rows": 2**64}, "expect_rows"),
        ({"stmt": 2**1100}, "stmt"),
    ],
    ids=["expect_rows", "stmt"],
)
async def test_u64_arguments_refuse_bignums(autojump_clock, args, name):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        reply = await client.request("execute", args)
        assert isinstance(reply, Error) and reply.name == "INVALID_REQUEST", reply
        assert name in reply.message


async def test_hello_after_the_handshake_is_answered_with_its_request_id(autojump_clock):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        hello = cbor2.dumps({"versions": [1]})
        await client.send_bytes(encode_frame(Kind.HELLO, 41, hello))
        reply = await client.receive()
        assert isinstance(reply, Error) and (reply.name, reply.request_id) == ("PARSE_ERROR", 41)
        assert (await client.call("ping"))["node_id"] == node.node_id


async def test_welcome_from_a_client_is_answered_with_its_request_id(autojump_clock):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        welcome = Welcome(
            version=1,
            node_id="x",
            session_id="s",
            max_frame_size=1 << 20,
            max_in_flight=1,
            idle_timeout_ms=1,
        )
        body = cbor2.dumps(welcome.body())
        await client.send_bytes(encode_frame(Kind.WELCOME, 42, body))
        reply = await client.receive()
        assert isinstance(reply, Error) and (reply.name, reply.request_id) == ("PARSE_ERROR", 42)


# ------------------------------------------------------------- sizes, time


async def test_select_zeroblob_200000000_is_refused_before_it_is_built():
    # The point is that nothing of 200 MB gets built: SQLite's length limit
    # (SQLITE_TOOBIG, checked before it allocates) refuses the value, and both
    # replies say that is what refused it, not a size check of a built result.
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        client.timeout = 30.0
        query = await client.request("query", {"sql": "select zeroblob(200000000)"})
        assert isinstance(query, Error) and query.name == "FRAME_TOO_LARGE", query
        assert "a string or blob the query builds or reads exceeds" in query.message
        execute = await client.request("execute", {"sql": "select zeroblob(200000000)"})
        assert isinstance(execute, Error) and execute.name == "SQL_ERROR", execute
        assert execute.details["sqlite_error"] == "SQLITE_TOOBIG"
        inserted = await client.request("execute", {"sql": "select zeroblob(17000000)"})
        assert isinstance(inserted, Error) and inserted.details["sqlite_error"] == "SQLITE_TOOBIG"


async def test_max_result_size_bounds_a_result_whatever_the_clients_max_frame(autojump_clock):
    async with running(max_result_size=64 * 1024) as (node, nursery):
        client = await attach(node, nursery, max_frame_size=2**31 - 1)
        reply = await client.request("query", {"sql": "select zeroblob(100000)"})
        assert isinstance(reply, Error) and reply.name == "FRAME_TOO_LARGE", reply
        assert reply.details["max_frame"] == 64 * 1024
        fits = await client.request("query", {"sql": "select zeroblob(60000)"})
        assert isinstance(fits, Response)


async def test_the_118_byte_comment_statement_returns_within_milliseconds():
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        await client.call("execute", {"sql": "create table t(x)"})
        sql = "/**/" * 26 + " delete from t"
        assert len(sql) == 118
        # A backtracking pattern over these comments took minutes; a hang guard
        # with a wide margin, not a timing goal.
        with trio.fail_after(10):
            assert await client.call("execute", {"sql": sql}) == {
                "rows_affected": 0,
                "last_insert_id": None,
            }


async def test_goaway_from_the_client_with_a_huge_id_is_refused_and_the_connection_kept(
    autojump_clock,
):
    async with running() as (node, nursery):
        client = await attach(node, nursery)
        body = {"reason": "client_close", "last_request_id": 2**1100, "message": ""}
        await client.send_bytes(encode_frame(Kind.GOAWAY, 0, cbor2.dumps(body)))
        assert isinstance(await client.receive(), Error)
        await client.send(GoAway("client_close", 0, ""))
        assert await client.read_until_eof() == []


async def test_a_connection_whose_welcome_is_being_written_is_not_evicted(autojump_clock):
    # Evicted then, the client would see a completed handshake, then a lost connection.
    async with running(max_pending_handshakes=1, handshake_timeout=30.0) as (node, nursery):
        slow = await attach(node, nursery, lockstep=True, handshake=False)
        await slow.send(Hello(versions=PROTOCOL_VERSIONS))
        await trio.sleep(0.5)  # the node is writing WELCOME; the client has not read it
        await attach(node, nursery, handshake=False)
        await trio.sleep(0.1)
        assert isinstance(await slow.receive(), Welcome)
        await slow.send(Ping(1))
        assert isinstance(await slow.receive(), Pong)
        assert node.statistics()["handshakes_evicted"] == 0


async def test_a_welcome_written_past_the_handshake_deadline_keeps_its_connection(
    autojump_clock,
):
    # The HELLO came in time; the watchdog held the handshake deadline through the
    # WELCOME's write and then closed the connection the client saw welcomed.
    async with running(handshake_timeout=10.0, client_idle_timeout=600.0) as (node, nursery):
        slow = await attach(node, nursery, lockstep=True, handshake=False)
        await trio.sleep(9.9)
        await slow.send(Hello(versions=PROTOCOL_VERSIONS))
        await trio.sleep(0.5)  # the WELCOME's write is under way past the deadline
        assert isinstance(await slow.receive(), Welcome)
        await slow.send(Ping(1))
        assert isinstance(await slow.receive(), Pong)
