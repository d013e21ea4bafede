"""One test-node connection against a client that sends too much or reads too little.

What the node sends must fit the client's HELLO ``max_frame`` (errors that
echo the client's input included, and a WELCOME listing many members); a
client that stops reading stops being read (TCP backpressure) instead of
making the node run all it pipelines; a result far above the frame is
refused without being held; a request arriving at the idle deadline is
answered; a graceful drain answers every accepted request.

In-memory streams and virtual time throughout. Each test names the contract
of docs/protocol.md it holds the node to.
"""

from __future__ import annotations

import logging
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import trio
import trio.testing

from qdb_client.protocol import (
    Cancel,
    Error,
    GoAway,
    Hello,
    Kind,
    Request,
    Response,
    Welcome,
    encode_frame,
    encode_message,
    error_message,
)
from qdb_client.protocol.codes import ErrorCode
from qdb_client.testing import QdbNode, ServerConfig
from qdb_client.testing.outgoing import (
    MAX_ERROR_TEXT,
    bounded_error,
    fewer_members,
    minimal_error,
)

from ..common.raw_client import RawClient


@asynccontextmanager
async def memory_node(
    *, lockstep: bool = False, handshake: dict[str, Any] | None = None, **config: Any
) -> AsyncIterator[tuple[QdbNode, RawClient, trio.Nursery]]:
    config.setdefault("client_idle_timeout", 600.0)
    config.setdefault("request_timeout", 60.0)
    node = QdbNode(ServerConfig(test_mode=True, **config))
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client_end, node_end = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, node_end)
        client = RawClient(client_end, timeout=1000.0)
        await client.handshake(**(handshake or {}))
        try:
            yield node, client, nursery
        finally:
            await client.aclose()
            await node.aclose()


def connection_failures(caplog: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]


# ----------------------------------------- replies above the client's max_frame


async def test_version_mismatch_to_a_client_with_a_small_max_frame_is_still_answered(
    autojump_clock, caplog
):
    # 7.1/7.2: the node's first frame is WELCOME or ERROR; with no common
    # version, ERROR VERSION_MISMATCH. Listing every version the client
    # offered (400 of them) would not fit the 1024-byte frame it announced.
    caplog.set_level(logging.DEBUG, logger="qdb_client.testing")
    node = QdbNode(ServerConfig(test_mode=True))
    client_end, node_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, node_end)
        client = RawClient(client_end, timeout=1000.0)
        await client.send(Hello(versions=(2,) * 400, max_frame_size=1024))
        messages = await client.read_until_eof()
    await node.aclose()
    assert connection_failures(caplog) == []
    assert [type(m) for m in messages][:1] == [Error], messages


async def test_a_bad_frame_whose_parse_error_is_long_keeps_the_connection(autojump_clock, caplog):
    # 4: a per-message fault (here a map with a duplicate key) is answered
    # PARSE_ERROR "and keeps the connection". cbor2's message quotes the key,
    # so a 3000-character key would make a PARSE_ERROR above the client's
    # 1024-byte max_frame; the node cuts it down instead of dying.
    caplog.set_level(logging.DEBUG, logger="qdb_client.testing")
    async with memory_node(handshake={"max_frame_size": 1024}) as (node, client, _):
        node.faults.add_latency("ping", 1.0)
        in_flight = await client.send_request("ping")
        key = cbor2.dumps("k" * 3000)
        body = b"\xa2" + key + b"\x01" + key + b"\x02"  # {"kkk...": 1, "kkk...": 2}
        await client.send_bytes(encode_frame(Kind.REQUEST, 50, body))
        got = [await client.receive(), await client.receive()]
        assert connection_failures(caplog) == []
        assert sorted((type(m).__name__, m.request_id) for m in got) == [
            ("Error", 50),
            ("Response", in_flight),
        ], got


# --------------------------------------------------------- bounded buffering


