"""Does qdb_client's client CPU per request stay flat with more nodes and more callers?

Issue 8 asks for client CPU per request within 20% from 1 to 16 nodes and
from 1 to 1000 requests in flight. This measures a point read
(``client.query("SELECT id, name FROM users WHERE id = ?", [1])``) against
stub nodes (``bench/stub_node.py``: canned answers at once, so the client is
the bottleneck; its WELCOME allows 100000 requests in flight per connection):

- **nodes**: 1, 4 and 16 stub nodes at 64 in flight. Sixteen stub processes
  start once; each run's client is given the first N addresses with
  ``discover_members=False`` and one connection per node
  (``min_connections=max_connections=1``, as ``peer_client.qdb``). Two
  control points tell the socket count from the node count: ``1n x16c`` puts
  the 64 requests on 16 connections to one node (``max_in_flight=4`` each,
  so 4 per socket as with 16 nodes), ``16n@1024`` keeps 64 per node on 16
  nodes (1024 in flight, as many per socket as the 1-node point).
- **in flight**: 1, 16, 64, 256 and 1000 caller tasks against one node, on one
  connection with ``max_in_flight=1024`` (the client's per-connection cap;
  default 256) so every caller's request is on the wire at once. Two more
  points at 1000 callers show the other ways to hold them: ``1000q`` keeps the
  default cap of 256 on one connection, so 744 callers queue in the pool
  (``max_waiters`` 1000 by default), and ``1000c4`` spreads them over four
  connections of 256. The bulkhead (``max_concurrent_requests``, 10000 by
  default) never binds here.
- every point: ``heartbeat_interval=3600``, ``attempt_timeout_min=10``,
  ``request_timeout=60``, ``pool_acquire_timeout=60``: on a loaded machine
  1000 requests in flight can wait longer than the 0.25 s attempt-timeout
  floor, and retries would measure something else (attempt timeouts stay on,
  so the request path is the usual one).

Every measurement runs in its own process (``bench/peer_client.py --system
qdb``), which reports its CPU per request (``time.process_time()`` around the
calls only) and, sampled every 5 ms (the sampler's CPU left out), the peak
number of callers inside the client, of requests on the wire and of callers
queued in the pools: what actually happened. Runs at ``L`` in flight make
``max(--requests, 10 * L)`` requests, so 1000 callers stay 1000 for most of the
run. The points are interleaved in rounds (their order rotated each round),
and each ratio is the median of the per-round ratios to the reference: 1 node
for the nodes, 16 in flight for the in-flight points (and to 1 in flight as
well).

    .venv/bin/python bench/bench_scaling.py [--rounds 3] [--requests 3000]
        [--nodes 1,4,16] [--levels 1,16,64,256,1000] [--no-variants]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
FLAT = 1.2  # issue 8: within 20%
#: For every point: a loaded 2-core machine can take longer than the 0.25 s
#: attempt-timeout floor at 1000 in flight; the request path stays the same.
FIXED_OPTIONS = ("attempt_timeout_min=10", "request_timeout=60", "pool_acquire_timeout=60")


@dataclass(frozen=True)
class Point:
    """One measured configuration."""

    group: str  # "nodes" or "in_flight"
    label: str
    nodes: int
    in_flight: int
    connections: int = 1
    max_in_flight: int | None = None
    options: str = ""

    def requests(self, base: int) -> int:
        return max(base, 10 * self.in_flight)


@contextlib.contextmanager
def stub_nodes(count: int) -> Iterator[list[str]]:
    """``count`` stub node processes; yields their addresses."""
    processes = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [PYTHON, str(HERE / "stub_node.py")],
                    stdout=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                )
            )
        addresses = []
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line.startswith("STUB READY port="):
                raise RuntimeError(f"stub node did not start: {line!r}")
            addresses.append(f"127.0.0.1:{line.strip().rsplit('=', 1)[1]}")
        yield addresses
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


def points(nodes: list[int], levels: list[int], variants: bool) -> list[Point]:
    found = [
        Point("nodes", f"{n} node{'s' if n > 1 else ''}", n, 64, options="1 conn/node, cap 256")
        for n in nodes
    ]
    if variants and max(nodes) > 1:
        most = max(nodes)
        # The same spread over sockets without more nodes, and more nodes
        # without the spread: which of the two costs?
        found.append(
            Point(
                "nodes",
                f"1n x{most}c",
                1,
                64,
                connections=most,
                max_in_flight=max(1, 64 // most),
                options=f"{most} conns x cap {max(1, 64 // most)}",
            )
        )
        found.append(
            Point("nodes", f"{most}n@{64 * most}", most, 64 * most, options="1 conn/node, 64 each")
        )
    found += [
        Point("in_flight", str(level), 1, level, max_in_flight=1024, options="1 conn, cap 1024")
        for level in levels
    ]
    if variants:
        found.append(Point("in_flight", "1000q", 1, 1000, options="1 conn, cap 256, pool queue"))
        found.append(Point("in_flight", "1000c4", 1, 1000, connections=4, options="4 conns x 256"))
    return found


def measure(point: Point, addresses: list[str], requests: int) -> dict:
    command = [
        PYTHON,
        str(HERE / "peer_client.py"),
        "--system",
        "qdb",
        "--workload",
        "read",
        "--in-flight",
        str(point.in_flight),
        "--requests",
        str(point.requests(requests)),
        "--address",
        ",".join(addresses[: point.nodes]),
        "--connections",
        str(point.connections),
        "--no-discover",
        "--sample",
        *(f"--set={option}" for option in FIXED_OPTIONS),
    ]
    if point.max_in_flight is not None:
        command += ["--max-in-flight", str(point.max_in_flight)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=HERE, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{point.label} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--nodes", default="1,4,16")
    parser.add_argument("--levels", default="1,16,64,256,1000")
    parser.add_argument("--no-variants", action="store_true", help="only the plain sweeps")
    args = parser.parse_args()
    nodes = [int(x) for x in args.nodes.split(",")]
    levels = [int(x) for x in args.levels.split(",")]
    plan = points(nodes, levels, not args.no_variants)
    started = time.perf_counter()
    print(
        f"{args.rounds} rounds x {len(plan)} points, >= {args.requests} point reads each;"
        f" {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    runs: dict[Point, list[dict]] = {point: [] for point in plan}
    with stub_nodes(max(nodes)) as addresses:
        for round_number in range(args.rounds):
            shift = round_number % len(plan)
            for point in plan[shift:] + plan[:shift]:
                runs[point].append(measure(point, addresses, args.requests))
            print(f"  round {round_number + 1}/{args.rounds} done", flush=True)
    report(plan, runs)
    print(f"\n{time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.1f}")


def report(plan: list[Point], runs: dict[Point, list[dict]]) -> None:
    def median(point: Point, name: str) -> float:
        return statistics.median(r[name] for r in runs[point])

    def peak(point: Point, name: str) -> int:
        return max(r[name] for r in runs[point])

    def ratio(point: Point, reference: Point | None) -> str:
        if reference is None:
            return f"{'-':>6}"
        pairs = zip(runs[point], runs[reference], strict=True)
        value = statistics.median(a["cpu_us"] / b["cpu_us"] for a, b in pairs)
        mark = " " if value <= FLAT else "!"
        return f"{value:>5.2f}x{mark}"

    def retries(point: Point) -> int:
        return sum(r["retries"] for r in runs[point])

    def find(group: str, label: str) -> Point | None:
        return next((p for p in plan if p.group == group and p.label == label), None)

    by_nodes = [p for p in plan if p.group == "nodes"]
    if by_nodes:
        reference = next((p for p in by_nodes if p.nodes == 1), by_nodes[0])
        print(f"\nnodes: point read at 64 in flight; ratio to {reference.label} (median of rounds)")
        print(
            f"  {'nodes':<9} {'options':<22} {'cpu us':>7} {'ratio':>7} {'rps':>7}"
            f" {'p50 us':>8} {'wire':>5} {'queue':>5} {'conns':>5} {'seen':>4}"
            f" {'per-node sent':>13} {'retry':>5}"
        )
        for p in by_nodes:
            sent = f"{min(r['sent_min'] for r in runs[p])}-{max(r['sent_max'] for r in runs[p])}"
            print(
                f"  {p.label:<9} {p.options:<22} {median(p, 'cpu_us'):>7.1f} {ratio(p, reference)}"
                f" {median(p, 'rps'):>7.0f} {median(p, 'p50_us'):>8.0f}"
                f" {peak(p, 'peak_on_wire'):>5} {peak(p, 'peak_queued'):>5}"
                f" {peak(p, 'peak_connections'):>5} {min(r['nodes'] for r in runs[p]):>4}"
                f" {sent:>13} {retries(p):>5}"
            )
    by_level = [p for p in plan if p.group == "in_flight"]
    if by_level:
        reference = find("in_flight", "16") or by_level[0]
        one = find("in_flight", "1")
        print(
            f"\nin flight: point read, 1 node; ratio to {reference.label} in flight"
            " and to 1 (median of rounds)"
        )
        print(
            f"  {'callers':<8} {'options':<28} {'requests':>8} {'cpu us':>7} {'/16':>7} {'/1':>7}"
            f" {'rps':>7} {'p50 us':>8} {'client':>6} {'wire':>5} {'queue':>5} {'conns':>5}"
            f" {'retry':>5}"
        )
        for p in by_level:
            requests = runs[p][0]["requests"]
            print(
                f"  {p.label:<8} {p.options:<28} {requests:>8} {median(p, 'cpu_us'):>7.1f}"
                f" {ratio(p, reference)} {ratio(p, one)}"
                f" {median(p, 'rps'):>7.0f} {median(p, 'p50_us'):>8.0f}"
                f" {peak(p, 'peak_in_progress'):>6} {peak(p, 'peak_on_wire'):>5}"
                f" {peak(p, 'peak_queued'):>5} {peak(p, 'peak_connections'):>5} {retries(p):>5}"
            )
    failures = sum(r["failures"] for rs in runs.values() for r in rs)
    print(
        "\n  cpu us: client process CPU per request; ! = beyond 20%; client/wire/queue:"
        " peak callers inside the client, requests on the wire, callers queued in the"
        " pools (sampled every 5 ms); seen: nodes the client knows (fewest in a run);"
        " per-node sent: fewest-most requests a node got (warm-up included);"
        f" retry: retries in all rounds; failed calls in all runs: {failures}"
    )


if __name__ == "__main__":
    main()
