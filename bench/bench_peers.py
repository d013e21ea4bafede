"""qdb_client beside the floor and beside the drivers users would pick instead.

Client CPU per request (``time.process_time()`` inside the client process,
around the calls only) and throughput for a point read and a small keyed
insert at 1, 16 and 64 in flight, for:

- ``qdb``: qdb_client through its whole pipeline, against the stub node
  (``bench/stub_node.py``: answers at once, so the client is what is measured);
- ``bare``: the bare trio loop of ``bench/bare_loop.py`` against the same
  stub: the same frames, cbor2 and crc32, nothing else (pipelined from one
  task when more than one request is in flight);
- ``bare-mux``: the floor for many callers (``bare_multiplexed``): a task per
  caller writing its own frame, one reader handing each reply to its caller
  by id; what any trio driver that shares a connection among tasks pays at
  least (at 1 in flight: two tasks per round trip instead of one);
- ``redis``: redis-py asyncio GET/SET against a local ``redis-server``, when
  both are installed;
- ``asyncpg``: asyncpg prepared SELECT/INSERT on one connection against a
  local PostgreSQL, at 1 in flight, when both are installed.

Every measurement runs in its own process (``bench/peer_client.py``); the
systems are interleaved in rounds, and each ratio is the median of the
per-round ratios, so a machine whose load changes during the run skews
all systems of a round alike. Missing peers are skipped with a note.

    .venv/bin/python bench/bench_peers.py [--rounds 5] [--requests 5000]
    .venv/bin/pip install -e '.[bench]'   # redis, asyncpg
    apt-get install redis-server postgresql
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
LEVELS = (1, 16, 64)
WORKLOADS = ("read", "write")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def stub_node() -> Iterator[str]:
    process = subprocess.Popen(
        [PYTHON, str(HERE / "stub_node.py")], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        yield f"127.0.0.1:{line.strip().rsplit('=', 1)[1]}"
    finally:
        process.kill()
        process.wait()


def _importable(module: str) -> bool:
    result = subprocess.run([PYTHON, "-c", f"import {module}"], capture_output=True)
    return result.returncode == 0


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    binary = shutil.which("redis-server")
    if binary is None or not _importable("redis"):
        print("  (redis skipped: needs redis-server and the redis package: see the docstring)")
        yield None
        return
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None or not _importable("asyncpg"):
        print("  (asyncpg skipped: needs PostgreSQL and the asyncpg package: see the docstring)")
        yield None
        return
    directory = tempfile.mkdtemp(prefix="qdb-bench-pg-")
    port = free_port()
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(directory, "postgres")
    try:
        subprocess.run(
            [*run_as, initdb, "-D", f"{directory}/data", "-U", "bench", "-A", "trust"],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *run_as,
                pg_ctl,
                "-D",
                f"{directory}/data",
                "-o",
                f"-p {port} -k {directory} -c fsync=off -c synchronous_commit=off",
                "-l",
                f"{directory}/log",
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://bench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", f"{directory}/data", "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(directory, ignore_errors=True)


def measure(system: str, address: str, workload: str, in_flight: int, requests: int) -> dict:
    result = subprocess.run(
        [
            PYTHON,
            str(HERE / "peer_client.py"),
            "--system",
            system,
            "--workload",
            workload,
            "--in-flight",
            str(in_flight),
            "--requests",
            str(requests),
            "--address",
            address,
        ],
        capture_output=True,
        text=True,
        cwd=HERE,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{system} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    print(f"{args.rounds} rounds x {args.requests} requests; {os.cpu_count()} cores")
    with stub_node() as stub, redis_server() as redis, postgres() as pg:
        systems: dict[str, str] = {"bare": stub, "bare-mux": stub, "qdb": stub}
        if redis:
            systems["redis"] = redis
        if pg:
            systems["asyncpg"] = pg
        runs: dict[tuple[str, str, int], list[dict]] = {}
        for round_number in range(args.rounds):
            for workload in WORKLOADS:
                for level in levels:
                    for system, address in systems.items():
                        if system == "asyncpg" and level != 1:
                            continue
                        key = (system, workload, level)
                        runs.setdefault(key, []).append(
                            measure(system, address, workload, level, args.requests)
                        )
            print(f"  round {round_number + 1}/{args.rounds} done", flush=True)
    report(runs, levels, list(systems))


def report(runs: dict[tuple[str, str, int], list[dict]], levels: list[int], systems: list[str]):
    def median(key: tuple[str, str, int], field: str) -> float:
        return statistics.median(r[field] for r in runs[key])

    def ratio(a: tuple[str, str, int], b: tuple[str, str, int], field: str) -> float:
        if a not in runs or b not in runs:
            return float("nan")
        return statistics.median(x[field] / y[field] for x, y in zip(runs[a], runs[b], strict=True))

    def spread(a: tuple[str, str, int], b: tuple[str, str, int], field: str) -> tuple[float, float]:
        if a not in runs or b not in runs:
            return float("nan"), float("nan")
        ratios = [x[field] / y[field] for x, y in zip(runs[a], runs[b], strict=True)]
        return min(ratios), max(ratios)

    print("\nclient CPU per request, us (median of rounds)")
    header = "  ".join(f"{w}@{n:<3}" for w in WORKLOADS for n in levels)
    print(f"  {'system':<8} {header}")
    for system in systems:
        cells = []
        for workload in WORKLOADS:
            for level in levels:
                key = (system, workload, level)
                cells.append(f"{median(key, 'cpu_us'):>9.1f}" if key in runs else f"{'-':>9}")
        print(f"  {system:<8} " + "".join(cells))

    def per_other(cell: Callable[[str, str, int], str]) -> None:
        for other in systems:
            if other != "qdb":
                cells = [cell(other, w, level) for w in WORKLOADS for level in levels]
                print(f"  {other:<8} " + "".join(cells))

    def median_ratio(other: str, workload: str, level: int) -> str:
        r = ratio(("qdb", workload, level), (other, workload, level), "cpu_us")
        return f"{r:>8.2f}x" if r == r else f"{'-':>9}"

    def ratio_spread(other: str, workload: str, level: int) -> str:
        low, high = spread(("qdb", workload, level), (other, workload, level), "cpu_us")
        return f"{f'{low:.2f}-{high:.2f}':>11}" if low == low else f"{'-':>11}"

    print("\nqdb_client / other, CPU per request (median of per-round ratios)")
    print(f"  {'vs':<8} {header}")
    per_other(median_ratio)
    print("\nthe same ratios' spread over the rounds (lowest-highest): the VM's noise")
    print(f"  {'vs':<8}" + "".join(f"{f'{w}@{n}':>11}" for w in WORKLOADS for n in levels))
    per_other(ratio_spread)
    print("\nthroughput, qdb_client / bare loop (median of per-round ratios)")
    cells = []
    for workload in WORKLOADS:
        for level in levels:
            r = ratio(("qdb", workload, level), ("bare", workload, level), "rps")
            cells.append(f"{r:>8.2f}x")
    print(f"  {'':<8} " + "".join(cells))


if __name__ == "__main__":
    main()
