"""A stalled node against real nodes over loopback: an attempt timeout with no retry left
ends in RetryExhausted."""

from __future__ import annotations

from pathlib import Path

import pytest

import qdb_client
from qdb_client.errors import RetryExhausted
from qdb_client.testing import TestCluster

pytestmark = pytest.mark.slow


async def test_an_attempt_timeout_with_no_retry_left_raises_retry_exhausted(tmp_path: Path):
    """Two real nodes, the first stalls every query for 30 s (add_latency). With
    max_retries=0 the read's one attempt ends in an attempt timeout (another
    node is left) and may not be retried: the client must raise RetryExhausted
    with a last_error, not let an AssertionError out of _request._final."""
    async with (
        TestCluster.start_in_process(2, directory=tmp_path / "cluster") as cluster,
        qdb_client.open_client(
            cluster.addresses, discover_members=False, max_retries=0, random_seed=1
        ) as client,
    ):
        async with cluster.control(0) as ctl:
            await ctl.add_latency("query", 30.0)
        stalled = cluster.addresses[0]
        errors: list[BaseException] = []
        for _ in range(4):  # round robin: at least one read goes to the stalled node first
            try:
                await client.query("SELECT 1", timeout=5.0)
            except qdb_client.QdbError as exc:
                errors.append(exc)
        assert errors, "precondition: a read met the stalled node"
        assert all(isinstance(e, RetryExhausted) and e.last_error is not None for e in errors)
        assert all(e.attempts[0].node == stalled for e in errors)


async def test_hedged_reads_answer_around_a_stalled_node(tmp_path: Path):
    """The same stalled node, with hedge_delay: every read succeeds, though
    max_retries=0 leaves no retry, because the hedge on the other node answers
    while the first copy waits; the stalled copies are cancelled."""
    async with (
        TestCluster.start_in_process(2, directory=tmp_path / "cluster") as cluster,
        qdb_client.open_client(
            cluster.addresses,
            discover_members=False,
            max_retries=0,
            random_seed=1,
            hedge_delay=0.05,
        ) as client,
    ):
        async with cluster.control(0) as ctl:
            await ctl.add_latency("query", 30.0)
        for _ in range(6):
            assert (await client.query("SELECT 1 AS one", timeout=5.0)).rows[0][0] == 1
        stats = client.statistics()
        assert stats["hedges"] == stats["hedge_wins"] >= 1
        assert stats["failures"] == stats["attempt_timeouts"] == 0
