"""Where the client's time goes: cProfile of point reads through the whole driver.

Starts ``bench/stub_node.py`` in its own process (a node that answers at
once, so only the client is measured), runs ``--requests`` point reads from
``--tasks`` tasks through ``qdb_client``, and prints the functions with the
most time of their own (``tottime``) and the most time including callees.

    .venv/bin/python bench/profile_request.py [--requests 20000] [--tasks 64] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path

import trio

import qdb_client

STUB = Path(__file__).with_name("stub_node.py")


def start_stub() -> tuple[subprocess.Popen[str], str]:
    """The stub node process and the address it listens on."""
    process = subprocess.Popen(
        [sys.executable, str(STUB)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("STUB READY port="):
        process.kill()
        raise RuntimeError(f"stub node did not start: {line!r}")
    return process, f"127.0.0.1:{line.strip().rsplit('=', 1)[1]}"


async def workload(address: str, requests: int, tasks: int, profile: cProfile.Profile) -> float:
    options = dict(max_connections=1, min_connections=1, heartbeat_interval=3600.0)
    async with qdb_client.open_client(address, **options) as client:
        await client.query("SELECT id, name FROM users WHERE id = ?", [1])

        async def worker(count: int) -> None:
            for _ in range(count):
                await client.query("SELECT id, name FROM users WHERE id = ?", [1])

        cpu = time.process_time()
        profile.enable()
        async with trio.open_nursery() as nursery:
            for i in range(tasks):
                nursery.start_soon(worker, requests // tasks + (i < requests % tasks))
        profile.disable()
        return (time.process_time() - cpu) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    stub, address = start_stub()
    try:
        profile = cProfile.Profile()
        cpu_us = trio.run(workload, address, args.requests, args.tasks, profile)
    finally:
        stub.kill()
    print(f"{args.requests} point reads from {args.tasks} task(s): {cpu_us:.1f} us CPU per request")
    print("(under cProfile, which roughly doubles the cost; compare functions, not totals)\n")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(key).print_stats(args.top)
        text = out.getvalue()
        print(f"--- top {args.top} by {key} ---")
        print(text[text.index("ncalls") :] if "ncalls" in text else text)


if __name__ == "__main__":
    main()
