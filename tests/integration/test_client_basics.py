"""The driver against a real test node over loopback TCP (foundation behaviours)."""

from __future__ import annotations

import random

import pytest
import trio

import qdb_client
from qdb_client._transport import Connection, open_tcp
from qdb_client.errors import (
    CapacityExceeded,
    ConstraintViolation,
    MethodNotFound,
    NoAvailableNode,
    RetryExhausted,
    ServerTimeout,
    SqlError,
    VersionMismatch,
)
from qdb_client.protocol import Hello
from qdb_client.testing import open_node

from ..common.fixtures import node_config

FAST = {"heartbeat_interval": 60.0, "random_seed": 5}


async def test_execute_query_batch_round_trip(node):
    async with qdb_client.open_client(node.address, **FAST) as client:
        await client.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT UNIQUE)")
        inserted = await client.execute("INSERT INTO people (name) VALUES (?)", ["ada"])
        assert inserted.rows_affected == 1 and inserted.last_insert_id == 1
        results = await client.batch(
            [
                ("INSERT INTO people (name) VALUES (?)", ["grace"]),
                {"sql": "INSERT INTO people (name) VALUES (:n)", "params": {"n": "edsger"}},
                "UPDATE people SET name = upper(name) WHERE id = 1",
            ]
        )
        assert [r.rows_affected for r in results] == [1, 1, 1]
        rows = await client.query("SELECT id, name FROM people WHERE id <= ? ORDER BY id", [3])
        assert rows.columns == ("id", "name")
        assert [tuple(r) for r in rows] == [(1, "ADA"), (2, "grace"), (3, "edsger")]
        assert rows[1]["name"] == "grace" and rows[1][0] == 2
        assert (await client.query("SELECT count(*) FROM people")).scalar() == 3


async def test_values_of_every_type_survive_the_round_trip(node):
    async with qdb_client.open_client(node.address, **FAST) as client:
        values = [None, 0, -(2**62), 2**62, 3.25, "ünïcødé", b"\x00\xffbytes"]
        row = (await client.query("SELECT " + ", ".join("?" for _ in values), values))[0]
        assert list(row) == values


async def test_sql_errors_are_typed_and_batches_are_atomic(node):
    async with qdb_client.open_client(node.address, **FAST) as client:
        await client.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
        await client.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(SqlError) as info:
            await client.query("SELECT * FROM missing_table")
        assert "missing_table" in str(info.value) and info.value.code == 422
        with pytest.raises(ConstraintViolation):
            await client.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ConstraintViolation):
            await client.batch(["INSERT INTO t VALUES (2)", "INSERT INTO t VALUES (1)"])
        assert (await client.query("SELECT count(*) FROM t")).scalar() == 1


async def test_unknown_method_is_method_not_found(node):
    async with qdb_client.open_client(node.address, **FAST) as client:
        with pytest.raises(MethodNotFound):
            await client._call("no_such_method", {}, None, read_only=True)
        assert (await client.query("SELECT 1")).scalar() == 1


async def test_version_mismatch_lists_supported_versions(node):
    stream = await open_tcp(node.address)
    connection = Connection(stream, address=node.address, max_frame_size=1 << 20, max_in_flight=8)
    async with trio.open_nursery() as nursery:
        with pytest.raises(VersionMismatch) as info:
            await nursery.start(connection.run, Hello(versions=(7, 9)))
    assert info.value.supported_versions == [1]


async def test_capacity_exceeded_leaves_existing_connections_working(tmp_path):
    async with open_node(node_config(tmp_path, max_connections=1)) as node:
        options = dict(FAST, max_connections=1)
        async with qdb_client.open_client(node.address, **options) as first:
            with pytest.raises(NoAvailableNode) as info:
                async with qdb_client.open_client(node.address, **options):
                    pytest.fail("a second client must not get a connection")
            assert isinstance(info.value.errors[node.address], CapacityExceeded)
            assert (await first.query("SELECT 41 + 1")).scalar() == 42
        assert node.statistics()["connections_refused"] == 1


async def test_server_idle_close_is_transparent(tmp_path):
    async with open_node(node_config(tmp_path, client_idle_timeout=0.3)) as node:
        async with qdb_client.open_client(node.address, **FAST) as client:
            assert (await client.query("SELECT 1")).scalar() == 1
            await trio.sleep(0.6)  # the node says GOAWAY(idle_timeout) and closes
            assert (await client.query("SELECT 2")).scalar() == 2
            stats = client.statistics()["nodes"][0]
            assert stats["state"] == "UP" and stats["failures"] == 0
        assert node.statistics()["connections_accepted"] >= 2


async def test_server_timeout_keeps_the_connection(tmp_path):
    async with open_node(node_config(tmp_path, request_timeout=0.2)) as node:
        async with qdb_client.open_client(node.address, max_retries=0, **FAST) as client:
            assert (await client.query("SELECT 1")).scalar() == 1
            node.faults.add_latency("query", 0.5)
            with pytest.raises(RetryExhausted) as info:
                await client.query("SELECT 1")
            assert isinstance(info.value.last_error, ServerTimeout)
            node.faults.clear_latency()
            assert (await client.query("SELECT 3")).scalar() == 3
        assert node.statistics()["connections_accepted"] == 1


async def test_many_concurrent_requests_on_one_connection_get_their_own_replies(node):
    node.faults.add_latency("query", 0.05)  # queries finish after executes: out of order
    async with qdb_client.open_client(node.address, max_connections=1, **FAST) as client:
        await client.execute("CREATE TABLE n (v INTEGER)")
        results: dict[int, object] = {}

        async def read(i: int) -> None:
            results[i] = (await client.query("SELECT ? * 2", [i])).scalar()

        async def write(i: int) -> None:
            results[i] = (await client.execute("INSERT INTO n VALUES (?)", [i])).rows_affected

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(read if i % 2 else write, i)
        assert results == {i: (i * 2 if i % 2 else 1) for i in range(200)}
    assert node.statistics()["connections_accepted"] == 1


async def test_cancellation_never_crosses_replies(node):
    node.faults.add_latency("query", 0.02)
    rng = random.Random(11)
    async with qdb_client.open_client(node.address, max_connections=1, **FAST) as client:
        got: dict[int, object] = {}
        cancelled = 0

        async def read(i: int, patience: float) -> None:
            nonlocal cancelled
            with trio.move_on_after(patience) as scope:
                got[i] = (await client.query("SELECT ?", [f"caller-{i}"])).scalar()
            cancelled += scope.cancelled_caught

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(read, i, rng.choice([0.0, 0.005, 0.015, 0.025, 1.0]))
        assert cancelled > 50 and len(got) > 50
        assert all(value == f"caller-{i}" for i, value in got.items())
        node.faults.clear_latency()
        assert (await client.query("SELECT 'after'")).scalar() == "after"
        conn = client.statistics()["nodes"][0]
        assert conn["in_flight"] == 0 and conn["connections"]["open"] == 1


async def test_garbage_from_one_peer_does_not_affect_the_client(node):
    async with qdb_client.open_client(node.address, **FAST) as client:
        for junk in (b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 4, b"QD" + b"\xff" * 40):
            stream = await open_tcp(node.address)
            await stream.send_all(junk)
            await stream.aclose()
        assert (await client.query("SELECT 'still fine'")).scalar() == "still fine"