async def test_a_client_that_never_reads_cannot_make_the_node_run_unbounded_requests(
    autojump_clock,
):
    # 8.1 / rule 8 (bound everything): max_in_flight bounds what the node
    # processes for a connection. Slots are freed *before* the reply is
    # written, so the replies waiting for the write lock are bounded too: the
    # node stops reading a client whose replies pile up (here 40 pipelined
    # requests, max_in_flight=2, nothing read).
    limit, sent = 2, 40
    async with memory_node(lockstep=True, max_in_flight=limit) as (node, client, nursery):
        await client.call("execute", {"sql": "create table t(x)"})

        async def pipeline() -> None:
            for _ in range(sent):
                await client.send_request("execute", {"sql": "insert into t values (1)"})

        with trio.move_on_after(10.0):
            await pipeline()  # lockstep: returns only as fast as the node reads
        await trio.sleep(10.0)
        observer_end, node_end = trio.testing.memory_stream_pair()
        nursery.start_soon(node.serve_connection, node_end)
        observer = RawClient(observer_end, timeout=1000.0)
        await observer.handshake()
        executed = (await observer.call("query", {"sql": "select count(*) from t"}))["rows"]
        await observer.aclose()
        # Room for the reply being written plus one full set of slots.
        assert executed[0][0] <= 2 * limit + 1, f"{executed[0][0]} of {sent} ran unread"


async def test_a_query_result_far_above_max_frame_is_refused_without_holding_it(
    autojump_clock,
):
    # 10: a result bigger than the client's max_frame is answered
    # FRAME_TOO_LARGE. The node counts the result as it fetches it and stops
    # past the limit, so the memory one request pins is bounded by the frame
    # (not 48 MB for a 1 MiB limit, or 4 GB with LIMIT 4000).
    async with memory_node() as (_node, client, _):
        sql = (
            "with recursive r(n) as (select 1 union all select n + 1 from r limit 48)"
            " select zeroblob(1000000) from r"
        )
        tracemalloc.start()
        try:
            reply = await client.request("query", {"sql": sql})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(reply, Error) and reply.name == "FRAME_TOO_LARGE", reply
        assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB to answer FRAME_TOO_LARGE"


# ----------------------------------------------------------- idle watchdog


class _HeldStream(trio.abc.Stream):
    """The node's end; its second read returns exactly at ``wake_at``.

    So the reader task and the idle watchdog wake in the same scheduling
    batch, which is what a request arriving at the idle deadline looks like.
    """

    def __init__(self, inner: trio.abc.Stream, wake_at: float) -> None:
        self.inner = inner
        self.wake_at = wake_at
        self.reads = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.reads += 1
        data = await self.inner.receive_some(max_bytes)
        if self.reads == 2:  # the request's bytes are in; hand them over at wake_at
            await trio.sleep_until(self.wake_at)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _request_at_the_idle_deadline() -> list[Any]:
    idle = 7.0
    node = QdbNode(ServerConfig(test_mode=True, client_idle_timeout=idle, request_timeout=60.0))
    node.faults.add_latency("ping", 1.0)
    client_end, node_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, _HeldStream(node_end, trio.current_time() + idle))
        client = RawClient(client_end, timeout=1000.0)
        await client.handshake()
        await client.send(Request(1, "ping", {}))
        messages = await client.read_until_eof()
    await node.aclose()
    return messages


def _accepted_request_answered(messages: list[Any]) -> bool:
    goaway = next(m for m in messages if isinstance(m, GoAway))
    replies = {m.request_id for m in messages if isinstance(m, (Response, Error))}
    # GOAWAY promises an answer to every accepted id up to last_request_id.
    return all(rid in replies for rid in range(1, goaway.last_request_id + 1))


def test_a_request_arriving_at_the_idle_deadline_is_answered_or_refused():
    # 7.5/11: idle GOAWAY only when nothing is in flight, and every request up
    # to GOAWAY last_request_id is answered. Trio runs the tasks of one batch
    # in either order; when the reader goes first it accepts the request, and
    # the already-fired watchdog must then start counting again, not close.
    # 30 runs: each order ~15 times.
    outcomes = []
    for _ in range(30):
        clock = trio.testing.MockClock(autojump_threshold=0)
        messages = trio.run(_request_at_the_idle_deadline, clock=clock)
        outcomes.append(_accepted_request_answered(messages))
    assert all(outcomes), f"{outcomes.count(False)} of 30 runs lost an accepted request"


# ---------------------------------------------------------- graceful drain


