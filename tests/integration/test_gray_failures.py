"""Gray failures against real test nodes over loopback TCP.

Named after the numbered problems of the gray-failures issue: a write sent
through ``query()`` (1), keyed writes whose reply is lost after commit (4),
and a storm of cancellations against a node's in-flight limit (5). The
virtual-time cases are in ``tests/unit/test_gray_failures.py``.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio

import qdb_client
from qdb_client.errors import ReadOnlyViolation
from qdb_client.testing import TestCluster, open_node, open_node_control

from ..common.fixtures import node_config

pytestmark = pytest.mark.slow


async def test_1_a_write_sent_through_query_is_refused_and_never_applied(tmp_path: Path):
    """``query("INSERT ... RETURNING id")`` whose reply would be lost after
    commit: refused as read-only, nothing inserted, so nothing can apply twice."""
    async with (
        open_node(node_config(tmp_path)) as node,
        open_node_control(node.address) as ctl,
        qdb_client.open_client(node.address, discover_members=False) as client,
    ):
        await client.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        await ctl.drop_after_commit(1, methods=["query"])
        with pytest.raises(ReadOnlyViolation) as info:
            await client.query("INSERT INTO t (v) VALUES ('x') RETURNING id")
        assert not info.value.maybe_applied and not info.value.retryable
        assert len(info.value.attempts) == 1
        assert (await client.query("SELECT count(*) FROM t")).scalar() == 0


async def test_1_writes_that_return_rows_go_through_execute_and_apply_once(tmp_path: Path):
    """The same write through ``execute()``, reply lost after commit: retried with
    its key, answered from the stored outcome, its RETURNING rows intact."""
    async with (
        open_node(node_config(tmp_path)) as node,
        open_node_control(node.address) as ctl,
        qdb_client.open_client(node.address, discover_members=False) as client,
    ):
        await client.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        await ctl.drop_after_commit(1)
        result = await client.execute(
            "INSERT INTO t (v) VALUES (?) RETURNING id, v", ["only"], timeout=10.0
        )
        assert result.columns == ("id", "v")
        assert [tuple(r) for r in result.rows] == [(1, "only")]
        assert (await client.query("SELECT count(*) FROM t")).scalar() == 1
        assert (await ctl.stats())["idempotent_hits"] == 1


async def test_4_eight_keyed_writes_whose_first_reply_is_lost_after_commit_all_succeed_once(
    tmp_path: Path,
):
    """8 writes in flight on a 3-node cluster; the node drops the connection
    right after committing the first: all 8 succeed, 8 rows, each stored once."""
    async with (
        TestCluster.start_in_process(3, directory=tmp_path / "cluster") as cluster,
        qdb_client.open_client(cluster.addresses) as client,
    ):
        await client.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INT UNIQUE)")
        for index in range(3):
            async with cluster.control(index) as ctl:
                await ctl.drop_after_commit(1)
        results: list[object] = []

        async def write(n: int) -> None:
            results.append(await client.execute("INSERT INTO t (n) VALUES (?)", [n], timeout=10.0))

        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(write, n)
        assert len(results) == 8
        rows = await client.query("SELECT n FROM t ORDER BY n")
        assert [r[0] for r in rows] == list(range(8))
        stats = client.statistics()
        assert stats["failures"] == 0
        assert all(n["breaker"]["current_state"] == "CLOSED" for n in stats["nodes"])


async def test_5_a_cancellation_storm_never_overruns_the_node(tmp_path: Path):
    """300 callers cancelling at random against a node with max_in_flight=8: the
    node never answers CAPACITY_EXCEEDED and no breaker counts a failure."""
    config = node_config(tmp_path, max_in_flight=8)
    async with open_node(config) as node, open_node_control(node.address) as ctl:
        options = dict(discover_members=False, max_connections=2, random_seed=5)
        async with qdb_client.open_client(node.address, **options) as client:
            await ctl.add_latency("query", 0.02)
            rng = random.Random(11)
            completed = cancelled = 0

            async def caller() -> None:
                nonlocal completed, cancelled
                with trio.move_on_after(rng.uniform(0.0, 0.05)) as scope:
                    await client.query("SELECT 1", timeout=10.0)
                    completed += 1
                if scope.cancelled_caught:
                    cancelled += 1

            async with trio.open_nursery() as nursery:
                for _ in range(300):
                    nursery.start_soon(caller)
            stats = await ctl.stats()
            assert completed + cancelled == 300 and cancelled > 0
            assert stats["errors_sent"].get("CAPACITY_EXCEEDED", 0) == 0, stats["errors_sent"]
            assert stats["requests_cancelled"] > 0
            breaker = client.statistics()["nodes"][0]["breaker"]
            assert breaker["failed_requests"] == 0
            with trio.fail_after(5):  # every orphan is confirmed by the node's CANCELLED
                while client.statistics()["nodes"][0]["orphaned"]:  # noqa: ASYNC110
                    await trio.sleep(0.01)
