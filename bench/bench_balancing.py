"""Three nodes, one of them slow: round robin against latency-aware balancing.

Starts a 3-node cluster (separate processes), adds 20 ms of latency to every
``query`` on one node, and runs the same workload (64 concurrent tasks by
default, ``--tasks``, issuing ``SELECT 1``) through the driver with each
balancing policy. Prints
throughput, p50/p99 latency and each node's share of the requests.

    .venv/bin/python bench/bench_balancing.py [--requests 6000] [--slow-ms 20]
"""

from __future__ import annotations

import argparse
import time

import trio

import qdb_client
from qdb_client.testing import TestCluster


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_policy(addresses: list[str], policy: str, requests: int, tasks: int) -> dict:
    latencies: list[float] = []
    options = dict(load_balancing=policy, heartbeat_interval=3600.0, random_seed=1, slow_start=0.0)
    async with qdb_client.open_client(addresses, **options) as client:
        for _ in range(30):
            await client.query("SELECT 1")  # every pool warm, latency averages seeded

        async def worker(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                await client.query("SELECT 1")
                latencies.append(time.perf_counter() - started)

        before = {n["address"]: n["requests_sent"] for n in client.statistics()["nodes"]}
        wall = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                nursery.start_soon(worker, requests // tasks + (i < requests % tasks))
        wall = time.perf_counter() - wall
        shares = {
            n["address"]: (n["requests_sent"] - before[n["address"]]) / requests
            for n in client.statistics()["nodes"]
        }
    return {
        "policy": policy,
        "throughput": requests / wall,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "mean": sum(latencies) / len(latencies),
        "shares": shares,
    }


async def main(requests: int, slow_ms: int, tasks: int) -> None:
    async with TestCluster.start_subprocesses(n=3) as cluster:
        slow = cluster.addresses[2]
        async with cluster.control(2) as control:
            await control.add_latency("query", slow_ms / 1000)
        results = [
            await run_policy(cluster.addresses, policy, requests, tasks)
            for policy in ("round_robin", "latency_aware")
        ]
    print(
        f"\n3 nodes, {slow} answers every query {slow_ms} ms late;"
        f" {requests} x SELECT 1 from {tasks} tasks\n"
    )
    names = [a.rsplit(":", 1)[1] for a in cluster.addresses]
    shares = "  ".join(f"{'port ' + n:>10}" for n in names)
    header = f"  {'policy':<15} {'req/s':>8} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8}"
    print(f"{header}   share: {shares}")
    for r in results:
        cells = "  ".join(f"{r['shares'][a] * 100:>9.1f}%" for a in cluster.addresses)
        print(
            f"  {r['policy']:<15} {r['throughput']:>8.0f} {r['mean'] * 1e3:>8.2f}"
            f" {r['p50'] * 1e3:>8.2f}"
            f" {r['p99'] * 1e3:>8.2f}          {cells}"
        )
    rr, la = results
    print(
        f"\n  latency-aware vs round robin: throughput {la['throughput'] / rr['throughput']:.2f}x,"
        f" mean {la['mean'] / rr['mean']:.2f}x, p99 {la['p99'] / rr['p99']:.2f}x"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--slow-ms", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=64, help="concurrent tasks")
    args = parser.parse_args()
    trio.run(main, args.requests, args.slow_ms, args.tasks)
