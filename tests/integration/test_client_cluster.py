"""Connection management against real test nodes (seed 001's deferred properties).

By default the tests start their own in-process nodes. With
``TEST_SERVER_PORTS`` set (``scripts/start-test-cluster.sh`` first) they run
against that external cluster instead, reaching its nodes only through the
wire (control connections), as seed 001 describes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdb_client
from qdb_client.testing import TestCluster

FAST = {"heartbeat_interval": 60.0, "slow_start": 0.0, "random_seed": 3}


@pytest.fixture
async def cluster() -> AsyncIterator[TestCluster]:
    async with TestCluster.from_environment(n=3) as running:
        async with trio.open_nursery() as nursery:
            for i in range(len(running.nodes)):
                nursery.start_soon(reset, running, i)
        yield running


async def reset(cluster: TestCluster, index: int) -> None:
    async with cluster.control(index) as control:
        await control.reset()


async def node_counts(cluster: TestCluster, method: str) -> list[int]:
    counts = []
    for i in range(len(cluster.nodes)):
        async with cluster.control(i) as control:
            counts.append((await control.stats())["requests_by_method"].get(method, 0))
    return counts


def table() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


async def test_property_1_connection_establishment(cluster):
    """For any valid configuration with reachable hosts, the client connects."""

    @settings(
        max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        hosts=st.lists(st.sampled_from(cluster.addresses), min_size=1, unique=True),
        min_connections=st.integers(0, 3),
        max_in_flight=st.integers(1, 512),
        balancing=st.sampled_from(["round_robin", "latency_aware"]),
    )
    def check(hosts, min_connections, max_in_flight, balancing):
        async def run() -> None:
            options = dict(
                FAST,
                min_connections=min_connections,
                max_connections=max(1, min_connections),
                max_in_flight=max_in_flight,
                load_balancing=balancing,
            )
            async with qdb_client.open_client(hosts, **options) as client:
                assert await client.ping() >= 0
                assert (await client.query("SELECT 7")).scalar() == 7
                opened = sum(n["connections"]["open"] for n in client.statistics()["nodes"])
                assert opened >= 1

        trio.run(run)

    await trio.to_thread.run_sync(check)


async def test_property_5_connection_reuse(cluster):
    """Sequential requests within the idle timeout share one connection per node."""
    address = cluster.addresses[0]
    async with qdb_client.open_client(address, discover_members=False, **FAST) as client:
        for _ in range(50):
            await client.query("SELECT 1")
        [node] = client.statistics()["nodes"]
        assert node["connections"]["open"] == 1
    async with cluster.control(0) as control:
        stats = await control.stats()
    assert stats["connections_accepted"] == 1
    assert stats["requests_by_method"]["query"] == 50


async def test_property_3_load_distribution(cluster):
    """Requests are spread over every healthy node (round robin: exactly evenly)."""
    async with qdb_client.open_client(cluster.addresses, **FAST) as client:
        for _ in range(99):
            await client.query("SELECT 1")
    assert await node_counts(cluster, "query") == [33, 33, 33]


async def test_property_4_unhealthy_node_avoidance(cluster):
    """A node marked unhealthy receives no further requests."""
    async with qdb_client.open_client(cluster.addresses, **FAST) as client:
        client.mark_node_unhealthy(cluster.addresses[1])
        for _ in range(30):
            await client.query("SELECT 1")
        assert client.statistics()["nodes"][1]["state"] == "DOWN"
    assert await node_counts(cluster, "query") == [15, 0, 15]


async def test_property_27_retry_with_exponential_backoff(cluster):
    """Two retryable failures, then success, after at least 100 + 200 ms of backoff."""
    address = cluster.addresses[0]
    async with cluster.control(0) as control:
        await control.fail_next(2, code=503)
    async with qdb_client.open_client(address, discover_members=False, **FAST) as client:
        started = trio.current_time()
        assert (await client.query("SELECT 'third time'")).scalar() == "third time"
        elapsed = trio.current_time() - started
        assert client.statistics()["retries"] == 2
    assert elapsed >= (0.1 + 0.2) * 0.9  # +-10% jitter on each delay
    assert await node_counts(cluster, "query") == [3, 0, 0]


async def test_connection_establishment_retried_with_backoff(cluster):
    """A node refusing connections is DOWN, retried with backoff, and UP once it accepts."""
    options = dict(FAST, reconnect_initial=0.1, reconnect_max=0.4, reconnect_jitter=0.0)
    # The control connection stays open: a refusing node accepts no new one.
    async with (
        cluster.control(2) as control,
        qdb_client.open_client(cluster.addresses, **options) as client,
    ):
        await control.refuse_connections(True)
        await control.drop_connections()
        with trio.fail_after(5):
            while client.statistics()["nodes"][2]["state"] != "DOWN":  # noqa: ASYNC110
                await trio.sleep(0.01)
        for _ in range(20):
            await client.query("SELECT 1")  # served by the other two meanwhile
        await trio.sleep(0.5)
        down = client.statistics()["nodes"][2]
        assert down["state"] == "DOWN" and "connect failed" in down["reason"]
        await control.refuse_connections(False)
        with trio.fail_after(5):
            while client.statistics()["nodes"][2]["state"] != "UP":  # noqa: ASYNC110
                await trio.sleep(0.01)
        before = (await control.stats())["requests_by_method"].get("query", 0)
        for _ in range(30):
            await client.query("SELECT 1")
        assert (await control.stats())["requests_by_method"]["query"] == before + 10


async def test_writes_from_every_node_are_seen_by_every_node(cluster):
    name = table()
    async with qdb_client.open_client(cluster.addresses, **FAST) as client:
        await client.execute(f"CREATE TABLE {name} (v INTEGER)")
        for i in range(30):
            await client.execute(f"INSERT INTO {name} VALUES (?)", [i])
        counts = [(await client.query(f"SELECT count(*) FROM {name}")).scalar() for _ in range(3)]
    assert counts == [30, 30, 30]
    assert await node_counts(cluster, "execute") == [11, 10, 10]
