"""Fault controls, over the wire (NodeControl) and in-process (node.faults), and statistics."""

from __future__ import annotations

import pytest
import trio

from qdb_client.errors import ConnectError, ConnectionLost, InvalidRequest, MethodNotFound
from qdb_client.protocol import Error, GoAway, Ping, Pong, Response
from qdb_client.testing import NodeControl, QdbNode, open_node, open_node_control

from ..common.fixtures import node_config
from ..common.raw_client import raw_client


async def test_fail_next_by_name(node: QdbNode, control: NodeControl):
    await control.fail_next(2, code="INTERNAL", message="boom")
    async with raw_client(node.address) as client:
        for _ in range(2):
            reply = await client.request("ping")
            assert isinstance(reply, Error)
            assert (reply.name, reply.code, reply.retryable) == ("INTERNAL", 500, True)
            assert reply.message == "boom"
            assert reply.details == {"injected": True, "executed": False}
        assert (await client.call("ping"))["node_id"] == node.node_id
    assert (await control.stats())["errors_sent"] == {"INTERNAL": 2}


@pytest.mark.parametrize(
    ("code", "name", "retryable"),
    [
        (503, "UNAVAILABLE", True),
        (500, "INTERNAL", True),
        (408, "TIMEOUT", True),
        (409, "CONFLICT", False),
        (422, "CONSTRAINT_VIOLATION", False),
    ],
)
async def test_fail_next_by_numeric_class(
    node: QdbNode, control: NodeControl, code, name, retryable
):
    await control.fail_next(1, code=code, retry_after_ms=250)
    async with raw_client(node.address) as client:
        reply = await client.request("query", {"sql": "select 1"})
        assert isinstance(reply, Error)
        assert (reply.code, reply.name, reply.retryable) == (code, name, retryable)
        assert reply.retry_after_ms == 250
        assert (await client.call("query", {"sql": "select 1"}))["rows"] == [[1]]


async def test_fail_next_limited_to_methods_and_does_not_execute(
    node: QdbNode, control: NodeControl
):
    await control.fail_next(1, code=503, methods=["execute"])
    async with raw_client(node.address) as client:
        assert (await client.call("ping"))["node_id"] == node.node_id
        reply = await client.request("execute", {"sql": "create table t(x)"})
        assert isinstance(reply, Error) and reply.name == "UNAVAILABLE"
        missing = await client.request("query", {"sql": "select * from t"})
        assert isinstance(missing, Error) and missing.name == "SQL_ERROR"  # never created


async def test_fail_next_rejects_bad_arguments(control: NodeControl):
    with pytest.raises(InvalidRequest):
        await control.fail_next(1, code=999)
    with pytest.raises(InvalidRequest):
        await control.fail_next(1, code="NO_SUCH_CODE")
    with pytest.raises(InvalidRequest):
        await control.call("control.fail_next", {"count": -1})


async def test_add_latency_per_method_and_wildcard(node: QdbNode, control: NodeControl):
    await control.add_latency("query", 0.2)
    async with raw_client(node.address) as client:
        start = trio.current_time()
        await client.call("ping")
        assert trio.current_time() - start < 0.15
        start = trio.current_time()
        await client.call("query", {"sql": "select 1"})
        assert trio.current_time() - start >= 0.19
        await control.add_latency("query", 0)
        await control.add_latency("*", 0.15)
        start = trio.current_time()
        await client.call("ping")
        await client.call("query", {"sql": "select 1"})
        assert trio.current_time() - start >= 0.29
        assert (await control.stats())["faults"]["latency_ms"] == {"*": 150}


async def test_stop_pings_silences_ping_frames_and_the_ping_method(
    node: QdbNode, control: NodeControl
):
    await control.stop_pings(True)
    async with raw_client(node.address) as client:
        await client.send(Ping(5))
        rid = await client.send_request("ping", deadline_ms=300)
        other = await client.request("query", {"sql": "select 1"})
        assert isinstance(other, Response)
        assert await client.nothing_within(0.5)  # neither PONG nor reply nor TIMEOUT
        assert await control.ping() == node.node_id  # the control tool is exempt
        await control.stop_pings(False)
        await client.send(Ping(6))
        assert await client.receive() == Pong(6)
        assert (await client.request("ping")).request_id == rid + 2
    assert (await control.stats())["pings_answered"] == 1


async def test_drop_connections_closes_others_abruptly(node: QdbNode, control: NodeControl):
    async with raw_client(node.address) as a, raw_client(node.address) as b:
        assert await control.drop_connections() == 2
        for client in (a, b):
            assert await client.read_until_eof() == []  # no GOAWAY
        assert (await control.stats())["connections_open"] == 0
    async with raw_client(node.address) as c:
        assert (await c.call("ping"))["node_id"] == node.node_id


