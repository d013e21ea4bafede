"""The soak run from start to verdict: ``python -m tests.soak`` (``scripts/soak.sh``).

::

    python -m tests.soak [--duration 60] [--seed N] [--clients 3] [--tasks 16]
                         [--timeout 2.0] [--out DIR] [--max-unavailable 0.1]

1. Three test nodes as subprocesses on free ports over one SQLite file
   (``TestCluster.start_subprocesses``, state in ``DIR/state``), each behind
   its own fault proxy process; the driver only ever sees the proxies.
2. The schema, then ``--clients`` workload processes
   (:mod:`tests.soak.workload`), started together once all are connected.
3. The seeded fault schedule (:mod:`tests.soak.faults`), printed first and
   written to ``DIR/schedule.json``, carried out by :mod:`tests.soak.nemesis`
   (``DIR/faults.jsonl``), then the heal; the workload goes on through the
   recovery window and stops at ``--duration``.
4. The final state through a fresh client, the checks
   (:mod:`tests.soak.checker`), the table and summary line, ``verdict.json``,
   ``report.txt`` and ``timeline.html``.

Exit status 0 when every check passed, 1 on a violation, 2 for bad
arguments, 3 when the run itself broke (a process that would not start),
130 on Ctrl-C. Every process started is stopped on every path.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import trio

import qdb_client
from qdb_client.testing import TestCluster

from .checker import check, read_final_state, summary_facts
from .faults import Schedule, make_schedule
from .history import HistoryWriter, load_history
from .nemesis import Nemesis
from .processes import ClientProcess, PidFile, ProxyProcess
from .report import render_table, summary_line
from .timeline import write_timeline
from .workload import WATCHDOG_GRACE

__all__ = ["build_parser", "main", "run"]

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS soak_items"
    " (id INTEGER PRIMARY KEY, value TEXT NOT NULL UNIQUE, client INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS soak_batches"
    " (id INTEGER PRIMARY KEY, value TEXT NOT NULL, part TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS soak_counters (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
]
#: Seconds every client gets to connect and report ready.
CLIENT_START_TIMEOUT = 60.0


def say(text: str) -> None:
    """Print one progress line at once."""
    print(text, flush=True)


async def create_schema(hosts: list[str], clients: int) -> None:
    """Create the soak tables and one counter row per client."""
    async with qdb_client.open_client(hosts, discover_members=False) as client:
        for statement in SCHEMA:
            await client.execute(statement, timeout=10.0)
        for index in range(clients):
            await client.execute(
                "INSERT OR IGNORE INTO soak_counters (id, n) VALUES (?, 0)", [index], timeout=10.0
            )


async def _sleep_until(deadline: float) -> None:
    await trio.sleep(max(0.0, deadline - time.monotonic()))


async def _drive(
    ns: argparse.Namespace,
    out: Path,
    schedule: Schedule,
    cluster: TestCluster,
    pids: PidFile,
    faults: HistoryWriter,
) -> dict[str, object]:
    """Everything that needs the cluster: proxies, clients, faults, heal, final state."""
    proxies = [
        ProxyProcess(i, address, out / "state" / f"proxy-{i}.log", ns.seed * 10 + i)
        for i, address in enumerate(cluster.addresses)
    ]
    clients: list[ClientProcess] = []
    nemesis: Nemesis | None = None
    try:
        for proxy in proxies:
            await proxy.start(pids)
        hosts = [p.address for p in proxies]
        say(f"nodes {', '.join(cluster.addresses)} behind proxies {', '.join(hosts)}")
        await create_schema(hosts, ns.clients)
        args = ["--hosts", ",".join(hosts), "--tasks", str(ns.tasks), "--timeout", str(ns.timeout)]
        args += ["--seed", str(ns.seed), "--think", str(ns.think)]
        args += ["--error-pause", str(ns.error_pause)]
        if ns.driver_defaults:
            args.append("--driver-defaults")
        if ns.hedge_delay is not None:
            args += ["--hedge-delay", str(ns.hedge_delay)]
        for index in range(ns.clients):
            client = ClientProcess(
                index, args, out / f"history-{index}.jsonl", out / f"client-{index}.log"
            )
            clients.append(client)
            await client.start(pids)
        for client in clients:
            await client.wait_ready(CLIENT_START_TIMEOUT)
        nemesis = Nemesis(cluster, proxies, records=faults, pids=pids, say=say)
        t0 = time.monotonic()
        stop_at = t0 + ns.duration
        for client in clients:
            await client.go(stop_at)
        say(f"t=   0.0s  workload started: {ns.clients} clients x {ns.tasks} tasks")
        await nemesis.run(schedule, t0)
        await _sleep_until(t0 + schedule.heal_at)
        heal = await nemesis.heal()
        say(f"t={heal[1] - t0:6.1f}s  recovery window until t={ns.duration:.0f}s")
        finish = stop_at - time.monotonic() + ns.timeout + WATCHDOG_GRACE + 20.0
        async with trio.open_nursery() as nursery:
            for client in clients:
                nursery.start_soon(client.finish, finish)
        say(f"t={time.monotonic() - t0:6.1f}s  clients done; reading the final state")
        state = await read_final_state(hosts)
        return {
            "t0": t0,
            "state": state,
            "schedule": schedule,
            "problems": [f"client {c.index} {c.problem}" for c in clients if c.problem],
            "node_stats": nemesis.node_stats,
        }
    finally:
        with trio.CancelScope(shield=True):
            for client in clients:
                await client.stop()
            if nemesis is not None:
                await nemesis.aclose()
            for server in cluster.nodes:  # a stopped node can't shut down
                if server.pid is not None:
                    try:
                        os.kill(server.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
            for proxy in proxies:
                await proxy.stop()


def _not_empty(path: Path) -> bool:
    return path.exists() and any(path.iterdir())


async def run(ns: argparse.Namespace) -> int:
    """One whole soak run; returns the exit status (130 after SIGINT or SIGTERM, once
    every process is stopped)."""
    interrupted = False
    status = 3
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            nonlocal interrupted
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    say(f"soak: got signal {signum}; stopping every process")
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)
        status = await _soak(ns)
        nursery.cancel_scope.cancel()
    return 130 if interrupted else status


async def _soak(ns: argparse.Namespace) -> int:
    out = Path(ns.out)
    if _not_empty(out):
        say(f"soak: {out} is not empty; give a new or empty --out directory")
        return 2
    (out / "state").mkdir(parents=True, exist_ok=True)
    schedule = make_schedule(ns.seed, ns.duration)
    say(
        f"soak: seed {ns.seed}, {ns.duration:.0f} s, {ns.clients} clients x {ns.tasks} tasks,"
        f" deadline {ns.timeout} s, output {out}"
    )
    say(schedule.describe())
    (out / "schedule.json").write_text(json.dumps(schedule.to_json(), indent=1))
    pids = PidFile(out / "pids")
    pids.add(os.getpid(), "runner")
    faults = HistoryWriter(out / "faults.jsonl")
    try:
        async with TestCluster.start_subprocesses(n=3, directory=out / "state") as cluster:
            for server in cluster.nodes:
                pids.add(server.pid, f"node-{server.index}")
            result = await _drive(ns, out, schedule, cluster, pids, faults)
    except (RuntimeError, OSError, trio.TooSlowError, qdb_client.QdbError) as exc:
        say(f"SOAK BROKEN: {type(exc).__name__}: {exc}")
        return 3
    finally:
        faults.close()
    history = load_history(out)
    verdict = check(
        history,
        result["state"],  # type: ignore[arg-type]
        clients=ns.clients,
        max_unavailable=ns.max_unavailable,
        client_problems=result["problems"],  # type: ignore[arg-type]
    )
    table = render_table(verdict, history, schedule)
    line = summary_line(verdict, seed=ns.seed, duration=ns.duration)
    say("\n".join(table))
    facts = summary_facts(verdict)
    facts.update(seed=ns.seed, duration=ns.duration, clients=ns.clients, tasks=ns.tasks)
    facts["node_stats"] = result["node_stats"]
    (out / "verdict.json").write_text(json.dumps(facts, indent=1, default=str))
    (out / "report.txt").write_text("\n".join([*table, line]) + "\n")
    write_timeline(
        out / "timeline.html", history, result["t0"], ns.duration, summary=line, table=table
    )  # type: ignore[arg-type]
    say(f"timeline: {out / 'timeline.html'}")
    say(line)
    return 0 if verdict.passed else 1


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m tests.soak``."""
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of workload (>= 30)")
    p.add_argument("--seed", type=int, default=None, help="fault schedule seed (default random)")
    p.add_argument("--clients", type=int, default=3, help="client processes")
    p.add_argument("--tasks", type=int, default=16, help="trio tasks per client")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline of every call (s)")
    p.add_argument("--think", type=float, default=0.005, help="max pause between calls (s)")
    p.add_argument(
        "--error-pause", type=float, default=0.05, help="max pause after a failed call (s)"
    )
    p.add_argument("--out", default=None, help="output directory (new or empty)")
    p.add_argument(
        "--max-unavailable",
        type=float,
        default=0.1,
        help="share of the run's seconds that may see calls fail while a node is healthy"
        " (default 0.1, at least 5 s)",
    )
    p.add_argument("--driver-defaults", action="store_true", help="no tuned driver options")
    p.add_argument(
        "--hedge-delay", type=float, default=None, help="clients hedge reads after this (s)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and always clean up."""
    ns = build_parser().parse_args(argv)
    if ns.duration < 30 or ns.clients < 1 or ns.tasks < 1 or ns.timeout <= 0:
        print("soak: need --duration >= 30, --clients >= 1, --tasks >= 1, --timeout > 0")
        return 2
    if ns.seed is None:
        ns.seed = random.SystemRandom().randrange(1, 10**6)
    if ns.out is None:
        ns.out = f"/tmp/qdb-soak-{ns.seed}-{int(time.time())}"
    try:
        return trio.run(run, ns)
    except KeyboardInterrupt:
        print("soak: interrupted; every process was stopped", file=sys.stderr)
        return 130
