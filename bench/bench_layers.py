"""Where a point read's client CPU goes, layer by layer, against the stub node.

The same point read is made four ways, each through one layer fewer, at 1 and
64 in flight on one connection; the differences between the rows are what
each layer costs:

- ``client.query``: the public API (argument checks, parameters, the result).
- ``Client._call``: the bulkhead and the request pipeline (deadline, node
  selection, breaker, pool slot, attempt timeout, expiry timer, reply-time
  bookkeeping) and the result built from the reply, without the API layer.
- ``connection``: one ``Connection.send_reserved`` + ``PendingRequest.wait``
  per call: the frames, the writer, the reader task and the hand-off of each
  reply, nothing of the pipeline.
- ``bare-mux``: ``bench/bare_loop.py``'s many-caller floor (its own process,
  via ``bench/peer_client.py``): the same frames with nothing else.

Each row is run ``--rounds`` times (interleaved) and the lowest CPU per
request is shown (``time.process_time()`` around the calls only).

    .venv/bin/python bench/bench_layers.py [--rounds 3] [--requests 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from bench_peers import stub_node

import qdb_client
from qdb_client.results import QueryResult

HERE = Path(__file__).resolve().parent
SQL = "SELECT id, name FROM users WHERE id = ?"
LAYERS = ("client.query", "Client._call", "connection")


async def _layer_call(client: qdb_client.Client, layer: str) -> Callable[[], Awaitable[Any]]:
    """One call of the point read through ``layer``."""
    if layer == "client.query":
        return lambda: client.query(SQL, [1])
    args = {"sql": SQL, "params": [1]}
    if layer == "Client._call":
        parse = QueryResult.from_wire
        return lambda: client._call("query", args, None, read_only=True, parse=parse)
    await client.query(SQL, [1])  # the connection is open
    assert client._cluster is not None
    [connection] = client._cluster.nodes[0].pool.connections()

    async def direct() -> Any:
        connection.reserve()
        return await connection.send_reserved("query", args, deadline_ms=30_000).wait()

    return direct


async def measure(address: str, layer: str, in_flight: int, requests: int) -> float:
    """Client CPU per request (us) of ``requests`` calls through ``layer``."""
    options: dict[str, Any] = dict(
        max_connections=1, min_connections=1, heartbeat_interval=3600.0, discover_members=False
    )
    async with qdb_client.open_client([address], **options) as client:
        call = await _layer_call(client, layer)
        for _ in range(200):
            await call()
        began = time.process_time()
        await run_callers(call, in_flight, requests)
        return (time.process_time() - began) * 1e6 / requests


async def run_callers(call: Callable[[], Awaitable[Any]], in_flight: int, requests: int) -> None:
    """``requests`` calls of ``call`` from ``in_flight`` tasks, each calling again
    as soon as its call returns."""
    remaining = requests

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    async with trio.open_nursery() as nursery:
        for _ in range(in_flight):
            nursery.start_soon(caller)


def bare_mux(address: str, in_flight: int, requests: int) -> float:
    command = [sys.executable, str(HERE / "peer_client.py"), "--system", "bare-mux"]
    command += ["--address", address, "--in-flight", str(in_flight), "--requests", str(requests)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(json.loads(result.stdout.strip().splitlines()[-1])["cpu_us"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20_000)
    ns = parser.parse_args()
    levels = (1, 64)
    rows = (*LAYERS, "bare-mux")
    best: dict[tuple[str, int], float] = {}
    with stub_node() as address:
        for _ in range(ns.rounds):
            for level in levels:
                for row in rows:
                    if row == "bare-mux":
                        cpu = bare_mux(address, level, ns.requests)
                    else:
                        cpu = trio.run(measure, address, row, level, ns.requests)
                    best[row, level] = min(cpu, best.get((row, level), cpu))
    print(f"\nclient CPU per request, us (point read, stub node, best of {ns.rounds})")
    print(f"  {'layer':<14}" + "".join(f"{f'@{level}':>10}{'step':>8}" for level in levels))
    for index, row in enumerate(rows):
        cells = ""
        for level in levels:
            below = best[rows[index + 1], level] if index + 1 < len(rows) else None
            step = f"{best[row, level] - below:+8.1f}" if below is not None else f"{'':>8}"
            cells += f"{best[row, level]:>10.1f}{step}"
        print(f"  {row:<14}{cells}")
    print("  step: what the layer adds to the row below it")


if __name__ == "__main__":
    main()
