"""Transport behaviour over real TCP: capacity, idle close, deadlines, concurrency, CANCEL, PING."""

from __future__ import annotations

import trio

from qdb_client.protocol import Cancel, Error, GoAway, Ping, Pong, Response
from qdb_client.testing import QdbNode, open_node

from ..common.fixtures import node_config
from ..common.raw_client import RawClient, raw_client


async def test_connections_beyond_the_maximum_get_capacity_exceeded(tmp_path):
    async with open_node(node_config(tmp_path, max_connections=2)) as node:
        async with raw_client(node.address) as first, raw_client(node.address) as second:
            third = await RawClient.connect(node.address)
            try:  # no handshake needed to be turned away
                messages = await third.read_until_eof()
            finally:
                await third.aclose()
            assert len(messages) == 1
            error = messages[0]
            assert isinstance(error, Error) and error.request_id == 0
            assert error.name == "CAPACITY_EXCEEDED" and error.code == 503
            assert error.retryable is True
            assert (await first.call("ping"))["node_id"] == node.node_id
            assert (await second.call("query", {"sql": "select 1"}))["rows"] == [[1]]
            stats = node.statistics()
            assert stats["connections_refused"] == 1
            assert stats["connections_open"] == 2
            assert stats["errors_sent"] == {"CAPACITY_EXCEEDED": 1}
        async with raw_client(node.address) as later:  # room again once they closed
            assert (await later.call("ping"))["node_id"] == node.node_id


async def test_idle_connection_gets_goaway_idle_timeout_then_eof(tmp_path):
    async with (
        open_node(node_config(tmp_path, client_idle_timeout=0.3)) as node,
        raw_client(node.address) as client,
    ):
        assert client.welcome is not None and client.welcome.idle_timeout_ms == 300
        await client.call("ping")
        start = trio.current_time()
        messages = await client.read_until_eof()
        elapsed = trio.current_time() - start
        assert len(messages) == 1
        goaway = messages[0]
        assert isinstance(goaway, GoAway)
        assert goaway.reason == "idle_timeout"
        assert goaway.last_request_id == 1
        assert "0.3 s" in goaway.message
        assert 0.25 <= elapsed < 2.0
        assert not client.reset


async def test_request_past_its_deadline_gets_timeout_and_connection_survives(node: QdbNode):
    node.faults.add_latency("query", 1.0)
    async with raw_client(node.address) as client:
        start = trio.current_time()
        reply = await client.request("query", {"sql": "select 1"}, deadline_ms=200)
        elapsed = trio.current_time() - start
        assert isinstance(reply, Error)
        assert reply.name == "TIMEOUT" and reply.code == 408 and reply.retryable is True
        assert reply.details == {"executed": False}
        assert 0.15 <= elapsed < 0.9
        assert (await client.call("ping"))["node_id"] == node.node_id


async def test_configured_request_timeout_applies_without_a_deadline(tmp_path):
    async with open_node(node_config(tmp_path, request_timeout=0.2)) as node:
        node.faults.add_latency("*", 5.0)
        async with raw_client(node.address) as client:
            reply = await client.request("ping", deadline_ms=60_000)  # the smaller one wins
            assert isinstance(reply, Error) and reply.name == "TIMEOUT"


async def test_long_statement_is_interrupted_at_the_deadline_and_rolled_back(node: QdbNode):
    endless = "with recursive r(x) as (select 1 union all select x + 1 from r)"
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "create table t(x)"})
        start = trio.current_time()
        reply = await client.request(
            "execute",
            {"sql": f"insert into t {endless} select x from r limit 100000000"},
            deadline_ms=300,
        )
        assert trio.current_time() - start < 2.0
        assert isinstance(reply, Error) and reply.name == "TIMEOUT"
        assert reply.details["executed"] is False
        reply = await client.request(
            "batch",
            {
                "statements": [
                    {"sql": "insert into t values (1)"},
                    {"sql": f"{endless} select count(*) from r"},
                ]
            },
            deadline_ms=300,
        )
        assert isinstance(reply, Error) and reply.name == "TIMEOUT"
        assert reply.details == {
            "executed": False,
            "statement_index": 1,
            "sqlite_error": "SQLITE_INTERRUPT",
        }
        assert (await client.call("query", {"sql": "select count(*) from t"}))["rows"] == [[0]]


