"""The driver's main job on a running cluster: a real workload, faults, and a report.

1. Create a table, insert 1000 rows from 10 concurrent tasks, read every row
   back and check it; an atomic batch and a failing one.
2. Kill one node mid-way through a read/write workload (SIGKILL when the
   cluster was started by scripts/start-test-cluster.sh, else a simulated
   outage through the fault controls), restart it, and show the driver
   routing around it and picking it up again.
3. Make one node fail requests: retries absorb the failures and its circuit
   breaker opens, half-opens and closes.
4. Lose the replies of committed writes: keyed retries make them apply
   exactly once (the nodes count the deduplicated writes).
5. Stall one node (it answers pings but takes 30 s per query): reads move
   to the other nodes within their 1 s deadline; the stalled node's breaker
   and latency estimate say so; when it recovers, traffic returns.

Exits non-zero if any check fails.

    TEST_SERVER_PORTS=7000,7001,7002 python examples/workload.py
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

import qdb_client
from qdb_client.testing import open_node_control

DEFAULT_PORTS = os.environ.get("TEST_SERVER_PORTS", "7000,7001,7002")
ROOT = Path(__file__).resolve().parents[1]
WORKERS = 10
ROWS_PER_WORKER = 100

#: Client settings tuned so the demo's faults play out in seconds.
DEMO_OPTIONS: dict[str, Any] = dict(
    heartbeat_interval=1.0,
    ping_timeout=0.5,
    reconnect_initial=0.3,
    reconnect_max=1.0,
    breaker_open_timeout=1.5,
    slow_start=1.0,
    request_timeout=5.0,
)


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


class Report:
    """Checks and timings collected along the way."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.phases: list[tuple[str, list[float], float]] = []

    def check(self, condition: bool, what: str) -> None:
        print(f"  [{'ok' if condition else 'FAILED'}] {what}")
        if not condition:
            self.failures.append(what)

    def phase(self, name: str, latencies: list[float], elapsed: float) -> None:
        self.phases.append((name, latencies, elapsed))


def requests_per_node(client: qdb_client.Client) -> dict[str, int]:
    return {n["address"]: n["requests_sent"] for n in client.statistics()["nodes"]}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {node: after[node] - before.get(node, 0) for node in after}


def show_spread(title: str, counts: dict[str, int]) -> None:
    total = sum(counts.values()) or 1
    cells = "  ".join(f"{node}: {n:>5} ({n * 100 / total:4.1f}%)" for node, n in counts.items())
    print(f"  {title:<22} {cells}")


# ------------------------------------------------------------------ phase 1


async def basic_workload(client: qdb_client.Client, report: Report) -> None:
    print("\n1. Basic workload: 1000 inserts from 10 tasks, read back, batches")
    await client.execute("DROP TABLE IF EXISTS demo_items")
    await client.execute(
        "CREATE TABLE demo_items (id INTEGER PRIMARY KEY, worker INTEGER NOT NULL,"
        " seq INTEGER NOT NULL, payload TEXT NOT NULL, UNIQUE (worker, seq))"
    )
    latencies: list[float] = []
    before = requests_per_node(client)

    async def writer(worker: int) -> None:
        for seq in range(ROWS_PER_WORKER):
            started = time.perf_counter()
            await client.execute(
                "INSERT INTO demo_items (worker, seq, payload) VALUES (?, ?, ?)",
                [worker, seq, f"w{worker}-s{seq}"],
            )
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for worker in range(WORKERS):
            nursery.start_soon(writer, worker)
    report.phase(f"insert ({WORKERS} tasks)", latencies, time.perf_counter() - started)
    show_spread("inserts per node", diff(requests_per_node(client), before))

    rows = await client.query("SELECT worker, seq, payload FROM demo_items ORDER BY worker, seq")
    expected = [(w, s, f"w{w}-s{s}") for w in range(WORKERS) for s in range(ROWS_PER_WORKER)]
    report.check(len(rows) == WORKERS * ROWS_PER_WORKER, f"{len(rows)} rows read back")
    report.check([tuple(r) for r in rows] == expected, "every row has its exact payload")

    applied = await client.batch(
        [
            ("UPDATE demo_items SET payload = payload || '!' WHERE worker = ?", [0]),
            ("DELETE FROM demo_items WHERE worker = ? AND seq >= ?", [9, 50]),
        ]
    )
    report.check(
        [r.rows_affected for r in applied] == [100, 50],
        f"atomic batch applied (rows affected {[r.rows_affected for r in applied]})",
    )
    try:
        await client.batch(
            [
                ("DELETE FROM demo_items WHERE worker = ?", [1]),
                ("INSERT INTO demo_items (worker, seq, payload) VALUES (?, ?, ?)", [2, 0, "dup"]),
            ]
        )
        rejected = False
    except qdb_client.ConstraintViolation:
        rejected = True
    left = (await client.query("SELECT count(*) FROM demo_items WHERE worker = 1")).scalar()
    report.check(rejected and left == 100, "failing batch rolled back entirely")
    try:
        await client.query("SELECT * FROM no_such_table")
        typed = False
    except qdb_client.SqlError:
        typed = True
    report.check(typed, "bad SQL raised a typed SqlError")


