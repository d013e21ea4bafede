"""Seed 002's targets for a result stream interrupted mid-way, measured.

One in-process test node behind a fault proxy (so a resume needs a real
reconnect: new TCP connection, handshake, ``resume_stream``), a table of
about 10 MB, and four runs of ``SELECT * FROM big``:

1. clean stream: throughput, and the bytes of page frames the node sends;
2. the same cut at 50%: a ``limit_data`` toxic on the stream's connection
   (removed as soon as the driver notices, so the reconnect goes through):
   bytes re-sent (node frames beyond the clean run's), resume time (from the
   ``resume_stream`` written on the new connection to its first row), total
   recovery (from the cut to the first resumed row);
3. the same with tracemalloc on: the peak of the driver's own live memory
   while streaming (allocations whose stack goes through
   ``qdb_client/_transport`` or ``qdb_client/_streams``; the node shares the
   process and is left out), against the result's size;
4. ``client.query()`` of the same rows, with both maximum frame sizes raised
   to 32 MiB so that one RESPONSE can carry them.

Prints a table with each target. ``--mb`` sets the size.

    .venv/bin/python bench/bench_stream.py [--mb 10]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import qdb_client  # noqa: E402
from qdb_client.testing import FaultProxy, TestCluster  # noqa: E402
from qdb_client.testing.feeds import node_feeds  # noqa: E402

ROW_BYTES = 1000
BIG_FRAME = 32 * 1024 * 1024
CLIENT = dict(
    discover_members=False,
    heartbeat_interval=1.0,
    reconnect_initial=0.05,
    reconnect_max=0.2,
    slow_start=0.0,
    retry_jitter="none",
    max_frame_size=BIG_FRAME,
)


class Marks(logging.Handler):
    """Times of the driver's stream log lines: the failure noticed, the resume sent."""

    def __init__(self, on_failure: Any) -> None:
        super().__init__(logging.DEBUG)
        self.on_failure = on_failure
        self.failed: float | None = None
        self.resume_sent: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        now = time.perf_counter()
        if message.startswith("stream attempt failed") and self.failed is None:
            self.failed = now
            self.on_failure()
        elif message.startswith("resume_stream sent") and self.resume_sent is None:
            self.resume_sent = now


def sent_bytes(cluster: TestCluster) -> int:
    return sum(node_feeds(s.node).stats["stream_bytes_sent"] for s in cluster.nodes)


async def stream_once(
    client: qdb_client.Client,
    proxy: FaultProxy,
    *,
    cut_at: float | None = None,
    total_rows: int,
    memory: bool = False,
) -> dict[str, Any]:
    """Stream the table; cut at ``cut_at`` of the rows; what happened, timed."""
    toxic: list[Any] = []
    marks = Marks(lambda: [t.remove() for t in toxic])
    logger = logging.getLogger("qdb_client.streams")
    logger.addHandler(marks)
    logger.setLevel(logging.DEBUG)
    cut_time = resumed = None
    peak = 0
    if memory:
        tracemalloc.start(32)
        filters = [
            tracemalloc.Filter(True, "*qdb_client/_transport/*", all_frames=True),
            tracemalloc.Filter(True, "*qdb_client/_streams/*", all_frames=True),
        ]
    started = time.perf_counter()
    try:
        async with client.stream("SELECT id, v FROM big ORDER BY id") as rows:
            count = 0
            async for _ in rows:
                count += 1
                if cut_at is not None and cut_time is None and count >= cut_at * total_rows:
                    toxic.append(proxy.add_toxic("limit_data", bytes=20_000))
                    cut_time = time.perf_counter()
                if marks.resume_sent is not None and resumed is None:
                    resumed = time.perf_counter()
                if memory and count % 500 == 0:
                    snapshot = tracemalloc.take_snapshot().filter_traces(filters)
                    peak = max(peak, sum(stat.size for stat in snapshot.statistics("filename")))
        wall = time.perf_counter() - started
    finally:
        logger.removeHandler(marks)
        if memory:
            tracemalloc.stop()
    assert count == total_rows and rows.digest_ok
    return {
        "wall": wall,
        "bytes": rows._ledger.bytes_received,
        "resumes": rows.resumes,
        "cut": cut_time,
        "failed": marks.failed,
        "resume_sent": marks.resume_sent,
        "resumed": resumed,
        "peak": peak,
    }