async def test_refuse_connections_really_stops_listening(node: QdbNode, control: NodeControl):
    async with raw_client(node.address) as existing:
        await control.refuse_connections(True)
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", node.port)
        with pytest.raises(ConnectError):
            async with open_node_control(node.address):
                pytest.fail("a control connection must not open")
        assert (await existing.call("ping"))["node_id"] == node.node_id
        await control.refuse_connections(False)
        async with raw_client(node.address) as fresh:
            assert (await fresh.call("ping"))["node_id"] == node.node_id
        await control.refuse_connections(True)
        await control.reset()  # reset listens again too
        async with raw_client(node.address) as fresh:
            assert (await fresh.call("ping"))["node_id"] == node.node_id


async def test_stats_count_traffic_and_reset_zeroes_them(node: QdbNode, control: NodeControl):
    async with raw_client(node.address) as client:
        await client.call("ping")
        await client.call("query", {"sql": "select 1"})
        await client.request("query", {"sql": "nonsense"})
        await client.request("nope")
        await client.send(Ping(1))
        await client.receive()
        await client.send_bytes(b"QD\x00\x10\x00\x00\x00\x15" + b"\x00" * 13)  # bad CRC
        await client.receive()
        stats = await control.stats()
    assert stats["connections_accepted"] == 1  # the control connection is not counted
    assert stats["connections_open"] == 1
    assert stats["connections_refused"] == 0
    # Unknown method names are counted together (bounded statistics).
    assert stats["requests_by_method"] == {"ping": 1, "query": 2, "<unknown>": 1}
    assert stats["errors_sent"] == {"SQL_ERROR": 1, "METHOD_NOT_FOUND": 1, "PARSE_ERROR": 1}
    assert stats["bad_frames"] == 1
    assert stats["pings_answered"] == 1
    assert stats["node_id"] == node.node_id
    assert stats == {**node.statistics(), "connections_open": 1}
    await control.fail_next(3)
    await control.reset()
    stats = await control.stats()
    assert stats["requests_by_method"] == {} and stats["errors_sent"] == {}
    assert stats["connections_accepted"] == stats["bad_frames"] == stats["pings_answered"] == 0
    assert stats["faults"]["fail_next"] == []


async def test_shutdown_sends_goaway_and_finishes_in_flight(node: QdbNode, control: NodeControl):
    node.faults.add_latency("ping", 0.3)
    async with raw_client(node.address) as client:
        rid = await client.send_request("ping")
        await trio.sleep(0.05)
        await control.shutdown(grace=2.0)
        goaway = await client.receive()
        assert isinstance(goaway, GoAway)
        assert goaway.reason == "shutdown" and goaway.last_request_id == rid
        late = await client.request("ping")
        assert isinstance(late, Error) and late.name == "SHUTTING_DOWN" and late.retryable
        reply = await client.receive()
        assert isinstance(reply, Response) and reply.request_id == rid
        assert await client.read_until_eof() == []
    with trio.fail_after(5):
        await node.wait_stopped()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", node.port)


async def test_shutdown_grace_bounds_in_flight_work(node: QdbNode):
    node.faults.add_latency("ping", 10.0)
    async with raw_client(node.address) as client:
        await client.send_request("ping")
        await trio.sleep(0.05)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.shutdown, 0.2)
            messages = await client.read_until_eof()
            assert 0.15 < trio.current_time() - start < 1.0
            assert [type(m) for m in messages] == [GoAway]  # the slow request never answered
            await client.aclose()  # ends the node's lingering close at once
        assert node.stopped


async def test_control_methods_need_test_mode(tmp_path):
    async with (
        open_node(node_config(tmp_path, test_mode=False)) as node,
        open_node_control(node.address) as control,
    ):
        with pytest.raises(MethodNotFound):
            await control.stats()
        assert await control.ping() == node.node_id


async def test_in_process_faults_are_synchronous(node: QdbNode):
    faults = node.faults
    faults.fail_next(1, code="OVERLOADED", methods=["ping"])
    faults.stop_pings(True)
    faults.stop_pings(False)
    async with raw_client(node.address) as client:
        reply = await client.request("ping")
        assert isinstance(reply, Error) and reply.name == "OVERLOADED" and reply.code == 429
        assert faults.stats()["errors_sent"] == {"OVERLOADED": 1}
        faults.refuse_connections(True)
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", node.port)
        faults.refuse_connections(False)
        assert faults.drop_connections() == 1
        assert await client.read_until_eof() == []
    faults.reset()
    assert faults.stats()["errors_sent"] == {}
    with pytest.raises(ValueError):
        faults.add_latency("ping", -1)


async def test_control_client_errors_are_qdb_errors(tmp_path):
    async with open_node(node_config(tmp_path)) as node:
        address = node.address
        control = NodeControl(address)
        try:
            assert await control.ping() == node.node_id
            node.drop_connections()
            await trio.sleep(0.05)
            with pytest.raises(ConnectionLost):
                await control.stats()
            assert (await control.stats())["node_id"] == node.node_id  # reconnects
        finally:
            await control.aclose()
    with pytest.raises(ConnectError):
        async with open_node_control(address):
            pytest.fail("a control connection must not open")
