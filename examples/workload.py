"""The driver's main job on a running cluster: a real workload, faults, and a report.

1. Create a table, insert 1000 rows from 10 concurrent tasks and sync them
   all in one executemany (seed 004's performance scenario, with its limits
   of 30 s and 5 s), read every row back and check it; an atomic batch and a
   failing one.
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
   and latency estimate say so; when it recovers, traffic returns. Then
   (5b, examples/hedged_reads.py) the same stall read by two fresh clients
   side by side, without and with hedged reads.
6. Rolling restart under a read/write load: each node in turn shut down
   gracefully (SIGTERM: GOAWAY, in-flight requests finish) and started
   again, the next one only once the driver sees it UP: no application
   error, every acknowledged write stored once, traffic back on each node.
   Needs a cluster started by scripts/start-test-cluster.sh (skipped else).

With ``--tls-ca`` the connections use TLS, verified against that authority;
with ``--credentials-file`` (``user:password`` lines, the first is used) the
client logs in, and reconnects resume its session with a token. The report
says so; it never prints a password or a token. scripts/demo.sh passes both
for a cluster started with ``--tls --auth``.

An event listener (examples/narrator.py) narrates what the driver does:
node and breaker state changes as they happen, and after each part the
failed attempts and retries it absorbed.

Exits non-zero if any check fails.

    TEST_SERVER_PORTS=7000,7001,7002 python examples/workload.py \
        --tls-ca "$QDB_CLUSTER_DIR/tls/ca.pem" --credentials-file "$QDB_CLUSTER_DIR/credentials"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio
from hedged_reads import hedged_reads  # examples/hedged_reads.py, beside this file
from narrator import Narrator  # examples/narrator.py, beside this file

import qdb_client
from qdb_client.cli.processes import is_test_process
from qdb_client.testing import NodeControl, open_node_control
from qdb_client.testing.cli import parse_credentials

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


class Access:
    """How the workload reaches the cluster: TLS trust and credentials (never printed)."""

    def __init__(self, tls_ca: str | None, credentials_file: str | None) -> None:
        self.tls_ca = tls_ca
        self.tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.credentials: tuple[str, str] | None = None
        if credentials_file:
            text = Path(credentials_file).read_text(encoding="utf-8")
            users = parse_credentials(text, source=credentials_file)
            self.credentials = next(iter(users.items()), None)

    def client_options(self) -> dict[str, Any]:
        """``open_client`` keyword arguments."""
        return {"tls": self.tls or False, "credentials": self.credentials}

    def control(self, address: str) -> AbstractAsyncContextManager[NodeControl]:
        """A control connection (its node's control token is found through QDB_CLUSTER_DIR)."""
        return open_node_control(address, tls=self.tls)

    def cluster_flags(self) -> list[str]:
        """The flags of scripts/start-test-cluster.sh that started this cluster."""
        return ["--tls"] * bool(self.tls) + ["--auth"] * bool(self.credentials)


class NodeProcess:
    """A node process started by scripts/start-test-cluster.sh, found by its pid file."""

    def __init__(self, address: str, access: Access) -> None:
        self.address = address
        self.port = address.rsplit(":", 1)[1]
        self.access = access
        state = os.environ.get("QDB_CLUSTER_DIR")
        self.pidfile = Path(state) / f"node-{self.port}.pid" if state else None

    @property
    def ours(self) -> bool:
        """Whether a live node process of ours serves this address."""
        return self.pidfile is not None and self.pidfile.exists() and is_test_process(self.pid)

    @property
    def pid(self) -> int:
        """The process id its pid file names."""
        assert self.pidfile is not None
        return int(self.pidfile.read_text())

    async def stop(self, sig: signal.Signals, limit: float) -> bool:
        """Send ``sig``; True once the process is gone within ``limit`` s (else SIGKILL)."""
        pid = self.pid
        os.kill(pid, sig)
        with trio.move_on_after(limit):
            while is_test_process(pid):  # noqa: ASYNC110 - not our child: poll it
                await trio.sleep(0.02)
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return False

    async def start(self) -> None:
        """Start it again: the script restarts only the nodes that stopped, with the
        cluster's TLS and credentials, and returns once they answer."""
        await trio.run_process(
            [str(ROOT / "scripts" / "start-test-cluster.sh"), *self.access.cluster_flags()],
            stdout=subprocess.DEVNULL,
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


class Timeline:
    """What happened when, the driver's view of node states included."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.start = trio.current_time()

    def mark(self, text: str) -> None:
        self.lines.append(f"    t={trio.current_time() - self.start:5.2f}s  {text}")

    async def watch_states(self, client: qdb_client.Client, stop: trio.Event) -> None:
        last: dict[str, str] = {}
        while not stop.is_set():
            for node in client.statistics()["nodes"]:
                if last.get(node["address"]) != node["state"]:
                    if node["address"] in last:
                        self.mark(f"driver sees {node['address']} {node['state']}")
                    last[node["address"]] = node["state"]
            await trio.sleep(0.01)

    def show(self) -> None:
        print("  timeline:")
        print("\n".join(self.lines))


async def wait_until_up(client: qdb_client.Client, address: str, limit: float) -> None:
    with trio.move_on_after(limit):
        while node_stats(client, address)["state"] != "UP":  # noqa: ASYNC110 - a snapshot
            await trio.sleep(0.05)


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
    created = time.perf_counter() - started
    report.phase(f"insert ({WORKERS} tasks)", latencies, created)
    show_spread("inserts per node", diff(requests_per_node(client), before))
    # Seed 004's performance scenario: 1000 creates from 10 workers (< 30 s), then
    # one batch sync of every row (< 5 s), here an executemany applied all or none.
    started = time.perf_counter()
    synced = await client.executemany(
        "UPDATE demo_items SET payload = ? WHERE worker = ? AND seq = ?",
        [[f"w{w}-s{s}", w, s] for w in range(WORKERS) for s in range(ROWS_PER_WORKER)],
    )
    sync_time = time.perf_counter() - started
    report.check(
        created < 30.0,
        f"seed 004: {WORKERS * ROWS_PER_WORKER} creates from {WORKERS} tasks in {created:.2f} s"
        f" ({WORKERS * ROWS_PER_WORKER / created:.0f}/s; limit 30 s)",
    )
    report.check(
        synced == WORKERS * ROWS_PER_WORKER and sync_time < 5.0,
        f"seed 004: batch sync of {synced} rows in one executemany in {sync_time:.3f} s"
        " (limit 5 s)",
    )

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

    def __init__(self, address: str, access: Access) -> None:
        self.address = address
        self.port = address.rsplit(":", 1)[1]
        self.access = access
        self.process = NodeProcess(address, access)
        self.real = self.process.ours
        self._control: Any = None

    async def begin(self) -> str:
        if self.real:
            os.kill(self.process.pid, signal.SIGKILL)
            return f"SIGKILL to the node process on port {self.port}"
        self._control = self.access.control(self.address)
        control = await self._control.__aenter__()
        await control.refuse_connections(True)
        await control.drop_connections()
        return f"node on port {self.port} drops every connection and refuses new ones"

    async def end(self) -> str:
        if self.real:
            await self.process.start()
            return f"node on port {self.port} restarted"
        await (await self._control.__aenter__()).refuse_connections(False)
        await self._control.__aexit__(None, None, None)
        return f"node on port {self.port} accepts connections again"


async def node_outage(
    client: qdb_client.Client, victim: str, access: Access, report: Report
) -> None:
    print(f"\n2. Node outage under load: {victim} goes away mid-way and comes back")
    await client.execute("CREATE TABLE IF NOT EXISTS demo_events (id INTEGER PRIMARY KEY, n INT)")
    await client.execute("DELETE FROM demo_events")
    errors: list[BaseException] = []
    writes = 0
    reads = 0
    stop = trio.Event()
    timeline = Timeline()

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

    outage = Outage(victim, access)
    spans: dict[str, dict[str, int]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timeline.watch_states, client, stop)
        for index in range(8):
            nursery.start_soon(worker, index)
        counts = requests_per_node(client)
        await trio.sleep(1.5)
        spans["before the outage"] = diff(requests_per_node(client), counts)
        counts = requests_per_node(client)
        timeline.mark(await outage.begin())
        await trio.sleep(2.0)
        spans["during the outage"] = diff(requests_per_node(client), counts)
        timeline.mark(await outage.end())
        await wait_until_up(client, victim, 10)
        counts = requests_per_node(client)
        await trio.sleep(2.0)
        spans["after it is back"] = diff(requests_per_node(client), counts)
        stop.set()

    timeline.show()
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


async def failing_node(
    client: qdb_client.Client, address: str, access: Access, report: Report
) -> None:
    print(f"\n3. A failing node: {address} answers 503 UNAVAILABLE to its next requests")
    async with access.control(address) as control:
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


async def lost_replies(
    client: qdb_client.Client, hosts: list[str], access: Access, report: Report
) -> None:
    print("\n4. Lost replies: each node drops the connection right after committing a write")
    hits_before = await _node_counter(hosts, "idempotent_hits", access)
    for address in hosts:
        async with access.control(address) as control:
            await control.drop_after_commit(1)
    await client.execute("CREATE TABLE IF NOT EXISTS demo_once (id INTEGER PRIMARY KEY, v TEXT)")
    await client.execute("DELETE FROM demo_once")
    for i in range(9):
        await client.execute("INSERT INTO demo_once (v) VALUES (?)", [f"value-{i}"])
    rows = (await client.query("SELECT count(*) FROM demo_once")).scalar()
    hits = await _node_counter(hosts, "idempotent_hits", access) - hits_before
    report.check(rows == 9, f"9 writes acknowledged, {rows} rows stored")
    report.check(hits == len(hosts), f"{hits} retried writes answered from the stored outcome")


async def _node_counter(hosts: list[str], name: str, access: Access) -> int:
    total = 0
    for address in hosts:
        async with access.control(address) as control:
            total += (await control.stats()).get(name, 0)
    return total


# ------------------------------------------------------------------ phase 5


async def stalled_node(
    client: qdb_client.Client, victim: str, access: Access, report: Report
) -> None:
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
    async with access.control(victim) as control, trio.open_nursery() as nursery:
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


# ------------------------------------------------------------------ phase 6

#: Seconds a node gets to drain on SIGTERM (the node's --grace), plus a margin.
STOP_LIMIT = 5.0 + 5.0


async def rolling_restart(
    client: qdb_client.Client, hosts: list[str], access: Access, report: Report
) -> None:
    print(
        "\n6. Rolling restart under load: each node in turn shut down gracefully"
        " (SIGTERM: GOAWAY, in-flight requests finish) and started again"
    )
    processes = [NodeProcess(address, access) for address in hosts]
    if not all(process.ours for process in processes):
        print("  skipped: the cluster was not started by scripts/start-test-cluster.sh")
        return
    await client.execute("DROP TABLE IF EXISTS demo_roll")
    await client.execute(
        "CREATE TABLE demo_roll (id INTEGER PRIMARY KEY, k TEXT NOT NULL, worker INT NOT NULL)"
    )
    errors: list[BaseException] = []
    acknowledged: list[str] = []
    reads = 0
    misreads = 0
    stop = trio.Event()
    timeline = Timeline()
    before = client.statistics()

    async def worker(index: int) -> None:
        """Keyed writes, each read back at once (on whichever node the driver picks)."""
        nonlocal reads, misreads
        n = 0
        while not stop.is_set():
            key = f"roll-{index}-{n}"
            try:
                await client.execute(
                    "INSERT INTO demo_roll (k, worker) VALUES (?, ?)",
                    [key, index],
                    idempotency_key=key,
                )
                acknowledged.append(key)
                found = await client.query("SELECT count(*) FROM demo_roll WHERE k = ?", [key])
                reads += 1
                misreads += found.scalar() != 1
            except qdb_client.QdbError as exc:
                errors.append(exc)
            n += 1

    drained: list[bool] = []
    served: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timeline.watch_states, client, stop)
        for index in range(8):
            nursery.start_soon(worker, index)
        await trio.sleep(0.5)
        for process in processes:
            timeline.mark(f"SIGTERM to the node on port {process.port}")
            drained.append(await process.stop(signal.SIGTERM, STOP_LIMIT))
            timeline.mark(f"node on port {process.port} exited")
            await process.start()
            timeline.mark(f"node on port {process.port} started again and answering")
            await wait_until_up(client, process.address, 10)
            counts = requests_per_node(client)
            await trio.sleep(0.5)
            served[process.address] = diff(requests_per_node(client), counts)[process.address]
        stop.set()

    timeline.show()
    after = client.statistics()
    requeues = after["requeues"] - before["requeues"]
    retries = after["retries"] - before["retries"]
    print(
        "  requests re-sent at once after a GOAWAY (the draining node never ran them):"
        f" {requeues}; retries: {retries}"
    )
    print(
        "  requests to each node in its first half second back: "
        + ", ".join(f"{address} {count}" for address, count in served.items())
    )
    print(f"  application errors: {len(errors)}")
    rows = await client.query("SELECT k, count(*) FROM demo_roll GROUP BY k")
    stored = {row[0]: row[1] for row in rows}
    report.check(
        errors == [],
        f"{len(acknowledged)} keyed writes and {reads} reads during the restarts,"
        f" {len(errors)} application errors",
    )
    report.check(misreads == 0, "every acknowledged write was read back at once")
    report.check(
        sorted(stored) == sorted(acknowledged) and set(stored.values()) <= {1},
        f"every acknowledged write stored exactly once ({len(stored)} keys,"
        f" {sum(stored.values())} rows)",
    )
    report.check(all(drained), "each node drained and exited by itself (no SIGKILL)")
    report.check(
        all(count > 0 for count in served.values()), "traffic returned to each restarted node"
    )
    if access.credentials:
        report.check(
            after["session"]["password_logins"] == before["session"]["password_logins"],
            "the restarted nodes resumed the session by its token (no password resent)",
        )


# ---------------------------------------------------------------- security


def show_security(client: qdb_client.Client, access: Access) -> None:
    """What protects the connections: facts from the statistics, never a secret."""
    stats = client.statistics()
    session = stats["session"]
    if stats["tls"]:
        print(f"  connections: TLS, node certificates verified against {access.tls_ca}")
    else:
        print("  connections: plain TCP (no --tls-ca)")
    if session["user"] is not None:
        expires = session["expires_in"]
        print(
            f"  login: user {session['user']!r}, session {str(session['session_id'])[:8]}...,"
            f" token valid for {expires or 0:.0f} s; logins by password"
            f" {session['password_logins']}, by session token {session['token_logins']}"
        )
    else:
        print("  login: none (no --credentials-file)")


async def node_security(hosts: list[str], access: Access) -> list[dict[str, Any]]:
    """Each node's TLS flag and handshake counters (since it last started)."""
    facts = []
    for address in hosts:
        async with access.control(address) as control:
            stats = await control.stats()
        facts.append({"address": address, "tls": stats["tls"], **stats["auth"]})
    return facts


# --------------------------------------------------------------------- main


async def run(hosts: list[str], access: Access) -> int:
    report = Report()
    print(f"qdb_client {qdb_client.__version__}: workload against {', '.join(hosts)}")
    for address in hosts:
        async with access.control(address) as control:
            await control.reset()
    # The narrator is an event listener: it prints node and breaker state changes
    # as they happen and, after each part, the retries the driver absorbed.
    narrator = Narrator()
    options = {**DEMO_OPTIONS, **access.client_options(), "listeners": [narrator]}
    async with qdb_client.open_client(hosts, **options) as client:
        show_security(client, access)
        await basic_workload(client, report)
        narrator.summary()
        if len(hosts) > 1:
            await node_outage(client, hosts[-1], access, report)
            narrator.summary()
            await failing_node(client, hosts[0], access, report)
            narrator.summary()
        await lost_replies(client, hosts, access, report)
        narrator.summary()
        if len(hosts) > 1:
            await stalled_node(client, hosts[1], access, report)
            narrator.summary()
            await hedged_reads(
                hosts, hosts[1], access, report, {**DEMO_OPTIONS, **access.client_options()}
            )
        dedup = await _node_counter(hosts, "idempotent_hits", access)  # before restarts zero it
        if len(hosts) > 1:
            await rolling_restart(client, hosts, access, report)
            narrator.summary()
        stats = client.statistics()
        print("\nSecurity")
        show_security(client, access)
    nodes = await node_security(hosts, access)
    print("  handshakes each node answered since it last started:")
    for node in nodes:
        print(
            f"  {node['address']:<16} TLS {'yes' if node['tls'] else 'no ':<3}"
            f"  logins by password {node['password_hellos']}, by session token"
            f" {node['token_hellos']}, refused {node['password_refused'] + node['token_refused']}"
        )
    if access.tls:
        report.check(stats["tls"] and all(n["tls"] for n in nodes), "every connection used TLS")
    if access.credentials:
        report.check(
            stats["session"]["password_logins"] == 1,
            "the password was sent once; every other connection resumed the session by token",
        )

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
    print(f"  deduplicated writes (node side, parts 1-5): {dedup}")

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
    parser.add_argument(
        "--tls-ca", metavar="PEM", help="use TLS, trusting this authority's certificates"
    )
    parser.add_argument(
        "--credentials-file", metavar="PATH", help="log in as its first user (user:password lines)"
    )
    args = parser.parse_args()
    try:
        access = Access(args.tls_ca, args.credentials_file)
    except (OSError, ssl.SSLError, qdb_client.QdbError) as exc:
        parser.error(f"cannot use --tls-ca/--credentials-file: {exc}")
    sys.exit(trio.run(run, args.hosts.split(","), access))


if __name__ == "__main__":
    main()
