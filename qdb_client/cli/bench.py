"""``qdb bench``: a read/write workload with a live progress bar and a latency table.

::

    qdb bench qdb://127.0.0.1:7000 --duration 10 --tasks 16 --read-ratio 0.9

Creates ``--table`` (default ``qdb_bench``: ``id INTEGER PRIMARY KEY, n
INTEGER, payload TEXT``) if missing, with ``--rows`` rows; then ``--tasks``
concurrent tasks run, until ``--duration`` seconds have passed, reads
(``SELECT ... WHERE id = ?``, a ``--read-ratio`` share) and writes
(``UPDATE ... SET n = n + 1 WHERE id = ?``, with idempotency keys) on
random rows. A request started before the end is let finish. Failures are
counted by error class, never stop the run. The table keeps its rows
bounded: writes update, never insert.

Prints, per operation and in total: requests, failures, throughput
(successful requests per second) and latency percentiles (p50, p90, p99,
p99.9, max) of successful requests in milliseconds. Exit status 0 when
every request succeeded, 1 when some failed (the results are printed all
the same), 3 or 4 when the setup could not reach the cluster or timed out.
"""

from __future__ import annotations

import argparse
import math
import random
import re
from collections import Counter
from typing import Any

import attrs
import trio

from .. import Client, open_client
from ..config import ClientConfig
from ..errors import QdbError
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_client_arguments,
    client_config,
    config_keywords,
)
from .render import Output

__all__ = ["BenchResult", "add_parsers", "percentile", "run_bench"]

