"""Part 5b of examples/workload.py: the stall of part 5 again, read through two
fresh clients side by side, one without hedging and one with
``hedge_delay=0.02``.

Without hedging, a read that starts on the stalled node waits its attempt
timeout (0.25 s at least) before it goes elsewhere, until that node's breaker
opens. With hedging, it waits ``hedge_delay``: a second copy goes to another
node, the first answer wins, and the stalled copy is cancelled.
"""

from __future__ import annotations

import time
from typing import Any

import trio

import qdb_client

#: Seconds a read waits before its hedge goes out.
HEDGE_DELAY = 0.02
#: Seconds both clients read while the node stalls.
READ_FOR = 2.0
READERS = 8


async def hedged_reads(
    hosts: list[str], victim: str, access: Any, report: Any, options: dict[str, Any]
) -> None:
    """Stall ``victim`` and compare reads with and without hedging; ``report.check``
    what hedging must give (``access.control(address)`` opens a node's fault
    controls; ``options`` are the clients' other options)."""
    print(
        f"\n5b. The same stall, read for {READ_FOR:g} s by two fresh clients side by side:"
        f" without hedging, and with hedge_delay={HEDGE_DELAY * 1e3:.0f} ms"
    )
    results: dict[str, tuple[list[float], list[BaseException], dict[str, Any]]] = {}
    async with (
        qdb_client.open_client(hosts, **options) as plain,
        qdb_client.open_client(hosts, **options, hedge_delay=HEDGE_DELAY) as hedged,
    ):
        for client in (plain, hedged):  # connections open before the stall
            for _ in range(2 * len(hosts)):
                await client.query("SELECT 1", timeout=5.0)
        async with access.control(victim) as control:
            await control.add_latency("query", 30.0)
            try:
                async with trio.open_nursery() as nursery:
                    for name, client in (("without hedging", plain), ("hedged", hedged)):
                        latencies: list[float] = []
                        failures: list[BaseException] = []
                        results[name] = (latencies, failures, {})
                        for _ in range(READERS):
                            nursery.start_soon(_reader, client, latencies, failures)
                    await trio.sleep(READ_FOR)
                    nursery.cancel_scope.cancel()
            finally:
                await control.add_latency("query", 0)
        results["without hedging"][2].update(plain.statistics())
        results["hedged"][2].update(hedged.statistics())
    for name, (latencies, failures, stats) in results.items():
        p50, p99, worst = (_percentile(latencies, q) * 1e3 for q in (0.5, 0.99, 1.0))
        print(
            f"  {name:<16} {len(latencies):>5} reads, {len(failures)} failed;"
            f" p50 {p50:6.2f}  p99 {p99:7.2f}  max {worst:7.2f} ms;"
            f" attempt timeouts {stats['attempt_timeouts']}, hedges {stats['hedges']}"
            f" ({stats['hedge_wins']} answered first)"
        )
    latencies, failures, stats = results["hedged"]
    p99 = _percentile(latencies, 0.99) * 1e3
    report.check(
        not failures and stats["hedge_wins"] > 0,
        f"hedged: {len(latencies)} reads, none failed; {stats['hedge_wins']} answered by a hedge",
    )
    report.check(p99 < 250, f"hedged: p99 {p99:.0f} ms, below the 250 ms attempt timeout")


async def _reader(
    client: qdb_client.Client, latencies: list[float], failures: list[BaseException]
) -> None:
    while True:
        started = time.perf_counter()
        try:
            await client.query("SELECT 1", timeout=1.0)
            latencies.append(time.perf_counter() - started)
        except qdb_client.QdbError as exc:
            failures.append(exc)


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0
