"""Timers of the test node in virtual time: MockClock (autojump) and in-memory streams.

Every assertion is exact: the node reads time only from trio.current_time().
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from qdb_client.protocol import Error, GoAway, Ping, Pong, Response
from qdb_client.testing import QdbNode, ServerConfig

from ..common.raw_client import RawClient

EXACT = 1e-9


@asynccontextmanager
async def memory_node(**config) -> AsyncIterator[tuple[QdbNode, RawClient]]:
    """A node serving one in-memory connection; yields the node and a handshaken client."""
    node = QdbNode(ServerConfig(test_mode=True, **config))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, server_stream)
        client = RawClient(client_stream, timeout=1000.0)
        await client.handshake()
        try:
            yield node, client
        finally:
            await client.aclose()
            await node.aclose()


async def test_idle_goaway_arrives_exactly_at_the_idle_timeout(autojump_clock):
    async with memory_node(client_idle_timeout=7.0) as (_, client):
        start = trio.current_time()
        goaway = await client.receive()
        assert trio.current_time() - start == pytest.approx(7.0, abs=EXACT)
        assert isinstance(goaway, GoAway) and goaway.reason == "idle_timeout"
        assert goaway.last_request_id == 0
        assert await client.read_until_eof() == []


async def test_every_frame_restarts_the_idle_countdown(autojump_clock):
    async with memory_node(client_idle_timeout=7.0) as (_, client):
        start = trio.current_time()
        await trio.sleep(5.0)
        await client.send(Ping(1))
        assert await client.receive() == Pong(1)
        goaway = await client.receive()
        assert isinstance(goaway, GoAway)
        assert trio.current_time() - start == pytest.approx(12.0, abs=EXACT)


async def test_in_flight_requests_keep_a_connection_from_idling(autojump_clock):
    async with memory_node(client_idle_timeout=7.0, request_timeout=60.0) as (node, client):
        node.faults.add_latency("ping", 10.0)
        start = trio.current_time()
        reply = await client.request("ping")
        assert isinstance(reply, Response)
        assert trio.current_time() - start == pytest.approx(10.0, abs=EXACT)
        goaway = await client.receive()
        assert isinstance(goaway, GoAway) and goaway.last_request_id == reply.request_id
        assert trio.current_time() - start == pytest.approx(17.0, abs=EXACT)


async def test_missing_hello_times_out_at_the_idle_timeout(autojump_clock):
    node = QdbNode(ServerConfig(client_idle_timeout=3.0))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.serve_connection, server_stream)
        client = RawClient(client_stream, timeout=1000.0)
        start = trio.current_time()
        messages = await client.read_until_eof()
        assert trio.current_time() - start == pytest.approx(3.0, abs=EXACT)
        assert len(messages) == 1 and isinstance(messages[0], Error)
        assert messages[0].name == "TIMEOUT" and messages[0].request_id == 0


@pytest.mark.parametrize(
    ("deadline_ms", "request_timeout", "expected"),
    [(2500, 5.0, 2.5), (None, 4.0, 4.0), (9000, 4.0, 4.0), (0, 5.0, 0.0)],
)
async def test_timeout_arrives_exactly_at_the_effective_deadline(
    autojump_clock, deadline_ms, request_timeout, expected
):
    async with memory_node(request_timeout=request_timeout, client_idle_timeout=600) as (
        node,
        client,
    ):
        node.faults.add_latency("*", 100.0)
        start = trio.current_time()
        reply = await client.request("query", {"sql": "select 1"}, deadline_ms=deadline_ms)
        assert trio.current_time() - start == pytest.approx(expected, abs=EXACT)
        assert isinstance(reply, Error) and reply.name == "TIMEOUT"
        assert reply.retryable is True and reply.details == {"executed": False}
        node.faults.clear_latency()
        result = await client.call("query", {"sql": "select 2"})  # real SQL, no virtual time
        assert result["rows"] == [[2]]
        assert trio.current_time() - start == pytest.approx(expected, abs=EXACT)


async def test_latency_fault_is_exact_in_virtual_time(autojump_clock):
    async with memory_node() as (node, client):
        node.faults.add_latency("ping", 1.25)
        start = trio.current_time()
        assert (await client.call("ping"))["node_id"] == node.node_id
        assert trio.current_time() - start == pytest.approx(1.25, abs=EXACT)
