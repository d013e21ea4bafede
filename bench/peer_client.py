"""One measured run of one system, in its own process: prints one JSON line.

Used by ``bench/bench_peers.py``; runs ``--requests`` calls of a workload
(``read``: a point read; ``write``: a small keyed insert) with ``--in-flight``
concurrent callers against one server, and reports the client process's CPU
time per request (``time.process_time()``, measured inside this process only
around the calls), throughput and latency percentiles.

Systems: ``qdb`` (qdb_client, one connection), ``bare`` (the bare trio loop of
``bare_loop.py``: same frames, nothing else), ``bare-mux`` (its many-caller
floor: a task per caller, one reader handing out replies), ``redis``
(redis-py asyncio, GET/SET), ``asyncpg`` (prepared SELECT/INSERT on one
connection).

For ``qdb`` (used by ``bench/bench_scaling.py``): ``--address`` may list
several nodes (``h:p1,h:p2``); ``--connections`` (per node),
``--max-in-flight`` (per connection), ``--max-waiters`` (pool queue) and
``--no-discover`` (use exactly the listed nodes) and ``--set OPTION=NUMBER``
(any other, e.g. ``attempt_timeout_min=10``) set the client's options;
``--sample`` also reports what was actually in flight (peaks of callers in
the client, requests on the wire and callers queued in the pools, sampled
every few ms, the sampler's own CPU left out of ``cpu_us``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import time
from collections.abc import Awaitable, Callable

import trio
from bare_loop import (
    BareConnection,
    bare_multiplexed,
    bare_pipelined,
    bare_sequential,
    request_body,
)

Call = Callable[[], Awaitable[object]]


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def summary(latencies: list[float], cpu: float, wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    n = len(ordered)
    return {
        "requests": n,
        "cpu_us": cpu / n * 1e6,
        "rps": n / wall,
        "p50_us": ordered[n // 2] * 1e6,
        "p99_us": ordered[min(n - 1, int(n * 0.99))] * 1e6,
    }


async def qdb(
    address: str,
    workload: str,
    n: int,
    in_flight: int,
    *,
    connections: int = 1,
    max_in_flight: int | None = None,
    max_waiters: int | None = None,
    discover: bool = True,
    sample: bool = False,
    extra: dict[str, object] | None = None,
) -> dict[str, float]:
    import qdb_client

    options: dict[str, object] = dict(
        max_connections=connections, min_connections=connections, heartbeat_interval=3600.0
    )
    if max_in_flight is not None:
        options["max_in_flight"] = max_in_flight
    if max_waiters is not None:
        options["max_waiters"] = max_waiters
    if not discover:
        options["discover_members"] = False
    options.update(extra or {})
    async with qdb_client.open_client(address.split(","), **options) as client:
        if workload == "read":

            async def call() -> object:
                return await client.query("SELECT id, name FROM users WHERE id = ?", [1])
        else:

            async def call() -> object:
                return await client.execute("INSERT INTO users (name) VALUES (?)", ["ada"])

        for _ in range(200):
            await call()
        latencies: list[float] = []
        remaining = n
        peaks = {"in_progress": 0, "on_wire": 0, "queued": 0, "connections": 0}
        sampler_cpu = 0.0

        async def caller() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                await call()
                latencies.append(time.perf_counter() - started)

        async def sampler() -> None:
            nonlocal sampler_cpu
            while True:
                await trio.sleep(0.005)
                began = time.process_time()
                stats = client.statistics()
                nodes = stats["nodes"]
                for name, value in (
                    ("in_progress", stats["in_progress"]),
                    ("on_wire", sum(node["in_flight"] for node in nodes)),
                    ("queued", sum(node["waiting"] for node in nodes)),
                    ("connections", sum(node["connections"]["open"] for node in nodes)),
                ):
                    peaks[name] = max(peaks[name], value)
                sampler_cpu += time.process_time() - began

        cpu, wall = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as outer:
            if sample:
                outer.start_soon(sampler)
            async with trio.open_nursery() as nursery:
                for _ in range(in_flight):
                    nursery.start_soon(caller)
            outer.cancel_scope.cancel()
        result = summary(
            latencies, time.process_time() - cpu - sampler_cpu, time.perf_counter() - wall
        )
        if sample:
            stats = client.statistics()
            sent = [node["requests_sent"] for node in stats["nodes"]]
            result.update({f"peak_{name}": value for name, value in peaks.items()})
            result["nodes"] = len(sent)
            result["sent_min"], result["sent_max"] = min(sent), max(sent)
            result["failures"] = stats["failures"]
            result["retries"] = stats["retries"]
            result["sampler_cpu_us"] = sampler_cpu / n * 1e6
        return result


async def bare(
    address: str, workload: str, n: int, in_flight: int, *, multiplexed: bool = False
) -> dict[str, float]:
    conn = await BareConnection.open(*split(address))
    if workload == "read":
        body = request_body(
            "query", {"sql": "SELECT id, name FROM users WHERE id = ?", "params": [1]}
        )
    else:
        body = request_body(
            "execute",
            {"sql": "INSERT INTO users (name) VALUES (?)", "params": ["ada"]},
            idem_key="qdb-0123456789abcdef0123456789abcdef",
        )
    await bare_sequential(conn, body, 200, [])
    latencies: list[float] = []
    cpu, wall = time.process_time(), time.perf_counter()
    if multiplexed:
        await bare_multiplexed(conn, body, n, in_flight, latencies)
    elif in_flight == 1:
        await bare_sequential(conn, body, n, latencies)
    else:
        await bare_pipelined(conn, body, n, in_flight, latencies)
    result = summary(latencies, time.process_time() - cpu, time.perf_counter() - wall)
    await conn.stream.aclose()
    return result


async def redis_client(address: str, workload: str, n: int, in_flight: int) -> dict[str, float]:
    import redis.asyncio as redis

    host, port = split(address)
    client = redis.Redis(host=host, port=port, max_connections=in_flight)
    await client.set("users:1", "ada")
    if workload == "read":

        async def call() -> object:
            return await client.get("users:1")
    else:

        async def call() -> object:
            return await client.set("users:2", "ada")

    for _ in range(200):
        await call()
    latencies: list[float] = []
    remaining = n

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    result = summary(latencies, time.process_time() - cpu, time.perf_counter() - wall)
    await client.aclose()
    return result


async def asyncpg_client(dsn: str, workload: str, n: int, in_flight: int) -> dict[str, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TABLE IF NOT EXISTS users (id SERIAL PRIMARY KEY, name TEXT)")
    first = await conn.fetchval("INSERT INTO users (name) VALUES ('ada') RETURNING id")
    if workload == "read":
        statement = await conn.prepare("SELECT id, name FROM users WHERE id = $1")

        async def call() -> object:
            return await statement.fetchrow(first)
    else:
        statement = await conn.prepare("INSERT INTO users (name) VALUES ($1)")

        async def call() -> object:
            return await statement.fetch("ada")

    for _ in range(200):
        await call()
    latencies: list[float] = []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(n):  # one connection serves one query at a time
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    result = summary(latencies, time.process_time() - cpu, time.perf_counter() - wall)
    await conn.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--system", choices=["qdb", "bare", "bare-mux", "redis", "asyncpg"], required=True
    )
    parser.add_argument("--workload", choices=["read", "write"], default="read")
    parser.add_argument("--in-flight", type=int, default=1)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--address", required=True, help="host:port, or a DSN for asyncpg")
    qdb_only = parser.add_argument_group("qdb options")
    qdb_only.add_argument("--connections", type=int, default=1, help="per node")
    qdb_only.add_argument("--max-in-flight", type=int, help="per connection")
    qdb_only.add_argument("--max-waiters", type=int, help="per node's pool queue")
    qdb_only.add_argument("--no-discover", action="store_true", help="only the listed nodes")
    qdb_only.add_argument("--sample", action="store_true", help="report peak in-flight counts")
    qdb_only.add_argument(
        "--set", action="append", default=[], metavar="OPTION=NUMBER", help="any client option"
    )
    args = parser.parse_args()
    work = (args.address, args.workload, args.requests, args.in_flight)
    if args.system == "qdb":
        options = dict(
            connections=args.connections,
            max_in_flight=args.max_in_flight,
            max_waiters=args.max_waiters,
            discover=not args.no_discover,
            sample=args.sample,
            extra={k: number(v) for k, _, v in (o.partition("=") for o in args.set)},
        )
        result = trio.run(functools.partial(qdb, *work, **options))
    elif args.system == "bare":
        result = trio.run(bare, *work)
    elif args.system == "bare-mux":
        result = trio.run(functools.partial(bare, *work, multiplexed=True))
    elif args.system == "redis":
        result = asyncio.run(redis_client(*work))
    else:
        result = asyncio.run(asyncpg_client(*work))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
