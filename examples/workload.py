"""The driver's main job on a running cluster: a real workload and a report.

Creates a table, inserts 1000 rows from 10 concurrent tasks, reads them back
and checks every one, runs an atomic batch and a failing one, then prints
latencies and how the nodes saw the traffic. Exits non-zero if any check
fails.

    TEST_SERVER_PORTS=7000,7001,7002 python examples/workload.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import trio

import qdb_client
from qdb_client.testing import open_node_control

DEFAULT_PORTS = os.environ.get("TEST_SERVER_PORTS", "7000,7001,7002")
WORKERS = 10
ROWS_PER_WORKER = 100


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Phase:
    """Timing of one step of the workload."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.latencies: list[float] = []
        self.elapsed = 0.0

    def row(self) -> str:
        lat = self.latencies
        p50 = f"{percentile(lat, 0.50) * 1e3:8.2f}" if lat else "       -"
        p99 = f"{percentile(lat, 0.99) * 1e3:8.2f}" if lat else "       -"
        rate = f"{len(lat) / self.elapsed:9.0f}" if lat and self.elapsed else "        -"
        return f"  {self.name:<28} {len(lat):>6} {self.elapsed * 1e3:9.1f} {p50} {p99} {rate}"


async def timed(phase: Phase, call: Any) -> Any:
    started = time.perf_counter()
    result = await call
    phase.latencies.append(time.perf_counter() - started)
    return result


async def run(hosts: list[str]) -> int:
    failures: list[str] = []
    phases: list[Phase] = []

    def check(condition: bool, what: str) -> None:
        print(f"  [{'ok' if condition else 'FAILED'}] {what}")
        if not condition:
            failures.append(what)

    print(f"qdb_client {qdb_client.__version__}: workload against {', '.join(hosts)}\n")
    async with qdb_client.open_client(hosts) as client:
        setup = Phase("create table")
        phases.append(setup)
        started = time.perf_counter()
        await timed(setup, client.execute("DROP TABLE IF EXISTS demo_items"))
        await timed(
            setup,
            client.execute(
                "CREATE TABLE demo_items (id INTEGER PRIMARY KEY, worker INTEGER NOT NULL,"
                " seq INTEGER NOT NULL, payload TEXT NOT NULL, UNIQUE (worker, seq))"
            ),
        )
        setup.elapsed = time.perf_counter() - started

        inserts = Phase(f"insert ({WORKERS} tasks)")
        phases.append(inserts)

        async def writer(worker: int) -> None:
            for seq in range(ROWS_PER_WORKER):
                await timed(
                    inserts,
                    client.execute(
                        "INSERT INTO demo_items (worker, seq, payload) VALUES (?, ?, ?)",
                        [worker, seq, f"w{worker}-s{seq}"],
                    ),
                )

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for worker in range(WORKERS):
                nursery.start_soon(writer, worker)
        inserts.elapsed = time.perf_counter() - started

        reads = Phase("read back")
        phases.append(reads)
        started = time.perf_counter()
        everything = await timed(
            reads, client.query("SELECT worker, seq, payload FROM demo_items ORDER BY worker, seq")
        )
        per_worker = await timed(
            reads, client.query("SELECT worker, count(*) AS n FROM demo_items GROUP BY worker")
        )
        reads.elapsed = time.perf_counter() - started

        batches = Phase("batches")
        phases.append(batches)
        started = time.perf_counter()
        ok_batch = await timed(
            batches,
            client.batch(
                [
                    ("UPDATE demo_items SET payload = payload || '!' WHERE worker = ?", [0]),
                    ("DELETE FROM demo_items WHERE worker = ? AND seq >= ?", [9, 50]),
                ]
            ),
        )
        rejected = None
        try:
            await client.batch(
                [
                    ("DELETE FROM demo_items WHERE worker = ?", [1]),
                    (
                        "INSERT INTO demo_items (worker, seq, payload) VALUES (?, ?, ?)",
                        [2, 0, "duplicate of an existing (worker, seq)"],
                    ),
                ]
            )
        except qdb_client.ConstraintViolation as exc:
            rejected = exc
        batches.elapsed = time.perf_counter() - started
        after = await client.query("SELECT worker, count(*) AS n FROM demo_items GROUP BY worker")

        try:
            await client.query("SELECT * FROM no_such_table")
            sql_error = None
        except qdb_client.SqlError as exc:
            sql_error = exc
        rtt = await client.ping()

        print("Checks")
        expected = [(w, s, f"w{w}-s{s}") for w in range(WORKERS) for s in range(ROWS_PER_WORKER)]
        check(len(everything) == WORKERS * ROWS_PER_WORKER, f"{len(everything)} rows read back")
        check([tuple(row) for row in everything] == expected, "every row has its exact payload")
        check(
            {row["worker"]: row["n"] for row in per_worker} == dict.fromkeys(range(WORKERS), 100),
            "100 rows per worker",
        )
        check(
            [r.rows_affected for r in ok_batch] == [100, 50],
            f"atomic batch applied (rows affected {[r.rows_affected for r in ok_batch]})",
        )
        counts_after = {row["worker"]: row["n"] for row in after}
        check(
            rejected is not None and counts_after.get(1) == 100,
            "failing batch rolled back entirely (worker 1 still has 100 rows)",
        )
        check(sql_error is not None and sql_error.code == 422, "bad SQL raised a typed SqlError")

        stats = client.statistics()

    print("\nLatency (ms)")
    print(f"  {'phase':<28} {'calls':>6} {'total':>9} {'p50':>8} {'p99':>8} {'calls/s':>9}")
    for phase in phases:
        print(phase.row())
    mean = statistics.fmean(inserts.latencies) * 1e3
    print(f"  insert mean {mean:.2f} ms; PING round trip {rtt * 1e3:.2f} ms")

    print("\nClient")
    conn = stats["connection"] or {}
    print(
        f"  requests {stats['requests']}, failures {stats['failures']} (expected 2: the"
        f" rejected batch and the bad query), connection to {conn.get('address')}"
        f" ({conn.get('node_id')}), late replies dropped {conn.get('late_replies_dropped')}"
    )

    print("\nNodes (as each node counts them)")
    header = ("node", "connections", "execute", "query", "batch", "errors")
    print("  {:<18} {:>11} {:>8} {:>6} {:>6} {:>7}".format(*header))
    for address in hosts:
        try:
            async with open_node_control(address) as control:
                node = await control.stats()
        except qdb_client.QdbError as exc:
            print(f"  {address:<18} unreachable: {exc}")
            continue
        by_method = node.get("requests_by_method", {})
        print(
            f"  {address:<18} {node.get('connections_accepted', 0):>11}"
            f" {by_method.get('execute', 0):>8} {by_method.get('query', 0):>6}"
            f" {by_method.get('batch', 0):>6} {sum(node.get('errors_sent', {}).values()):>7}"
        )

    print()
    if failures:
        print(f"FAILED: {len(failures)} check(s): {failures}")
        return 1
    print("All checks passed.")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--hosts",
        default=",".join(f"127.0.0.1:{port}" for port in DEFAULT_PORTS.split(",")),
        help="comma-separated host:port list (default from TEST_SERVER_PORTS)",
    )
    args = parser.parse_args()
    sys.exit(trio.run(run, args.hosts.split(",")))


if __name__ == "__main__":
    main()