async def query_once(client: qdb_client.Client) -> float:
    started = time.perf_counter()
    result = await client.query("SELECT id, v FROM big ORDER BY id", timeout=120.0)
    wall = time.perf_counter() - started
    assert len(result) > 0
    return wall


async def main(megabytes: float) -> None:
    total_rows = int(megabytes * 1024 * 1024 / ROW_BYTES)
    with tempfile.TemporaryDirectory(prefix="qdb-bench-stream-") as tmp:
        async with (
            TestCluster.start_in_process(
                1, directory=Path(tmp), max_frame_size=BIG_FRAME, request_timeout=60.0
            ) as cluster,
            trio.open_nursery() as nursery,
        ):
            proxy = FaultProxy(cluster.addresses[0], seed=2)
            await nursery.start(proxy.serve)
            async with qdb_client.open_client(proxy.address, **CLIENT) as client:
                await client.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT)")
                rows = [["x" * (ROW_BYTES - 12)] for _ in range(total_rows)]
                await client.executemany("INSERT INTO big (v) VALUES (?)", rows, timeout=120.0)

                before = sent_bytes(cluster)
                clean = await stream_once(client, proxy, total_rows=total_rows)
                clean_sent = sent_bytes(cluster) - before

                before = sent_bytes(cluster)
                cut = await stream_once(client, proxy, cut_at=0.5, total_rows=total_rows)
                cut_sent = sent_bytes(cluster) - before

                mem = await stream_once(client, proxy, total_rows=total_rows, memory=True)
                query_wall = await query_once(client)
            nursery.cancel_scope.cancel()

    size = clean["bytes"]
    mb = size / 1e6
    resent = cut_sent - clean_sent
    resume_ms = (cut["resumed"] - cut["resume_sent"]) * 1000
    recovery = cut["resumed"] - cut["cut"]
    detect_ms = (cut["failed"] - cut["cut"]) * 1000
    lines = [
        ("result size", f"{mb:.2f} MB ({total_rows} rows)", ""),
        (
            "bytes re-sent after a cut at 50%",
            f"{resent / 1e3:.0f} kB ({100 * resent / size:.2f}%)",
            "<= 5%",
        ),
        ("cut noticed after", f"{detect_ms:.0f} ms", ""),
        ("resume: resume_stream sent -> first row", f"{resume_ms:.1f} ms", "< 500 ms"),
        ("total recovery: cut -> first resumed row", f"{recovery:.3f} s", "< 5 s"),
        ("driver memory peak while streaming", f"{mem['peak'] / 1e6:.2f} MB", "< 50 MB"),
        ("stream throughput (clean)", f"{mb / clean['wall']:.1f} MB/s", ""),
        ("stream throughput (cut at 50%)", f"{mb / cut['wall']:.1f} MB/s", ""),
        ("query() of the same rows (32 MiB frames)", f"{mb / query_wall:.1f} MB/s", ""),
    ]
    width = max(len(name) for name, *_ in lines)
    print(f"{'measure':<{width}}  {'value':>26}  target")
    for name, value, target in lines:
        print(f"{name:<{width}}  {value:>26}  {target}")
    checks = [
        resent <= 0.05 * size,
        resume_ms < 500,
        recovery < 5,
        mem["peak"] < 50e6,
        cut["resumes"] == 1,
    ]
    print("all targets met" if all(checks) else "TARGET MISSED")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="size of the result (MB)")
    trio.run(main, parser.parse_args().mb)