# ------------------------------------------------------------------ phase 2


class Outage:
    """Kill and restart one node: for real when we own its process, else simulated."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.port = address.rsplit(":", 1)[1]
        state = os.environ.get("QDB_CLUSTER_DIR")
        self.pidfile = Path(state) / f"node-{self.port}.pid" if state else None
        self.real = self.pidfile is not None and self.pidfile.exists()
        self._control: Any = None

    async def begin(self) -> str:
        if self.real:
            assert self.pidfile is not None
            os.kill(int(self.pidfile.read_text()), signal.SIGKILL)
            return f"SIGKILL to the node process on port {self.port}"
        self._control = open_node_control(self.address)
        control = await self._control.__aenter__()
        await control.refuse_connections(True)
        await control.drop_connections()
        return f"node on port {self.port} drops every connection and refuses new ones"

    async def end(self) -> str:
        if self.real:
            await trio.run_process(
                [str(ROOT / "scripts" / "start-test-cluster.sh")],
                stdout=subprocess.DEVNULL,
            )
            return f"node on port {self.port} restarted"
        await (await self._control.__aenter__()).refuse_connections(False)
        await self._control.__aexit__(None, None, None)
        return f"node on port {self.port} accepts connections again"


async def node_outage(client: qdb_client.Client, victim: str, report: Report) -> None:
    print(f"\n2. Node outage under load: {victim} goes away mid-way and comes back")
    await client.execute("CREATE TABLE IF NOT EXISTS demo_events (id INTEGER PRIMARY KEY, n INT)")
    await client.execute("DELETE FROM demo_events")
    errors: list[BaseException] = []
    writes = 0
    reads = 0
    stop = trio.Event()
    timeline: list[str] = []
    start = trio.current_time()

    def mark(text: str) -> None:
        timeline.append(f"    t={trio.current_time() - start:5.2f}s  {text}")

    async def worker(index: int) -> None:
        nonlocal writes, reads
        n = 0
        while not stop.is_set():
            try:
                if n % 4 == 0:
                    await client.execute(
                        "INSERT INTO demo_events (n) VALUES (?)", [index * 10**6 + n]
                    )
                    writes += 1
                else:
                    await client.query("SELECT count(*) FROM demo_events")
                    reads += 1
            except qdb_client.QdbError as exc:
                errors.append(exc)
            n += 1

    async def watch_states() -> None:
        last: dict[str, str] = {}
        while not stop.is_set():
            for node in client.statistics()["nodes"]:
                if last.get(node["address"]) != node["state"]:
                    if node["address"] in last:
                        mark(f"driver sees {node['address']} {node['state']}")
                    last[node["address"]] = node["state"]
            await trio.sleep(0.01)

    outage = Outage(victim)
    spans: dict[str, dict[str, int]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_states)
        for index in range(8):
            nursery.start_soon(worker, index)
        counts = requests_per_node(client)
        await trio.sleep(1.5)
        spans["before the outage"] = diff(requests_per_node(client), counts)
        counts = requests_per_node(client)
        mark(await outage.begin())
        await trio.sleep(2.0)
        spans["during the outage"] = diff(requests_per_node(client), counts)
        mark(await outage.end())
        with trio.move_on_after(10):
            while not any(  # noqa: ASYNC110 - polling the statistics snapshot
                n["address"] == victim and n["state"] == "UP" for n in client.statistics()["nodes"]
            ):
                await trio.sleep(0.05)
        counts = requests_per_node(client)
        await trio.sleep(2.0)
        spans["after it is back"] = diff(requests_per_node(client), counts)
        stop.set()

    print("  timeline:")
    print("\n".join(timeline))
    for title, spread in spans.items():
        show_spread(title, spread)
    stored = (await client.query("SELECT count(*) FROM demo_events")).scalar()
    report.check(
        errors == [], f"{reads} reads and {writes} writes, none failed ({len(errors)} errors)"
    )
    report.check(stored == writes, f"every acknowledged write stored exactly once ({stored} rows)")
    report.check(
        spans["during the outage"][victim] <= 8, f"no traffic to {victim} while it was down"
    )
    report.check(spans["after it is back"][victim] > 0, f"traffic returned to {victim}")


# ------------------------------------------------------------------ phase 3


async def failing_node(client: qdb_client.Client, address: str, report: Report) -> None:
    print(f"\n3. A failing node: {address} answers 503 UNAVAILABLE to its next requests")
    async with open_node_control(address) as control:
        await control.fail_next(6, code=503, methods=["query"])
    before = client.statistics()
    transitions_before = _transitions(before, address)
    failures = 0
    started = trio.current_time()
    while trio.current_time() - started < 4.0:
        try:
            await client.query("SELECT 1")
        except qdb_client.QdbError:
            failures += 1
        await trio.sleep(0.01)
    after = client.statistics()
    history = _transitions(after, address)[len(transitions_before) :]
    print(f"  breaker of {address}: CLOSED -> {' -> '.join(history)}")
    report.check(failures == 0, "the application saw no failure")
    report.check(
        after["retries"] > before["retries"],
        f"{after['retries'] - before['retries']} retries absorbed them",
    )
    report.check(
        history[:1] == ["OPEN"] and history[-1:] == ["CLOSED"],
        "the breaker opened, half-opened after its timeout, and closed",
    )


def _transitions(stats: dict[str, Any], address: str) -> list[str]:
    node = next(n for n in stats["nodes"] if n["address"] == address)
    return list(node["breaker"]["transitions"])


# ------------------------------------------------------------------ phase 4


async def lost_replies(client: qdb_client.Client, hosts: list[str], report: Report) -> None:
    print("\n4. Lost replies: each node drops the connection right after committing a write")
    hits_before = await _node_counter(hosts, "idempotent_hits")
    for address in hosts:
        async with open_node_control(address) as control:
            await control.drop_after_commit(1)
    await client.execute("CREATE TABLE IF NOT EXISTS demo_once (id INTEGER PRIMARY KEY, v TEXT)")
    await client.execute("DELETE FROM demo_once")
    for i in range(9):
        await client.execute("INSERT INTO demo_once (v) VALUES (?)", [f"value-{i}"])
    rows = (await client.query("SELECT count(*) FROM demo_once")).scalar()
    hits = await _node_counter(hosts, "idempotent_hits") - hits_before
    report.check(rows == 9, f"9 writes acknowledged, {rows} rows stored")
    report.check(hits == len(hosts), f"{hits} retried writes answered from the stored outcome")


async def _node_counter(hosts: list[str], name: str) -> int:
    total = 0
    for address in hosts:
        async with open_node_control(address) as control:
            total += (await control.stats()).get(name, 0)
    return total


# ------------------------------------------------------------------ phase 5


async def stalled_node(client: qdb_client.Client, victim: str, report: Report) -> None:
    print(f"\n5. A stalled node: {victim} answers pings but takes 30 s per query")
    await client.execute("CREATE TABLE IF NOT EXISTS demo_stall (id INTEGER PRIMARY KEY, v INT)")
    await client.execute("INSERT INTO demo_stall (v) VALUES (1)")
    reads = 0
    failures: list[BaseException] = []
    latencies: list[float] = []
    stop = trio.Event()

    async def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await client.query("SELECT count(*) FROM demo_stall", timeout=1.0)
                reads += 1
                latencies.append(time.perf_counter() - started)
            except qdb_client.QdbError as exc:
                failures.append(exc)

    spans: dict[str, dict[str, int]] = {}
    async with open_node_control(victim) as control, trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(reader)
        counts = requests_per_node(client)
        await trio.sleep(1.0)
        spans["before the stall"] = diff(requests_per_node(client), counts)
        calm = node_stats(client, victim)["latency_ewma"] or 0.0
        await control.add_latency("query", 30.0)
        counts = requests_per_node(client)
        await trio.sleep(1.0)
        spans["first second of it"] = diff(requests_per_node(client), counts)
        counts = requests_per_node(client)
        await trio.sleep(2.0)
        spans["the next two seconds"] = diff(requests_per_node(client), counts)
        during = node_stats(client, victim)
        await control.add_latency("query", 0)
        counts = requests_per_node(client)
        await trio.sleep(3.0)
        spans["after it recovered"] = diff(requests_per_node(client), counts)
        stop.set()
    for title, spread in spans.items():
        show_spread(title, spread)
    breaker = during["breaker"]
    latency = during["latency_ewma"] or 0.0
    print(
        f"  {victim} while stalled: breaker {breaker['current_state']}"
        f" (opened by {', '.join(breaker['opened_by']) or '-'}), latency estimate"
        f" {calm * 1e3:.1f} -> {latency * 1e3:.0f} ms; attempt timeouts so far"
        f" {client.statistics()['attempt_timeouts']}"
    )
    p99 = percentile(latencies, 0.99) * 1e3
    report.check(failures == [], f"{reads} reads with a 1 s deadline, {len(failures)} failed")
    report.check(p99 < 1000, f"p99 read latency {p99:.0f} ms, within the deadline")
    report.check(
        spans["the next two seconds"][victim]
        <= max(4, sum(spans["the next two seconds"].values()) // 20),
        f"reads moved away from {victim} ({spans['the next two seconds'][victim]} attempts there"
        " in the next two seconds)",
    )
    report.check(
        breaker["opened_by"] == ["slow"] and latency >= max(0.1, 10 * calm),
        "its breaker opened on silence and its latency estimate rose",
    )
    report.check(spans["after it recovered"][victim] > 0, f"traffic returned to {victim}")


def node_stats(client: qdb_client.Client, address: str) -> dict[str, Any]:
    return next(n for n in client.statistics()["nodes"] if n["address"] == address)


# --------------------------------------------------------------------- main


async def run(hosts: list[str]) -> int:
    report = Report()
    print(f"qdb_client {qdb_client.__version__}: workload against {', '.join(hosts)}")
    for address in hosts:
        async with open_node_control(address) as control:
            await control.reset()
    async with qdb_client.open_client(hosts, **DEMO_OPTIONS) as client:
        await basic_workload(client, report)
        if len(hosts) > 1:
            await node_outage(client, hosts[-1], report)
            await failing_node(client, hosts[0], report)
        await lost_replies(client, hosts, report)
        if len(hosts) > 1:
            await stalled_node(client, hosts[1], report)
        stats = client.statistics()

    print("\nLatency (ms)")
    for name, latencies, elapsed in report.phases:
        p50, p99 = (percentile(latencies, q) * 1e3 for q in (0.5, 0.99))
        print(
            f"  {name:<22} {len(latencies):>5} calls in {elapsed:6.2f} s"
            f"  p50 {p50:6.2f}  p99 {p99:6.2f}  ({len(latencies) / elapsed:.0f} calls/s)"
        )
    print("\nDriver totals")
    print(
        f"  calls {stats['calls']}, attempts {stats['attempts']}, retries {stats['retries']},"
        f" errors raised to the application {stats['failures']} (2 expected: the"
        " rolled-back batch and the bad SQL),"
        f" outcome unknown {stats['outcome_unknown']}"
    )
    for node in stats["nodes"]:
        breaker = node["breaker"]
        print(
            f"  {node['address']:<16} {node['state']:<7} requests {node['requests_sent']:>5}"
            f"  failures {node['failures']:>3}  breaker {breaker['current_state']}"
            f" ({len(breaker['transitions'])} transitions)"
        )
    dedup = await _node_counter(hosts, "idempotent_hits")
    print(f"  deduplicated writes (node side): {dedup}")

    print()
    if report.failures:
        print(f"FAILED: {len(report.failures)} check(s): {report.failures}")
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