#: Percentiles in the result table, as (label, fraction).
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999))
#: Latencies kept per operation (a bounded reservoir beyond this).
MAX_SAMPLES = 1_000_000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``bench`` to the ``qdb`` subcommand parsers."""
    bench = commands.add_parser(
        "bench",
        parents=[common],
        help="run a read/write workload; print throughput and latency percentiles",
        description="Create --table with --rows rows if missing, then run reads (a"
        " --read-ratio share) and updates of random rows from --tasks concurrent tasks for"
        " --duration seconds, with a live progress bar; print requests, failures, throughput"
        " and latency percentiles per operation. Exit 0 if every request succeeded, 1 if"
        " some failed.",
    )
    add_client_arguments(bench)
    bench.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds (10)")
    bench.add_argument("--tasks", type=int, default=16, metavar="N", help="concurrent tasks (16)")
    bench.add_argument(
        "--read-ratio", type=float, default=0.9, metavar="R", help="share of reads, 0..1 (0.9)"
    )
    bench.add_argument("--rows", type=int, default=100, metavar="N", help="rows to use (100)")
    bench.add_argument("--table", default="qdb_bench", help="table name (qdb_bench)")
    bench.add_argument("--seed", type=int, default=None, help="random seed of the workload")
    bench.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="the live progress bar on stderr: auto (when stderr is a terminal), always, never",
    )
    bench.set_defaults(run=run_bench)


def percentile(ordered: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None if it is empty)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@attrs.define
class _Operation:
    """Counts and latency samples of one kind of request."""

    name: str
    count: int = 0
    failures: int = 0
    samples: list[float] = attrs.Factory(list)
    seen: int = 0

    def record(self, seconds: float, rng: random.Random) -> None:
        self.count += 1
        self.seen += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(seconds)
        else:  # reservoir sampling keeps an unbiased sample of every latency
            slot = rng.randrange(self.seen)
            if slot < MAX_SAMPLES:
                self.samples[slot] = seconds

    def summary(self, elapsed: float) -> dict[str, Any]:
        ordered = sorted(self.samples)
        row: dict[str, Any] = {
            "requests": self.count + self.failures,
            "failures": self.failures,
            "throughput": self.count / elapsed if elapsed > 0 else 0.0,
        }
        for label, fraction in PERCENTILES:
            value = percentile(ordered, fraction)
            row[f"{label}_ms"] = None if value is None else value * 1000
        row["max_ms"] = ordered[-1] * 1000 if ordered else None
        return row


@attrs.define
class BenchResult:
    """What a run measured; :meth:`as_dict` is the ``--json`` output."""

    duration: float
    tasks: int
    read_ratio: float
    elapsed: float = 0.0
    read: _Operation = attrs.Factory(lambda: _Operation("read"))
    write: _Operation = attrs.Factory(lambda: _Operation("write"))
    errors: Counter[str] = attrs.Factory(Counter)

    def as_dict(self) -> dict[str, Any]:
        """The settings, per-operation and total summaries, and failures by error class."""
        total = _Operation("total", samples=self.read.samples + self.write.samples)
        total.count = self.read.count + self.write.count
        total.failures = self.read.failures + self.write.failures
        return {
            "duration": self.duration,
            "tasks": self.tasks,
            "read_ratio": self.read_ratio,
            "elapsed": self.elapsed,
            "operations": {
                op.name: op.summary(self.elapsed) for op in (self.read, self.write, total)
            },
            "errors": dict(self.errors),
        }


def _check(ns: argparse.Namespace) -> None:
    if not (math.isfinite(ns.duration) and 0 < ns.duration <= 86_400):
        raise CliError("--duration must be within 0..86400 seconds", EXIT_USAGE)
    if not 1 <= ns.tasks <= 10_000:
        raise CliError("--tasks must be within 1..10000", EXIT_USAGE)
    if not 0 <= ns.read_ratio <= 1:
        raise CliError("--read-ratio must be within 0..1", EXIT_USAGE)
    if not 1 <= ns.rows <= 1_000_000:
        raise CliError("--rows must be within 1..1000000", EXIT_USAGE)
    if not _IDENTIFIER.fullmatch(ns.table):
        raise CliError("--table must be an SQL identifier (letters, digits, _)", EXIT_USAGE)


def run_bench(ns: argparse.Namespace, out: Output) -> int:
    """``qdb bench``: set up, run the workload, print the summary."""
    _check(ns)
    config = client_config(ns)
    enabled = ns.progress == "always" or (
        ns.progress == "auto" and not out.json_mode and out.stderr.isatty()
    )
    result = BenchResult(duration=ns.duration, tasks=ns.tasks, read_ratio=ns.read_ratio)
    rng = random.Random(ns.seed)
    trio.run(_bench, config, ns, result, rng, out, enabled)
    summary = result.as_dict()
    if out.json_mode:
        out.json(summary)
    else:
        _print_summary(out, summary)
    return EXIT_OK if not result.errors else EXIT_FAILED


def _print_summary(out: Output, summary: dict[str, Any]) -> None:
    columns = ["operation", "requests", "failures", "req/s"]
    columns += [f"{label} ms" for label, _ in PERCENTILES] + ["max ms"]
    rows = []
    for name, op in summary["operations"].items():
        row = [name, op["requests"], op["failures"], round(op["throughput"], 1)]
        for key in [f"{label}_ms" for label, _ in PERCENTILES] + ["max_ms"]:
            row.append(None if op[key] is None else round(op[key], 3))
        rows.append(row)
    title = (
        f"{summary['tasks']} task(s), {summary['elapsed']:.2f} s,"
        f" read ratio {summary['read_ratio']:g}"
    )
    out.table(columns, rows, title=title)
    if summary["errors"]:
        out.table(["error", "count"], sorted(summary["errors"].items(), key=lambda item: -item[1]))


async def _bench(
    config: ClientConfig,
    ns: argparse.Namespace,
    result: BenchResult,
    rng: random.Random,
    out: Output,
    progress: bool,
) -> None:
    table, rows = ns.table, ns.rows
    async with open_client(config.hosts, **config_keywords(config)) as client:
        await _set_up(client, table, rows)
        start = trio.current_time()
        deadline = start + ns.duration
        with out.progress("bench", ns.duration, enabled=progress) as bar:
            async with trio.open_nursery() as nursery:
                for _ in range(ns.tasks):
                    task_rng = random.Random(rng.getrandbits(64))
                    nursery.start_soon(_worker, client, table, rows, deadline, result, task_rng)
                while trio.current_time() < deadline:
                    await trio.sleep(0.1)
                    _show_progress(bar, result, start)
            result.elapsed = trio.current_time() - start
            _show_progress(bar, result, start, final=ns.duration)


def _show_progress(bar: Any, result: BenchResult, start: float, final: float | None = None) -> None:
    elapsed = trio.current_time() - start
    done = result.read.count + result.write.count
    failed = result.read.failures + result.write.failures
    rate = done / elapsed if elapsed > 0 else 0.0
    bar.update(
        elapsed if final is None else final,
        f"{done} ok, {failed} failed, {rate:,.0f} req/s",
    )


async def _set_up(client: Client, table: str, rows: int) -> None:
    await client.execute(
        f"CREATE TABLE IF NOT EXISTS {table}"
        " (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT 0, payload TEXT)"
    )
    have = (await client.query(f"SELECT COUNT(*) FROM {table} WHERE id <= ?", [rows])).scalar()
    if have < rows:
        statements = [
            (f"INSERT OR IGNORE INTO {table} (id, payload) VALUES (?, ?)", [i, f"row {i}"])
            for i in range(1, rows + 1)
        ]
        for first in range(0, len(statements), 500):
            await client.batch(statements[first : first + 500])


async def _worker(
    client: Client,
    table: str,
    rows: int,
    deadline: float,
    result: BenchResult,
    rng: random.Random,
) -> None:
    read_sql = f"SELECT id, n, payload FROM {table} WHERE id = ?"
    write_sql = f"UPDATE {table} SET n = n + 1 WHERE id = ?"
    while trio.current_time() < deadline:
        row = rng.randint(1, rows)
        reading = rng.random() < result.read_ratio
        op = result.read if reading else result.write
        began = trio.current_time()
        try:
            if reading:
                await client.query(read_sql, [row])
            else:
                await client.execute(write_sql, [row])
        except QdbError as exc:
            op.failures += 1
            result.errors[type(exc).__name__] += 1
            await trio.sleep(0.01)  # a failing cluster is not hammered at CPU speed
            continue
        op.record(trio.current_time() - began, rng)
