"""One connection to one test node over loopback: the driver against a bare baseline.

Both sides send the same frames (REQUEST "query" ``SELECT 1`` with a
deadline) to the same node, which runs in a separate process so that the
client's CPU time is measured alone:

- driver: ``client.query("SELECT 1")`` through the whole pipeline
  (deadline, node selection, breaker, pool slot, writer/reader tasks,
  result objects), pool limited to one connection;
- baseline: the least code that does the same on a bare trio socket:
  pre-built header, ``cbor2.loads`` of each reply, no tasks; at 64 in
  flight it keeps 64 requests pipelined from one task.

Prints p50/p99 latency, throughput and client CPU per request for 1 and 64
concurrent requests, and the driver/baseline ratios.

    .venv/bin/python bench/bench_connection.py [--requests 4000]
"""

from __future__ import annotations

import argparse
import os
import struct
import time
import zlib
from collections.abc import Awaitable, Callable

import cbor2
import trio

import qdb_client
from qdb_client.protocol import HEADER_SIZE, Hello, encode_message
from qdb_client.testing import TestCluster

SQL = "SELECT 1"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Result:
    def __init__(self, name: str, latencies: list[float], wall: float, cpu: float) -> None:
        self.name = name
        self.latencies = latencies
        self.wall = wall
        self.cpu = cpu

    @property
    def count(self) -> int:
        return len(self.latencies)

    @property
    def throughput(self) -> float:
        return self.count / self.wall

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.count * 1e6


async def measure(name: str, run: Callable[[list[float]], Awaitable[None]]) -> Result:
    latencies: list[float] = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await run(latencies)
    return Result(name, latencies, time.perf_counter() - wall0, time.process_time() - cpu0)


# ------------------------------------------------------------------ baseline

_HEADER = struct.Struct(">2sBBIQ")


def request_frame(request_id: int, body: bytes) -> bytes:
    head = _HEADER.pack(b"QD", 0, 0x10, HEADER_SIZE + len(body), request_id)
    return head + struct.pack(">I", zlib.crc32(body, zlib.crc32(head))) + body


class BareConnection:
    """A socket, a buffer and a frame splitter: nothing else."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def open(cls, port: int) -> BareConnection:
        conn = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await conn.stream.send_all(encode_message(Hello(versions=(1,))))
        await conn.read_frame()  # WELCOME
        return conn

    async def read_frame(self) -> tuple[int, object]:
        while True:
            if len(self.buffer) >= HEADER_SIZE:
                length = int.from_bytes(self.buffer[4:8], "big")
                if len(self.buffer) >= length:
                    request_id = int.from_bytes(self.buffer[8:16], "big")
                    body = bytes(self.buffer[HEADER_SIZE:length])
                    del self.buffer[:length]
                    return request_id, cbor2.loads(body)
            data = await self.stream.receive_some(65536)
            if not data:
                raise RuntimeError("node closed the connection")
            self.buffer += data


def query_body() -> bytes:
    return cbor2.dumps({"method": "query", "args": {"sql": SQL}, "deadline_ms": 5000})


async def baseline_sequential(port: int, n: int, latencies: list[float]) -> None:
    conn = await BareConnection.open(port)
    body = query_body()
    for request_id in range(1, n + 1):
        started = time.perf_counter()
        await conn.stream.send_all(request_frame(request_id, body))
        await conn.read_frame()
        latencies.append(time.perf_counter() - started)
    await conn.stream.aclose()


async def baseline_pipelined(port: int, n: int, depth: int, latencies: list[float]) -> None:
    conn = await BareConnection.open(port)
    body = query_body()
    sent_at: dict[int, float] = {}
    next_id = 1

    async def send(count: int) -> None:
        nonlocal next_id
        frames = []
        for _ in range(count):
            sent_at[next_id] = time.perf_counter()
            frames.append(request_frame(next_id, body))
            next_id += 1
        await conn.stream.send_all(b"".join(frames))

    await send(min(depth, n))
    while len(latencies) < n:
        request_id, _ = await conn.read_frame()
        latencies.append(time.perf_counter() - sent_at.pop(request_id))
        if next_id <= n:
            await send(1)
    await conn.stream.aclose()


# -------------------------------------------------------------------- driver


async def driver(address: str, n: int, concurrency: int, latencies: list[float]) -> None:
    options = dict(max_connections=1, min_connections=1, heartbeat_interval=3600.0)
    async with qdb_client.open_client(address, **options) as client:
        await client.query(SQL)  # connection warm

        async def worker(count: int) -> None:
            for _ in range(count):
                started = time.perf_counter()
                await client.query(SQL)
                latencies.append(time.perf_counter() - started)

        async with trio.open_nursery() as nursery:
            for i in range(concurrency):
                nursery.start_soon(worker, n // concurrency + (i < n % concurrency))


# ---------------------------------------------------------------------- main


def row(result: Result) -> str:
    return (
        f"  {result.name:<26} {result.count:>6} {percentile(result.latencies, 0.5) * 1e6:>9.0f}"
        f" {percentile(result.latencies, 0.99) * 1e6:>9.0f} {result.throughput:>10.0f}"
        f" {result.cpu_us:>10.1f}"
    )


async def main(requests: int) -> None:
    async with TestCluster.start_subprocesses(n=1) as cluster:
        address = cluster.addresses[0]
        port = int(address.rsplit(":", 1)[1])
        await measure("warm-up", lambda lat: baseline_sequential(port, 200, lat))
        results = []
        for concurrency in (1, 64):
            if concurrency == 1:
                base = await measure(
                    "baseline, 1 in flight", lambda lat: baseline_sequential(port, requests, lat)
                )
            else:
                base = await measure(
                    f"baseline, {concurrency} in flight",
                    lambda lat, c=concurrency: baseline_pipelined(port, requests, c, lat),
                )
            drv = await measure(
                f"driver, {concurrency} task(s)",
                lambda lat, c=concurrency: driver(address, requests, c, lat),
            )
            results.append((concurrency, base, drv))

    print(f"\nOne connection, {requests} x query({SQL!r}) per run, node in its own process")
    print(f"(cpu = client process CPU per request; {os.cpu_count()} cores)\n")
    print(f"  {'run':<26} {'reqs':>6} {'p50 us':>9} {'p99 us':>9} {'req/s':>10} {'cpu us':>10}")
    for _, base, drv in results:
        print(row(base))
        print(row(drv))
    print("\n  driver / baseline        p50      p99  1/throughput  cpu/request")
    for concurrency, base, drv in results:
        ratios = (
            percentile(drv.latencies, 0.5) / percentile(base.latencies, 0.5),
            percentile(drv.latencies, 0.99) / percentile(base.latencies, 0.99),
            base.throughput / drv.throughput,
            drv.cpu_us / base.cpu_us,
        )
        print(
            f"  {concurrency:>3} in flight          "
            + "  ".join(f"{r:>6.2f}x" for r in ratios[:2])
            + f"  {ratios[2]:>11.2f}x  {ratios[3]:>10.2f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    trio.run(main, parser.parse_args().requests)