async def test_drain_answers_every_accepted_request_and_a_cancel_after_goaway(autojump_clock):
    # Held up: GOAWAY names the highest accepted id, requests up to it are
    # answered (a CANCEL after the GOAWAY included), later ones SHUTTING_DOWN.
    async with memory_node() as (node, client, nursery):
        node.faults.add_latency("ping", 2.0)
        ids = [await client.send_request("ping") for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()  # the node has read all three
        nursery.start_soon(node.shutdown, 30.0)
        goaway = await client.receive()
        assert isinstance(goaway, GoAway) and goaway.last_request_id == ids[-1]
        late = await client.send_request("ping")
        await client.send(Cancel(ids[1]))
        replies = {m.request_id: m for m in await client.read_until_eof()}
        assert sorted(replies) == [*ids, late]
        assert isinstance(replies[ids[0]], Response) and isinstance(replies[ids[2]], Response)
        assert replies[ids[1]].name == "CANCELLED" and replies[late].name == "SHUTTING_DOWN"


# -------------------------------------------------- more of the same limits


async def test_a_welcome_listing_too_many_members_lists_fewer(autojump_clock):
    peers = [f"10.0.0.{i}:{7000 + i}" for i in range(1, 200)]
    node = QdbNode(ServerConfig(test_mode=True, peers=peers))
    client_end, node_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, node_end)
        client = RawClient(client_end, timeout=1000.0)
        welcome = await client.handshake(max_frame_size=1024)
        assert 1 <= len(welcome.members) < 200
        assert welcome.members[0].node_id == node.node_id  # this node first
        assert (await client.call("ping"))["node_id"] == node.node_id
        await client.aclose()
    await node.aclose()


async def test_a_long_method_name_is_answered_within_a_small_frame(autojump_clock):
    async with memory_node(handshake={"max_frame_size": 1024}) as (_node, client, _):
        reply = await client.request("m" * 5000)
        assert isinstance(reply, Error) and reply.name == "METHOD_NOT_FOUND", reply
        assert len(encode_message(reply)) <= 1024
        assert (await client.call("ping"))["node_id"]


async def test_running_requests_never_stop_the_node_reading_cancels(autojump_clock):
    # Backpressure counts replies waiting to be written, not requests running:
    # with every slot busy the node still reads (and answers) a CANCEL at once.
    async with memory_node(max_in_flight=2) as (node, client, _):
        node.faults.add_latency("ping", 30.0)
        first, second = await client.send_request("ping"), await client.send_request("ping")
        start = trio.current_time()
        await client.send(Cancel(first))
        reply = await client.receive()
        assert isinstance(reply, Error) and reply.request_id == first
        assert reply.name == "CANCELLED" and trio.current_time() == start
        await client.send(Cancel(second))
        assert (await client.receive()).request_id == second


async def test_a_query_value_above_max_frame_is_refused_before_it_is_built(autojump_clock):
    async with memory_node(handshake={"max_frame_size": 4096}) as (_node, client, _):
        tracemalloc.start()
        try:
            reply = await client.request("query", {"sql": "select zeroblob(200000000)"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert isinstance(reply, Error) and reply.name == "FRAME_TOO_LARGE", reply
        assert reply.details["max_frame"] == 4096 and "executed" not in reply.details
        assert peak < 16 * 2**20
        # A value stored by a write is no problem as long as the query does not
        # materialise it: length() reads only its size.
        await client.call("execute", {"sql": "create table t(b)"})
        await client.call("execute", {"sql": "insert into t values (zeroblob(9000))"})
        assert (await client.call("query", {"sql": "select length(b) from t"}))["rows"] == [[9000]]
        whole = await client.request("query", {"sql": "select b from t"})
        assert isinstance(whole, Error) and whole.name == "FRAME_TOO_LARGE", whole


def test_errors_are_cut_to_fit_and_keep_their_facts():
    details = {"executed": False, "statement_index": 3, "method": "m" * 1000}
    error = error_message(7, ErrorCode.SQL_ERROR, "é" * 5000, details=details)
    bounded = bounded_error(error)
    assert len(bounded.message.encode()) <= MAX_ERROR_TEXT and bounded.message.endswith("[...]")
    assert len(bounded.details["method"]) <= 256
    short = minimal_error(bounded)
    assert (short.request_id, short.name, short.code, short.retryable) == (
        7,
        "SQL_ERROR",
        422,
        False,
    )
    assert short.details == {"executed": False, "statement_index": 3}
    assert len(encode_message(short)) < 1024
    small = error_message(1, ErrorCode.TIMEOUT, "late")
    assert bounded_error(small) is small


def test_fewer_members_halves_the_list_keeping_this_node_first():
    members = QdbNode(ServerConfig(peers=["10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3"])).members()
    welcome = Welcome(1, "node-0", "s", 1024, 8, 1000, members, "x")
    half = fewer_members(welcome)
    assert half is not None and half.members == members[:2]
    one = fewer_members(fewer_members(half) or half)
    assert one is None
