"""One soak client process: many trio tasks calling the driver, every call recorded.

::

    python -m tests.soak.workload --client 0 --hosts 127.0.0.1:41001,... \\
        --history out/history-0.jsonl [--tasks 16] [--timeout 2.0] [--seed 1]

The process opens one client (``discover_members=False``: the hosts are the
fault proxies, and nodes announce their real addresses), prints
``SOAK-CLIENT READY client=N pid=P`` and waits for one line ``GO <stop_at>``
on stdin (``stop_at`` in ``time.monotonic()`` seconds, one clock for every
process of the machine). Then each task loops until ``stop_at``, choosing
one operation at a time:

- ``insert``: ``INSERT INTO soak_items (value, client)``, ``value`` unique
  (``c<client>-t<task>-<seq>``; the table has ``UNIQUE (value)``);
- ``read``: counts the rows of a value this task inserted and had
  acknowledged (it must be 1), or all rows while there is none yet;
- ``increment``: ``UPDATE soak_counters SET n = n + 1 WHERE id = <client>``;
- ``batch``: two rows ``(value, 'a')``, ``(value, 'b')`` into
  ``soak_batches`` atomically (that table has no unique key, so a write
  applied twice shows as a duplicate).

After a call a task pauses up to ``--think`` seconds (``--error-pause``
after a failed one, so that a cluster failing fast is not hammered by a busy
loop). Every :data:`SAMPLE_EVERY` seconds the driver's view of each node
(state, breaker, requests in flight) is recorded too. Every call has a
deadline (``timeout=``) and goes to the history file (see
:mod:`tests.soak.history`). A watchdog cancels a call that outlives its
deadline by far (recorded as outcome ``Hang``) so that a hang can't stop the
run. After the client's block exits, the process records its file
descriptors and living trio tasks against the baseline taken before
``open_client``, prints ``SOAK-CLIENT DONE``, and exits 0.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio

import qdb_client

from .history import HistoryWriter

__all__ = ["OPERATIONS", "SOAK_OPTIONS", "Workload", "main"]

#: Operation -> weight in the mix.
OPERATIONS = {"insert": 40, "read": 30, "increment": 15, "batch": 15}
#: Driver options of the soak: detection and recovery tuned to play out in
#: seconds (as in examples/workload.py); ``--driver-defaults`` drops them.
SOAK_OPTIONS: dict[str, Any] = dict(
    heartbeat_interval=1.0,
    ping_timeout=0.5,
    reconnect_initial=0.2,
    reconnect_max=1.0,
    breaker_open_timeout=2.0,
    slow_start=1.0,
)
#: A call still running this long past its deadline is cancelled and recorded as a hang.
WATCHDOG_GRACE = 5.0
#: Seconds between two records of the driver's view of the nodes.
SAMPLE_EVERY = 0.25
#: How many of a task's acknowledged inserts its reads choose from.
RECENT = 64


def count_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def _error_facts(exc: BaseException) -> dict[str, Any]:
    details = getattr(exc, "details", None)
    last = getattr(exc, "last_error", None)
    injected = isinstance(details, dict) and bool(details.get("injected"))
    if not injected and last is not None:
        last_details = getattr(last, "details", None)
        injected = isinstance(last_details, dict) and bool(last_details.get("injected"))
    return {
        "sent": bool(getattr(exc, "request_sent", False)),
        "maybe_applied": bool(getattr(exc, "maybe_applied", False)),
        "retryable": bool(getattr(exc, "retryable", False)),
        "key": getattr(exc, "idempotency_key", None),
        "attempts": len(getattr(exc, "attempts", ()) or ()),
        "attempt_log": [str(a)[:400] for a in (getattr(exc, "attempts", ()) or ())[:8]],
        "injected": injected,
    }


class Workload:
    """The tasks of one client process and the recording of their calls."""

    def __init__(
        self,
        client: qdb_client.Client,
        history: HistoryWriter,
        *,
        client_id: int,
        tasks: int,
        timeout: float,
        seed: int,
        think: float,
        error_pause: float,
    ) -> None:
        self.client = client
        self.history = history
        self.client_id = client_id
        self.tasks = tasks
        self.timeout = timeout
        self.seed = seed
        self.think = think
        self.error_pause = error_pause
        self.calls = 0

    async def run(self, stop_at: float) -> None:
        """Run every task until ``stop_at`` (monotonic); calls in flight then finish."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample, stop_at)
            for task in range(self.tasks):
                nursery.start_soon(self._task, task, stop_at)

    async def _sample(self, stop_at: float) -> None:
        """Record the driver's view of every node every :data:`SAMPLE_EVERY` seconds."""
        while time.monotonic() < stop_at:
            nodes = [
                {
                    "address": n.get("address"),
                    "state": n.get("state"),
                    "breaker": (n.get("breaker") or {}).get("current_state"),
                    "opened_by": (n.get("breaker") or {}).get("opened_by"),
                    "in_flight": n.get("in_flight"),
                    "latency": n.get("latency_ewma"),
                }
                for n in self.client.statistics().get("nodes", [])
            ]
            self.history.write(
                {"type": "view", "client": self.client_id, "t": time.monotonic(), "nodes": nodes}
            )
            await trio.sleep(SAMPLE_EVERY)

    async def _task(self, task: int, stop_at: float) -> None:
        rng = random.Random(f"{self.seed}/{self.client_id}/{task}")
        ops, weights = list(OPERATIONS), list(OPERATIONS.values())
        acked: list[str] = []
        seq = 0
        while time.monotonic() < stop_at:
            seq += 1
            op = rng.choices(ops, weights)[0]
            value = f"c{self.client_id}-t{task}-{seq}"
            if op == "insert":
                ok = await self._insert(task, value)
                if ok:
                    acked.append(value)
                    del acked[:-RECENT]
            elif op == "read":
                ok = await self._read(task, rng.choice(acked) if acked else None)
            elif op == "increment":
                ok = await self._increment(task)
            else:
                ok = await self._batch(task, value)
            pause = self.think if ok else max(self.think, self.error_pause)
            if pause > 0:
                await trio.sleep(rng.uniform(0, pause))
            else:
                await trio.lowlevel.checkpoint()

    async def _insert(self, task: int, value: str) -> bool:
        async def call() -> dict[str, Any]:
            await self.client.execute(
                "INSERT INTO soak_items (value, client) VALUES (?, ?)",
                [value, self.client_id],
                timeout=self.timeout,
            )
            return {}

        return await self._record(task, "insert", value, call)

    async def _read(self, task: int, value: str | None) -> bool:
        async def call() -> dict[str, Any]:
            if value is None:
                result = await self.client.query(
                    "SELECT count(*) FROM soak_items", timeout=self.timeout
                )
                return {"found": result.scalar()}
            result = await self.client.query(
                "SELECT count(*) FROM soak_items WHERE value = ?", [value], timeout=self.timeout
            )
            return {"found": result.scalar(), "expect": 1}

        return await self._record(task, "read", value, call)

    async def _increment(self, task: int) -> bool:
        async def call() -> dict[str, Any]:
            result = await self.client.execute(
                "UPDATE soak_counters SET n = n + 1 WHERE id = ?",
                [self.client_id],
                timeout=self.timeout,
            )
            return {"found": result.rows_affected, "expect": 1}

        return await self._record(task, "increment", self.client_id, call)

    async def _batch(self, task: int, value: str) -> bool:
        async def call() -> dict[str, Any]:
            sql = "INSERT INTO soak_batches (value, part) VALUES (?, ?)"
            results = await self.client.batch(
                [(sql, [value, "a"]), (sql, [value, "b"])], timeout=self.timeout
            )
            return {"found": sum(r.rows_affected for r in results), "expect": 2}

        return await self._record(task, "batch", value, call)

    async def _record(
        self, task: int, op: str, value: Any, call: Callable[[], Awaitable[dict[str, Any]]]
    ) -> bool:
        """Run one call under the watchdog; append its record; return whether it succeeded."""
        record: dict[str, Any] = {
            "type": "call",
            "client": self.client_id,
            "task": task,
            "op": op,
            "value": value,
            "deadline": self.timeout,
            "start": time.monotonic(),
        }
        try:
            with trio.move_on_after(self.timeout + WATCHDOG_GRACE) as watchdog:
                record.update(await call())
                record["outcome"] = "ok"
            if watchdog.cancelled_caught:
                record.update(outcome="Hang", sent=True, maybe_applied=True)
                record["message"] = f"still running {self.timeout + WATCHDOG_GRACE} s after start"
        except qdb_client.QdbError as exc:
            record.update(outcome=type(exc).__name__, **_error_facts(exc))
            record["message"] = str(exc)[:2000]
        except Exception as exc:  # anything else escaping a call is a finding
            record.update(outcome=type(exc).__name__, untyped=True, **_error_facts(exc))
            record["message"] = "".join(traceback.format_exception(exc))[-4000:]
        record["end"] = time.monotonic()
        self.calls += 1
        self.history.write(record)
        return record["outcome"] == "ok"


