"""Requests on one test-node connection: CANCEL acknowledgements and request slots.

In-memory streams; virtual time (``autojump_clock``) wherever time matters,
so every timing assertion is exact. docs/protocol.md section 8.3: every
request gets exactly one reply, a CANCEL of a running request is answered
CANCELLED, and a slot is free before the reply that frees it is written.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from qdb_client.protocol import Cancel, Error, GoAway, Message, Request, Response
from qdb_client.testing import QdbNode, ServerConfig

from ..common.raw_client import RawClient

EXACT = 1e-9


class YieldingStream(trio.abc.Stream):
    """A stream whose ``send_all`` yields after delivering, as trio sockets do.

    ``settle``: wait until every other task is blocked instead of one
    checkpoint, so the peer has surely read, reacted and written before
    ``send_all`` returns (deterministic; not for use under autojump).
    """

    def __init__(self, inner: trio.abc.Stream, *, settle: bool = False) -> None:
        self.inner = inner
        self.settle = settle

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        if self.settle:
            await trio.testing.wait_all_tasks_blocked()
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def memory_node(
    *, lockstep: bool = False, settle: bool | None = None, **config: Any
) -> AsyncIterator[tuple[QdbNode, RawClient]]:
    """A test-mode node serving one in-memory connection, and a handshaken client.

    ``lockstep``: every write blocks until the other side read it (a client
    that is slow to read). ``settle``: wrap the node's end in YieldingStream.
    """
    config.setdefault("client_idle_timeout", 600.0)
    config.setdefault("request_timeout", 60.0)
    node = QdbNode(ServerConfig(test_mode=True, **config))
    if lockstep:
        client_end, node_end = trio.testing.lockstep_stream_pair()
    else:
        client_end, node_end = trio.testing.memory_stream_pair()
    served: trio.abc.Stream = node_end
    if settle is not None:
        served = YieldingStream(node_end, settle=settle)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, served)
        client = RawClient(client_end, timeout=1000.0)
        await client.handshake()
        try:
            yield node, client
        finally:
            await client.aclose()
            await node.aclose()


def assert_cancelled(message: Message | Any, rid: int) -> None:
    assert isinstance(message, Error), message
    assert message.request_id == rid
    assert (message.name, message.code, message.retryable) == ("CANCELLED", 499, False)
    assert message.details == {"executed": False}


# ------------------------------------------------------------------ CANCEL


async def test_cancel_of_a_running_request_is_answered_cancelled_at_once(autojump_clock):
    async with memory_node() as (node, client):
        node.faults.add_latency("ping", 10.0)
        start = trio.current_time()
        rid = await client.send_request("ping")
        await trio.sleep(1.0)
        assert node.statistics()["in_flight"] == 1
        await client.send(Cancel(rid))
        assert_cancelled(await client.receive(), rid)
        assert trio.current_time() - start == pytest.approx(1.0, abs=EXACT)
        stats = node.statistics()
        assert stats["in_flight"] == 0 and stats["requests_cancelled"] == 1
        assert stats["errors_sent"] == {"CANCELLED": 1}
        assert await client.nothing_within(20.0)  # the stopped ping never answers later
        node.faults.clear_latency()
        assert (await client.call("ping"))["node_id"] == node.node_id


async def test_cancel_after_the_reply_and_of_unknown_ids_sends_nothing(autojump_clock):
    async with memory_node() as (node, client):
        reply = await client.request("ping")
        assert isinstance(reply, Response)
        await client.send(Cancel(reply.request_id))  # finished: the CANCEL crossed the reply
        await client.send(Cancel(999))  # never sent
        await client.send(Cancel(0))
        assert await client.nothing_within(5.0)
        assert node.statistics()["requests_cancelled"] == 0
        assert node.statistics()["errors_sent"] == {}


async def test_cancel_crossing_a_reply_being_written_is_ignored(autojump_clock):
    # Lockstep: the node's reply write waits for the client to read, so the
    # CANCEL arrives while the reply is on its way: the reply is the answer.
    async with memory_node(lockstep=True) as (node, client):
        rid = await client.send_request("ping")
        await trio.sleep(1.0)
        assert node.statistics()["in_flight"] == 0  # the slot went before the write
        await client.send(Cancel(rid))
        reply = await client.receive()
        assert isinstance(reply, Response) and reply.request_id == rid
        assert await client.nothing_within(5.0)
        assert node.statistics()["requests_cancelled"] == 0


async def test_cancelled_keyed_write_stores_nothing_and_its_key_runs_again(autojump_clock):
    async with memory_node() as (node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        node.faults.add_latency("execute", 5.0)
        write = {"sql": "insert into t values (1)"}
        rid = await client.send_request("execute", write, idempotency_key="k-1")
        await trio.sleep(1.0)
        await client.send(Cancel(rid))
        assert_cancelled(await client.receive(), rid)
        node.faults.clear_latency()
        assert (await client.call("query", {"sql": "select count(*) from t"}))["rows"] == [[0]]
        assert node.statistics()["idempotent_stored"] == 0
        # Nothing is stored under the key: the same write executes (it is not a replay).
        again = await client.call("execute", write, idempotency_key="k-1")
        assert again == {"rows_affected": 1, "last_insert_id": 1}
        stats = node.statistics()
        assert stats["idempotent_stored"] == 1 and stats["idempotent_hits"] == 0


async def test_cancel_of_a_hung_ping_stays_unanswered(autojump_clock):
    # stop_pings plays a node that stalled: it answers nothing, CANCEL included.
    async with memory_node() as (node, client):
        node.faults.stop_pings()
        rid = await client.send_request("ping", deadline_ms=30_000)
        await trio.sleep(1.0)
        await client.send(Cancel(rid))
        assert await client.nothing_within(60.0)
        assert node.statistics()["in_flight"] == 0
        assert node.statistics()["requests_cancelled"] == 0


async def test_the_control_tools_cancels_are_not_counted(autojump_clock):
    async with memory_node() as (node, _):
        client_end, node_end = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.serve_connection, node_end)
            tool = RawClient(client_end, timeout=1000.0)
            await tool.handshake(client_name="qdb_client.testing.control")
            rid = await tool.send_request("control.stats")
            await tool.send(Cancel(rid))
            reply = await tool.receive()
            assert isinstance(reply, (Response, Error)) and reply.request_id == rid
            stats = node.statistics()
            assert stats["requests_cancelled"] == 0 and stats["errors_sent"] == {}
            await tool.aclose()


# ------------------------------------------------------------------- slots


async def test_a_request_sent_the_moment_a_reply_arrives_finds_its_slot_free():
    # The node's writes return only once the client has read the reply and
    # written its next request (YieldingStream with settle): a slot freed
    # after the write would still be taken then.
    async with memory_node(max_in_flight=1, settle=True) as (node, client):
        rid = await client.send_request("ping")
        for _ in range(50):
            reply = await client.receive()
            assert isinstance(reply, Response), reply
            assert reply.request_id == rid
            rid = await client.send_request("ping")  # one write, as soon as the reply is read
        assert isinstance(await client.receive(), Response)
        assert node.statistics()["errors_sent"] == {}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_storm_of_requests_and_cancels_never_exceeds_the_slots(autojump_clock, seed):
    rng = random.Random(seed)
    total, limit = 300, 8
    async with memory_node(max_in_flight=limit, settle=False) as (node, client):
        await client.call("execute", {"sql": "create table t(x)"})
        node.faults.add_latency("ping", 0.5)
        node.faults.add_latency("query", 0.1)
        node.faults.add_latency("execute", 0.3)
        calls = [
            ("ping", {}),
            ("query", {"sql": "select 1"}),
            ("execute", {"sql": "insert into t values (1)"}),
            ("batch", {"statements": [{"sql": "select 1"}]}),  # no latency: instant
        ]
        free = trio.Semaphore(limit)  # the client's own count of the node's slots
        write_lock = trio.Lock()
        sent: set[int] = set()
        cancelled: set[int] = set()
        replies: dict[int, Message] = {}

        async def write(message: Message) -> None:
            async with write_lock:
                await client.send(message)

        async def cancel_later(rid: int, delay: float) -> None:
            await trio.sleep(delay)
            cancelled.add(rid)
            await write(Cancel(rid))

        async def send_all(nursery: trio.Nursery) -> None:
            for _ in range(total):
                await free.acquire()
                rid = client.next_id()
                method, args = rng.choice(calls)
                sent.add(rid)
                await write(Request(rid, method, args))
                if rng.random() < 0.5:
                    nursery.start_soon(cancel_later, rid, rng.uniform(0.0, 0.7))

        async def read_all() -> None:
            while len(replies) < total:
                message = await client.receive()
                assert isinstance(message, (Response, Error)), message
                rid = message.request_id
                assert rid in sent and rid not in replies  # exactly one reply each
                replies[rid] = message
                if isinstance(message, Error):
                    assert message.name == "CANCELLED", message
                    assert rid in cancelled
                free.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, nursery)
            await read_all()
        assert await client.nothing_within(5.0)  # late CANCELs get nothing
        acks = sum(isinstance(m, Error) for m in replies.values())
        assert 0 < acks < len(cancelled)  # some cancels stopped requests, some came too late
        stats = node.statistics()
        assert stats["errors_sent"] == {"CANCELLED": acks}
        assert stats["requests_cancelled"] == acks and stats["in_flight"] == 0


# --------------------------------------------- closing waits for the writes


async def test_shutdown_waits_for_a_reply_still_being_written(autojump_clock):
    async with memory_node(lockstep=True) as (node, client):
        node.faults.add_latency("ping", 1.0)
        rid = await client.send_request("ping")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.shutdown, 30.0)
            goaway = await client.receive()
            assert isinstance(goaway, GoAway) and goaway.reason == "shutdown"
            assert goaway.last_request_id == rid
            await trio.sleep(5.0)  # the reply is ready at +1 s; this client reads at +5 s
            assert node.statistics()["in_flight"] == 0
            assert not node.stopped
            assert [(type(m), m.request_id) for m in await client.read_until_eof()] == [
                (Response, rid)
            ]


async def test_a_reply_being_written_keeps_the_connection_from_idling(autojump_clock):
    async with memory_node(lockstep=True, client_idle_timeout=2.0) as (_, client):
        start = trio.current_time()
        rid = await client.send_request("ping")
        await trio.sleep(5.0)  # the reply waits for this client to read
        reply = await client.receive()
        assert isinstance(reply, Response) and reply.request_id == rid
        goaway = await client.receive()
        assert isinstance(goaway, GoAway) and goaway.reason == "idle_timeout"
        # Idle counts from the moment the reply was written, not computed.
        assert trio.current_time() - start == pytest.approx(7.0, abs=EXACT)


async def test_client_goaway_closes_once_the_last_reply_is_written(autojump_clock):
    async with memory_node(lockstep=True) as (node, client):
        node.faults.add_latency("ping", 1.0)
        rid = await client.send_request("ping")
        await client.send(GoAway("client_close", rid))
        await trio.sleep(5.0)
        messages = await client.read_until_eof()
        assert [(type(m), m.request_id) for m in messages] == [(Response, rid)]
