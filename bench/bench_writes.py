"""Seed 004's write performance check, as a benchmark (not a timed test).

Against one test node in a separate process (so the client's event loop is
measured alone), each run on a fresh table:

- ``creates``: 1000 keyed ``INSERT`` executes from 10 concurrent workers
  (target: under 1 s);
- ``executemany``: one keyed ``executemany`` of 1000 rows (target: under 0.2 s);
- ``single executes``: the same 1000 rows as 1000 executes one after the
  other, for comparison.

Prints a table of wall time, rows per second and the target, best of
``--rounds`` runs:

    .venv/bin/python bench/bench_writes.py [--rows 1000] [--workers 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import trio

import qdb_client
from qdb_client.testing import TestCluster

OPTIONS = {"heartbeat_interval": 60.0, "slow_start": 0.0, "discover_members": False}
INSERT = "INSERT INTO bench (id, name, amount) VALUES (?, ?, ?)"


def row(i: int) -> list[object]:
    return [i, f"user-{i}", i * 1.5]


async def creates(client: qdb_client.Client, rows: int, workers: int) -> None:
    ids = iter(range(rows))

    async def worker() -> None:
        for i in ids:  # shared iterator: the workers split the rows between them
            await client.execute(INSERT, row(i))

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)


async def executemany(client: qdb_client.Client, rows: int, workers: int) -> None:
    assert await client.executemany(INSERT, [row(i) for i in range(rows)]) == rows


async def singles(client: qdb_client.Client, rows: int, workers: int) -> None:
    for i in range(rows):
        await client.execute(INSERT, row(i))


Scenario = Callable[[qdb_client.Client, int, int], Awaitable[None]]
SCENARIOS: list[tuple[str, Scenario, float | None]] = [
    ("creates (10 workers)", creates, 1.0),
    ("executemany (1 request)", executemany, 0.2),
    ("single executes (serial)", singles, None),
]


async def measure(client: qdb_client.Client, scenario: Scenario, rows: int, workers: int) -> float:
    await client.execute("DROP TABLE IF EXISTS bench")
    await client.execute("CREATE TABLE bench (id INTEGER PRIMARY KEY, name TEXT, amount REAL)")
    started = time.perf_counter()
    await scenario(client, rows, workers)
    elapsed = time.perf_counter() - started
    count = (await client.query("SELECT count(*) FROM bench")).scalar()
    assert count == rows, f"{count} rows stored, {rows} written"
    return elapsed


async def main(rows: int, workers: int, rounds: int) -> None:
    async with (
        TestCluster.start_subprocesses(n=1) as cluster,
        qdb_client.open_client(cluster.addresses, **OPTIONS) as client,
    ):
        await client.query("SELECT 1")  # connected and warm
        results = []
        for name, scenario, target in SCENARIOS:
            best = min([await measure(client, scenario, rows, workers) for _ in range(rounds)])
            results.append((name, best, target))
    print(f"{rows} rows, {workers} workers for creates, best of {rounds} (node in a subprocess)")
    print(f"{'scenario':<26} {'seconds':>9} {'rows/s':>10} {'target':>8}  verdict")
    for name, best, target in results:
        verdict = "-" if target is None else ("ok" if best < target else "SLOW")
        shown = "" if target is None else f"< {target:g} s"
        print(f"{name:<26} {best:>9.3f} {rows / best:>10.0f} {shown:>8}  {verdict}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.rows, args.workers, args.rounds)
