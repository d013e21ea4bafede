"""Seed 004's network-resilience scenario: the driver through the fault proxy.

Real test nodes over loopback TCP, each behind a :class:`FaultProxy`; the
driver only sees proxied addresses (``discover_members=False``). Time bounds
here are lower bounds or generous deadlines (real time on a loaded machine),
never tight upper bounds.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import qdb_client
from qdb_client.testing import FaultProxy, TestCluster, open_fault_proxy, open_node_control

pytestmark = pytest.mark.slow

FAST_HEALTH = dict(
    discover_members=False,
    heartbeat_interval=0.5,
    ping_timeout=0.5,
    reconnect_initial=0.2,
    reconnect_max=1.0,
    slow_start=0.0,
)


@asynccontextmanager
async def proxied_cluster(tmp_path: Path, n: int) -> AsyncIterator[list[FaultProxy]]:
    """``n`` in-process nodes on one database, each behind its own proxy."""
    async with (
        TestCluster.start_in_process(n, directory=tmp_path / "cluster") as cluster,
        trio.open_nursery() as nursery,
    ):
        proxies = []
        for address in cluster.addresses:
            proxy = FaultProxy(address, seed=4)
            await nursery.start(proxy.serve)
            proxies.append(proxy)
        yield proxies
        nursery.cancel_scope.cancel()


async def test_latency_of_500_ms_jitter_100_still_succeeds_and_takes_at_least_400_ms(tmp_path):
    async with (
        proxied_cluster(tmp_path, 1) as (proxy,),
        qdb_client.open_client(proxy.address, **FAST_HEALTH) as client,
    ):
        proxy.add_toxic("latency", latency=500, jitter=100)
        started = time.monotonic()
        assert (await client.query("SELECT 1", timeout=10.0)).scalar() == 1
        assert time.monotonic() - started >= 0.4


async def test_a_timeout_toxic_on_one_node_is_retried_elsewhere(tmp_path):
    """One node's proxy stops passing data (it never closes): reads go to the
    other node within their deadline."""
    async with proxied_cluster(tmp_path, 2) as (stuck, healthy):
        hosts = [stuck.address, healthy.address]
        async with qdb_client.open_client(hosts, **FAST_HEALTH) as client:
            await client.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
            stuck.add_toxic("timeout", direction="both", timeout=0)
            for n in range(10):
                assert (await client.query("SELECT ?", [n], timeout=3.0)).scalar() == n
                await client.execute("INSERT INTO t (v) VALUES (?)", [f"v{n}"], timeout=3.0)
            assert (await client.query("SELECT count(*) FROM t")).scalar() == 10


async def test_a_10_kb_insert_through_1_kb_per_second_succeeds_within_30_s(tmp_path):
    async with (
        proxied_cluster(tmp_path, 1) as (proxy,),
        qdb_client.open_client(proxy.address, **FAST_HEALTH) as client,
    ):
        await client.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, b BLOB)")
        proxy.add_toxic("bandwidth", direction="upstream", rate=1)
        started = time.monotonic()
        result = await client.execute(
            "INSERT INTO blobs (b) VALUES (?)", [b"x" * 10_240], timeout=30.0
        )
        assert result.rows_affected == 1
        assert time.monotonic() - started >= 9.0  # 10 KB at 1 KB/s
        proxy.clear()
        assert (await client.query("SELECT length(b) FROM blobs")).scalar() == 10_240


async def _cut_once(proxy: FaultProxy, bytes_: int) -> None:
    """Cut the next downstream bytes of a connection after ``bytes_`` bytes,
    then lift the toxic, so the retry's new connection passes."""
    closed = proxy.statistics()["connections_closed"]
    handle = proxy.add_toxic("limit_data", bytes=bytes_)
    while proxy.statistics()["connections_closed"] == closed:  # noqa: ASYNC110
        await trio.sleep(0.001)
    handle.remove()


async def test_a_reply_cut_in_the_middle_is_retried_for_reads(tmp_path):
    """``limit_data`` closes the connection inside a reply frame: the read is
    retried (on a new connection) and succeeds."""
    async with (
        proxied_cluster(tmp_path, 1) as (proxy,),
        qdb_client.open_client(proxy.address, **FAST_HEALTH) as client,
    ):
        big = "y" * 5000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cut_once, proxy, 2000)
            await trio.sleep(0.01)
            result = await client.query("SELECT ?", [big], timeout=10.0)
        assert result.scalar() == big
        assert client.statistics()["retries"] >= 1


async def test_a_keyed_write_whose_reply_is_cut_is_answered_from_its_stored_outcome(tmp_path):
    """The reply of a keyed write is cut in the middle: the retry with the same
    key is answered from the stored outcome, so the row is stored once."""
    async with (
        proxied_cluster(tmp_path, 1) as (proxy,),
        qdb_client.open_client(proxy.address, **FAST_HEALTH) as client,
    ):
        await client.execute("CREATE TABLE once (id INTEGER PRIMARY KEY, v TEXT)")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cut_once, proxy, 10)
            await trio.sleep(0.01)
            result = await client.execute(
                "INSERT INTO once (v) VALUES (?) RETURNING id", ["only"], timeout=10.0
            )
        assert result.rows_affected == 1
        assert client.statistics()["retries"] >= 1
        rows = await client.query("SELECT v FROM once")
        assert [tuple(r) for r in rows] == [("only",)]
        async with open_node_control(proxy.upstream) as control:
            assert (await control.stats())["idempotent_hits"] == 1  # answered, not re-run


async def test_an_asymmetric_failure_is_detected_as_a_stalled_node_and_avoided(tmp_path):
    """Replies from one node stop (downstream ``timeout`` only, requests still
    reach it): the driver treats it as a stalled node; reads keep succeeding."""
    async with (
        proxied_cluster(tmp_path, 2) as (mute, healthy),
        qdb_client.open_client([mute.address, healthy.address], **FAST_HEALTH) as client,
    ):
        for _ in range(5):
            await client.query("SELECT 1")
        mute.add_toxic("timeout", direction="downstream", timeout=0)
        failures = 0
        for _ in range(40):
            try:
                await client.query("SELECT 1", timeout=1.0)
            except qdb_client.QdbError:
                failures += 1
        assert failures <= 2
        node = next(n for n in client.statistics()["nodes"] if n["address"] == mute.address)
        assert node["state"] != "UP" or node["breaker"]["current_state"] != "CLOSED"


async def test_open_fault_proxy_in_front_of_one_node(tmp_path):
    """The context-manager form, as docs/testing.md shows it."""
    async with (
        TestCluster.start_in_process(1, directory=tmp_path / "cluster") as cluster,
        open_fault_proxy(cluster.addresses[0]) as proxy,
        qdb_client.open_client(proxy.address, **FAST_HEALTH) as client,
    ):
        assert await client.ping() >= 0
        assert proxy.statistics()["connections_accepted"] >= 1
