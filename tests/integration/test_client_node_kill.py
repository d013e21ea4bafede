"""A node process killed with SIGKILL under load, then restarted."""

from __future__ import annotations

import trio

import qdb_client
from qdb_client.testing import TestCluster


async def wait_state(client: qdb_client.Client, index: int, state: str, limit: float) -> float:
    """Seconds until node ``index`` reaches ``state`` (fails after ``limit``)."""
    started = trio.current_time()
    with trio.fail_after(limit):
        while client.statistics()["nodes"][index]["state"] != state:  # noqa: ASYNC110
            await trio.sleep(0.005)
    return trio.current_time() - started


async def test_sigkill_under_load_reads_keep_succeeding_and_node_returns():
    options = dict(
        heartbeat_interval=0.5,
        ping_timeout=0.3,
        failures_to_down=2,
        reconnect_initial=0.2,
        reconnect_max=1.0,
        slow_start=0.0,
        random_seed=9,
        request_timeout=3.0,
    )
    async with (
        TestCluster.start_subprocesses(n=3) as cluster,
        qdb_client.open_client(cluster.addresses, **options) as client,
    ):
        await client.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v TEXT)")
        await client.execute("INSERT INTO kv VALUES (1, 'one')")
        failures: list[BaseException] = []
        reads = 0
        stop = trio.Event()

        async def reader() -> None:
            nonlocal reads
            while not stop.is_set():
                try:
                    assert (await client.query("SELECT v FROM kv WHERE k = 1")).scalar() == "one"
                    reads += 1
                except qdb_client.QdbError as exc:
                    failures.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(reader)
            await trio.sleep(0.3)
            before_kill = reads
            await cluster.kill(1)
            detection = await wait_state(client, 1, "DOWN", limit=2.0)
            await trio.sleep(0.5)
            during_outage = reads
            await cluster.restart(1)
            recovery = await wait_state(client, 1, "UP", limit=5.0)
            served_before = client.statistics()["nodes"][1]["requests_sent"]
            await trio.sleep(0.5)
            served_after = client.statistics()["nodes"][1]["requests_sent"]
            stop.set()

        assert failures == []  # every read succeeded, on the surviving nodes if need be
        assert before_kill > 0 and during_outage > before_kill
        # A killed process resets its connections: DOWN long before ping-based detection.
        assert detection < options["heartbeat_interval"]
        assert recovery < 5.0
        assert served_after > served_before  # traffic came back to the restarted node


async def test_graceful_shutdown_completes_in_flight_work_and_recovers():
    """TC-TR-013: clients are told (GOAWAY), in-flight requests complete or
    move elsewhere, and the restarted node gets its connections back."""
    options = dict(reconnect_initial=0.2, reconnect_max=0.5, slow_start=0.0, random_seed=4)
    async with (
        TestCluster.start_subprocesses(n=2) as cluster,
        qdb_client.open_client(cluster.addresses, **options) as client,
    ):
        async with cluster.control(1) as control:
            await control.add_latency("query", 0.4)
        results: list[object] = []

        async def slow_read(i: int) -> None:
            results.append((await client.query("SELECT ?", [i])).scalar())

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(slow_read, i)
            await trio.sleep(0.1)  # half of them are now waiting on node 1
            await cluster.stop(1, grace=2.0)
        assert sorted(results) == list(range(10))
        down_for = await wait_state(client, 1, "DOWN", limit=2.0)
        assert down_for < 2.0
        await cluster.restart(1)
        await wait_state(client, 1, "UP", limit=5.0)
        before = client.statistics()["nodes"][1]["requests_sent"]
        for _ in range(10):
            await client.query("SELECT 1")
        assert client.statistics()["nodes"][1]["requests_sent"] == before + 5