_TOTALS = (
    "calls",
    "attempts",
    "retries",
    "requeues",
    "attempt_timeouts",
    "failures",
    "outcome_unknown",
    "retry_budget_exhausted",
    "circuit_rejections",
    "bulkhead_rejections",
)


def driver_totals(client: qdb_client.Client) -> dict[str, Any]:
    """The driver's statistics totals and a few facts per node."""
    stats = client.statistics()
    totals = {name: stats.get(name) for name in _TOTALS}
    totals["nodes"] = [
        {
            "address": n.get("address"),
            "state": n.get("state"),
            "requests_sent": n.get("requests_sent"),
            "failures": n.get("failures"),
            "breaker": (n.get("breaker") or {}).get("current_state"),
        }
        for n in stats.get("nodes", [])
    ]
    return totals


async def _wait_for_go() -> float | None:
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    parts = line.split()
    if len(parts) != 2 or parts[0] != "GO":
        return None
    return float(parts[1])


async def run_client(ns: argparse.Namespace) -> int:
    """The whole life of one client process; returns the exit status."""
    history = HistoryWriter(ns.history)
    options: dict[str, Any] = {} if ns.driver_defaults else dict(SOAK_OPTIONS)
    options.update(discover_members=False, random_seed=ns.seed * 1000 + ns.client)
    if ns.hedge_delay is not None:
        options["hedge_delay"] = ns.hedge_delay
    history.write(
        {
            "type": "start",
            "client": ns.client,
            "pid": os.getpid(),
            "tasks": ns.tasks,
            "timeout": ns.timeout,
            "options": options,
        }
    )
    tasks_before = trio.lowlevel.current_statistics().tasks_living
    fd_before = count_fds()
    workload = None
    async with qdb_client.open_client(ns.hosts.split(","), **options) as client:
        print(f"SOAK-CLIENT READY client={ns.client} pid={os.getpid()}", flush=True)
        stop_at = await _wait_for_go()
        if stop_at is not None:
            workload = Workload(
                client,
                history,
                client_id=ns.client,
                tasks=ns.tasks,
                timeout=ns.timeout,
                seed=ns.seed,
                think=ns.think,
                error_pause=ns.error_pause,
            )
            await workload.run(stop_at)
        totals = driver_totals(client)
    fd_after = count_fds()
    tasks_after = trio.lowlevel.current_statistics().tasks_living
    fd_settled = fd_after
    for _ in range(20):  # a descriptor the kernel is still releasing gets a second
        if fd_settled <= fd_before:
            break
        await trio.sleep(0.05)
        fd_settled = count_fds()
    calls = workload.calls if workload is not None else 0
    history.write(
        {
            "type": "summary",
            "client": ns.client,
            "fd_before": fd_before,
            "fd_after": fd_after,
            "fd_settled": fd_settled,
            "tasks_before": tasks_before,
            "tasks_after": tasks_after,
            "calls": calls,
            "stats": totals,
        }
    )
    history.close()
    print(f"SOAK-CLIENT DONE client={ns.client} calls={calls}", flush=True)
    return 0 if stop_at is not None else 3


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m tests.soak.workload``."""
    p = argparse.ArgumentParser(prog="python -m tests.soak.workload", description=__doc__)
    p.add_argument("--client", type=int, required=True, help="client id (0, 1, ...)")
    p.add_argument("--hosts", required=True, help="comma-separated proxy addresses")
    p.add_argument("--history", required=True, help="history file (JSON lines, appended)")
    p.add_argument("--tasks", type=int, default=16, help="concurrent trio tasks")
    p.add_argument("--timeout", type=float, default=2.0, help="deadline of every call (s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the operation mix")
    p.add_argument("--think", type=float, default=0.005, help="max pause between calls (s)")
    p.add_argument(
        "--error-pause", type=float, default=0.05, help="max pause after a failed call (s)"
    )
    p.add_argument("--driver-defaults", action="store_true", help="no tuned driver options")
    p.add_argument("--hedge-delay", type=float, default=None, help="hedge reads after (s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one client process."""
    return trio.run(run_client, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