async def test_fifty_concurrent_requests_reply_out_of_order_each_to_its_request(node: QdbNode):
    latency = {"ping": 0.3, "query": 0.2, "execute": 0.1, "batch": 0.0}
    for method, seconds in latency.items():
        node.faults.add_latency(method, seconds)
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "create table t(id integer primary key)"})
        sent: dict[int, tuple[str, int]] = {}
        for i in range(50):
            method = list(latency)[i % 4]
            if method == "query":
                args = {"sql": "select ?", "params": [i]}
            elif method == "execute":
                args = {"sql": "insert into t(id) values (?)", "params": [1000 + i]}
            elif method == "batch":
                args = {
                    "statements": [
                        {"sql": "insert into t(id) values (:id)", "params": {"id": 2000 + i}}
                    ]
                }
            else:
                args = {}
            rid = await client.send_request(method, args)
            sent[rid] = (method, i)
        order = []
        for _ in range(50):
            reply = await client.receive()
            assert isinstance(reply, Response), reply
            method, i = sent.pop(reply.request_id)
            order.append(reply.request_id)
            if method == "query":
                assert reply.result == {"columns": ["?"], "rows": [[i]], "types": [None]}
            elif method == "execute":
                assert reply.result == {"rows_affected": 1, "last_insert_id": 1000 + i}
            elif method == "batch":
                assert reply.result == {
                    "results": [{"rows_affected": 1, "last_insert_id": 2000 + i}]
                }
            else:
                assert reply.result == {"node_id": node.node_id}
        assert sent == {}
        assert order != sorted(order)
        # Replies follow completion, not sending: the 0 s batches come out ahead
        # of the 0.3 s pings. (Compared by median position: a strict grouping
        # would be a timing assertion that a loaded machine can break.)
        methods = [list(latency)[(rid - 2) % 4] for rid in order]
        positions = {m: sorted(i for i, x in enumerate(methods) if x == m) for m in latency}
        assert (
            positions["batch"][len(positions["batch"]) // 2]
            < (positions["ping"][len(positions["ping"]) // 2])
        )


async def test_requests_beyond_max_in_flight_get_capacity_exceeded(tmp_path):
    async with open_node(node_config(tmp_path, max_in_flight=3)) as node:
        node.faults.add_latency("ping", 0.2)
        async with raw_client(node.address) as client:
            ids = [await client.send_request("ping") for _ in range(5)]
            first = [await client.receive() for _ in range(2)]
            assert all(isinstance(e, Error) and e.name == "CAPACITY_EXCEEDED" for e in first)
            assert sorted(e.request_id for e in first) == ids[3:]
            rest = [await client.receive() for _ in range(3)]
            assert sorted(r.request_id for r in rest if isinstance(r, Response)) == ids[:3]


async def test_cancelled_request_is_answered_cancelled_once(node: QdbNode):
    node.faults.add_latency("ping", 0.2)
    async with raw_client(node.address) as client:
        cancelled = await client.send_request("ping")
        await client.send(Cancel(cancelled))
        kept = await client.send_request("ping")
        await client.send(Cancel(12345))  # unknown ids are ignored
        ack = await client.receive()
        assert isinstance(ack, Error) and ack.request_id == cancelled
        assert (ack.name, ack.code, ack.retryable) == ("CANCELLED", 499, False)
        assert ack.details == {"executed": False}
        reply = await client.receive()
        assert isinstance(reply, Response) and reply.request_id == kept
        await client.send(Cancel(kept))  # answered already: nothing more is sent
        assert await client.nothing_within(0.3)
        stats = node.statistics()
        assert stats["in_flight"] == 0 and stats["requests_cancelled"] == 1
        assert stats["errors_sent"] == {"CANCELLED": 1}


async def test_ping_frames_are_answered_with_pong(node: QdbNode):
    async with raw_client(node.address) as client:
        for rid in (1, 2**64 - 1):
            await client.send(Ping(rid))
            assert await client.receive() == Pong(rid)
    assert node.statistics()["pings_answered"] == 2


async def test_client_goaway_closes_after_in_flight_requests(node: QdbNode):
    node.faults.add_latency("ping", 0.1)
    async with raw_client(node.address) as client:
        rid = await client.send_request("ping")
        await client.send(GoAway("client_close", rid))
        messages = await client.read_until_eof()
        assert [(type(m), m.request_id) for m in messages] == [(Response, rid)]
