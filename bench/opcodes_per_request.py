"""Python bytecodes the client executes per request: a count the VM's noise can't move.

CPU time on this shared 2-core VM moves by 10-30% from run to run (see
docs/benchmarks.md), so a change worth 3% can't be seen in it. The number of
Python bytecode instructions executed per request repeats to within a few
bytecodes (how replies batch into reads varies a little), so it shows what
a change to the request path did to the driver's own Python work. It is
not time: C work (cbor2, crc32, system calls, trio's C-level parts) is not
in it, and instructions differ in cost. Use it beside
``bench_before_after.py``, not instead of it.

Each layer of ``bench_layers.py`` (``client.query``, ``Client._call``,
``connection``) and the bare loops' floors run point reads against the stub
node at each in-flight level, under ``sys.settrace`` with opcode events
(counted in every Python frame started while tracing: the callers, the
client's reader and writer tasks, and the trio functions they call). The
table gives instructions per request; ``--top N`` lists the functions with
the most, for one layer and level (``--profile LAYER@LEVEL``).

    .venv/bin/python bench/opcodes_per_request.py [--requests 2000] [--levels 1,64]
    .venv/bin/python bench/opcodes_per_request.py --profile Client._call@64 --top 30
    .venv/bin/python bench/opcodes_per_request.py --hedge-delay 1 --levels 1,64
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import trio
from bare_loop import BareConnection, bare_multiplexed, bare_pipelined, request_body
from bench_layers import LAYERS, SQL, _layer_call, run_callers
from bench_peers import stub_node
from peer_client import split

import qdb_client

FLOORS = ("bare", "bare-mux")


class OpcodeCounter:
    """Counts the opcodes executed in each code object while ``tracing``."""

    def __init__(self) -> None:
        self.counts: collections.Counter[Any] = collections.Counter()

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.counts[frame.f_code] += 1
        return self._trace

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        sys.settrace(self._trace)
        try:
            await work()
        finally:
            sys.settrace(None)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


async def count_layer(
    address: str,
    layer: str,
    in_flight: int,
    requests: int,
    counter: OpcodeCounter,
    **more: Any,
) -> None:
    """``more``: further client options; ``hosts`` replaces ``[address]``."""
    options: dict[str, Any] = dict(
        max_connections=1, min_connections=1, heartbeat_interval=3600.0, discover_members=False
    )
    hosts = more.pop("hosts", [address])
    options.update(more)
    async with qdb_client.open_client(hosts, **options) as client:
        call = await _layer_call(client, layer)
        for _ in range(200):  # warm: the first requests fill caches
            await call()
        await counter.run(lambda: run_callers(call, in_flight, requests))


async def count_floor(
    address: str, floor: str, in_flight: int, requests: int, counter: OpcodeCounter
) -> None:
    conn = await BareConnection.open(*split(address))
    body = request_body("query", {"sql": SQL, "params": [1]})
    await bare_pipelined(conn, body, 200, 1, [])
    if floor == "bare-mux":
        await counter.run(lambda: bare_multiplexed(conn, body, requests, in_flight, []))
    else:
        await counter.run(lambda: bare_pipelined(conn, body, requests, in_flight, []))
    await conn.stream.aclose()


def count_hedging(delay: float, levels: list[int], requests: int) -> None:
    """client.query over two stub nodes: without hedging, and with ``hedge_delay``
    (above the stub's reply time, it measures what hedging costs a read that
    needs no hedge)."""
    with stub_node() as first, stub_node() as second:
        hosts = [first, second]
        print(f"\nPython bytecodes per request (point read, two stub nodes, {requests} requests)")
        print(f"  {'client.query':<22}" + "".join(f"{f'@{level}':>10}" for level in levels))
        for label, more in (("no hedging", {}), (f"hedge_delay={delay:g}", {"hedge_delay": delay})):
            cells = ""
            for level in levels:
                counter = OpcodeCounter()
                trio.run(
                    functools.partial(
                        count_layer, first, "client.query", level, requests, counter,
                        hosts=hosts, **more,
                    )
                )  # fmt: skip
                cells += f"{counter.total / requests:>10.0f}"
            print(f"  {label:<22}{cells}")


def _where(code: Any) -> str:
    path = code.co_filename.split("/site-packages/")[-1]
    for marker in ("/qdb_client/", "/bench/"):
        if marker in path:
            path = path[path.index(marker) + 1 :]
    return f"{path}:{code.co_firstlineno}({code.co_name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--levels", default="1,64")
    parser.add_argument("--profile", metavar="LAYER@LEVEL", help="e.g. Client._call@64")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--hedge-delay",
        type=float,
        metavar="SECONDS",
        help="count client.query against two stub nodes, with and without hedge_delay",
    )
    ns = parser.parse_args()
    rows = (*LAYERS, *FLOORS)
    if ns.hedge_delay is not None:
        count_hedging(ns.hedge_delay, [int(x) for x in ns.levels.split(",")], ns.requests)
        return
    with stub_node() as address:
        if ns.profile:
            layer, _, level = ns.profile.rpartition("@")
            if layer not in rows:
                raise SystemExit(f"--profile: the layer is one of {', '.join(rows)}")
            counter = OpcodeCounter()
            run = count_floor if layer in FLOORS else count_layer
            trio.run(run, address, layer, int(level), ns.requests, counter)
            print(f"{layer} at {level} in flight: {counter.total / ns.requests:.0f} per request")
            for code, n in counter.counts.most_common(ns.top):
                print(f"  {n / ns.requests:8.1f}  {_where(code)}")
            return
        levels = [int(x) for x in ns.levels.split(",")]
        print(f"\nPython bytecodes per request (point read, stub node, {ns.requests} requests)")
        print(f"  {'layer':<14}" + "".join(f"{f'@{level}':>10}" for level in levels))
        for row in rows:
            cells = ""
            for level in levels:
                counter = OpcodeCounter()
                run = count_floor if row in FLOORS else count_layer
                trio.run(run, address, row, level, ns.requests, counter)
                cells += f"{counter.total / ns.requests:>10.0f}"
            print(f"  {row:<14}{cells}")


if __name__ == "__main__":
    main()
