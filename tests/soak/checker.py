"""The checks of a soak run, in the spirit of Jepsen's set and counter checkers.

:func:`read_final_state` reads what the database holds after the heal,
through a fresh client; :func:`check` compares it with the histories:

- **set** (``soak_items``, a UNIQUE value per insert): every acknowledged
  insert present exactly once (else *lost*); a failed insert present at most
  once, and present only if its error said ``maybe_applied`` (else
  *misreported*: the driver said "not applied" and it was);
- **batches** (``soak_batches``, no unique key): both rows or neither
  (else *partial*), none twice (else *duplicated*), acknowledged ones
  present, failed ones only if ``maybe_applied``;
- **counters** (one per client): acknowledged <= final <= acknowledged +
  ambiguous increments (below is *lost*, above is *duplicated*);
- **phantoms**: rows nobody tried to write;
- **stale reads**: a read of a value the same task had seen acknowledged
  must find it;
- **hangs**: calls longer than their deadline + :data:`HANG_SLACK`;
- **untyped**: anything not a ``qdb_client.QdbError`` escaping a call;
- **recovery**: from the end of the heal to the first successful call, and
  to the end of the last failed call (*steady*);
- **leaks**: each client's file descriptors and trio tasks back to baseline;
- **availability**: failed calls while at least one node had no fault
  (from the fault's start until :data:`SETTLE` after its end), by error class,
  not counting errors a ``fail-nonretryable`` fault injected, nor calls
  during a fault that stalls every node (``faults.STALLS_STORAGE``: a
  SIGSTOPped node holds the shared SQLite write lock); those are counted
  apart.

Everything is pure except :func:`read_final_state`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import qdb_client

from .faults import STALLS_STORAGE
from .history import Call, FaultRecord, History

__all__ = [
    "HANG_SLACK",
    "SETTLE",
    "FinalState",
    "Finding",
    "Verdict",
    "check",
    "read_final_state",
    "summary_facts",
]

#: A call may outlive its deadline by this much (seconds) before it is a hang.
HANG_SLACK = 1.0
#: Seconds after a fault's end during which its node still counts as faulted.
SETTLE = 1.0
#: Longest acceptable recovery (seconds) after the heal.
RECOVERY_TARGET = 5.0
#: Seconds with failures while a node was healthy that are never a violation.
MIN_UNAVAILABLE_SECONDS = 5
#: Rows read per page of the final state.
PAGE = 5000


@dataclass
class FinalState:
    """What the database holds after the heal."""

    items: Counter[str] = field(default_factory=Counter)
    batches: Counter[tuple[str, str]] = field(default_factory=Counter)
    counters: dict[int, int] = field(default_factory=dict)


async def read_final_state(hosts: Sequence[str], *, deadline: float = 30.0) -> FinalState:
    """Read every soak table through a fresh client, page by page (``deadline`` per call)."""
    state = FinalState()
    async with qdb_client.open_client(list(hosts), discover_members=False) as client:
        for table, columns in (("soak_items", "value"), ("soak_batches", "value, part")):
            last = 0
            while True:
                page = await client.query(
                    f"SELECT id, {columns} FROM {table} WHERE id > ? ORDER BY id LIMIT ?",
                    [last, PAGE],
                    timeout=deadline,
                )
                for row in page:
                    if table == "soak_items":
                        state.items[row[1]] += 1
                    else:
                        state.batches[(row[1], row[2])] += 1
                if len(page.rows) < PAGE:
                    break
                last = page.rows[-1][0]
        rows = await client.query("SELECT id, n FROM soak_counters", timeout=deadline)
        state.counters = {row[0]: row[1] for row in rows}
    return state


@dataclass
class Finding:
    """One kind of violation, with the history lines that show it."""

    category: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, text: str, limit: int = 8) -> None:
        """Count one more; keep the first ``limit`` examples."""
        self.count += 1
        if len(self.examples) < limit:
            self.examples.append(text)


@dataclass
class Verdict:
    """Everything the checks found; ``violations`` empty means the run passed."""

    calls: int = 0
    ok: int = 0
    by_op: dict[str, Counter[str]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)
    findings: dict[str, Finding] = field(default_factory=dict)
    ambiguous_applied: int = 0
    ambiguous_absent: int = 0
    counter_slack: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    recovery_first: float | None = None
    recovery_steady: float | None = None
    unavailable: Counter[str] = field(default_factory=Counter)
    unavailable_during: Counter[str] = field(default_factory=Counter)
    unavailable_seconds: set[int] = field(default_factory=set)
    stalled: Counter[str] = field(default_factory=Counter)
    no_healthy_node: int = 0
    excused: int = 0
    injected_nonretryable: int = 0
    leaks: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def finding(self, category: str) -> Finding:
        """The finding of ``category`` (created empty)."""
        return self.findings.setdefault(category, Finding(category))

    def count(self, category: str) -> int:
        """How many of ``category`` were found."""
        return self.findings[category].count if category in self.findings else 0

    @property
    def passed(self) -> bool:
        """No violation."""
        return not self.violations


def _check_set(calls: list[Call], state: FinalState, verdict: Verdict) -> None:
    for call in calls:
        present = state.items.get(call.value, 0)
        if present > 1:
            verdict.finding("duplicated").add(f"{present} rows for insert {call.line()}")
        if call.ok and present == 0:
            verdict.finding("lost").add(f"acknowledged insert missing: {call.line()}")
        elif not call.ok and present and not call.ambiguous:
            verdict.finding("misreported").add(
                f"insert present although its error said not applied: {call.line()}"
            )
        elif not call.ok:
            if present:
                verdict.ambiguous_applied += 1
            elif call.ambiguous:
                verdict.ambiguous_absent += 1


def _check_batches(calls: list[Call], state: FinalState, verdict: Verdict) -> None:
    for call in calls:
        a = state.batches.get((call.value, "a"), 0)
        b = state.batches.get((call.value, "b"), 0)
        if a != b:
            verdict.finding("partial").add(f"batch rows a={a} b={b}: {call.line()}")
        if max(a, b) > 1:
            verdict.finding("duplicated").add(f"batch applied {max(a, b)} times: {call.line()}")
        if call.ok and (a == 0 or b == 0):
            verdict.finding("lost").add(f"acknowledged batch missing (a={a} b={b}): {call.line()}")
        elif not call.ok and (a or b) and not call.ambiguous:
            verdict.finding("misreported").add(
                f"batch present although its error said not applied: {call.line()}"
            )
        elif not call.ok:
            if a or b:
                verdict.ambiguous_applied += 1
            elif call.ambiguous:
                verdict.ambiguous_absent += 1
        if call.ok and call.found != 2:
            verdict.finding("anomaly").add(f"batch reported {call.found} rows: {call.line()}")


def _check_phantoms(
    inserts: list[Call], batches: list[Call], state: FinalState, verdict: Verdict
) -> None:
    tried = {c.value for c in inserts}
    for value, n in state.items.items():
        if value not in tried:
            verdict.finding("phantom").add(f"{n} row(s) soak_items.value={value!r}: never inserted")
    tried_batches = {(c.value, part) for c in batches for part in ("a", "b")}
    for key, n in state.batches.items():
        if key not in tried_batches:
            verdict.finding("phantom").add(f"{n} row(s) soak_batches {key!r}: never inserted")


def _check_counters(
    calls: list[Call], state: FinalState, clients: Iterable[int], verdict: Verdict
) -> None:
    by_client: dict[int, list[Call]] = defaultdict(list)
    for call in calls:
        by_client[int(call.value)].append(call)
    for client in sorted(set(clients) | set(by_client)):
        done = by_client.get(client, [])
        acked = sum(1 for c in done if c.ok)
        ambiguous = sum(1 for c in done if c.ambiguous)
        final = state.counters.get(client)
        if final is None:
            verdict.finding("lost").add(f"counter row {client} missing")
            continue
        verdict.counter_slack[client] = (acked, ambiguous, final)
        if final < acked:
            verdict.finding("lost").add(
                f"counter {client}: {final} < {acked} acknowledged increments"
                f" (lost {acked - final})"
            )
        elif final > acked + ambiguous:
            verdict.finding("duplicated").add(
                f"counter {client}: {final} > {acked} acknowledged + {ambiguous} ambiguous"
                f" (duplicated {final - acked - ambiguous})"
            )
        for c in done:
            if c.ok and c.found != 1:
                verdict.finding("anomaly").add(f"increment changed {c.found} rows: {c.line()}")


def _active(call: Call, faults: list[FaultRecord]) -> list[FaultRecord]:
    return [f for f in faults if f.overlaps(call.start, call.end, SETTLE)]


def _excused(call: Call, faults: list[FaultRecord]) -> bool:
    if not call.injected:
        return False
    return any(
        f.nonretryable and call.outcome in f.excuses and f.overlaps(call.start, call.end, SETTLE)
        for f in faults
    )


def _check_availability(history: History, verdict: Verdict, nodes: int) -> None:
    verdict.injected_nonretryable = sum(
        f.params.get("count", 0) for f in history.faults if f.nonretryable
    )
    t0 = min((c.start for c in history.calls), default=0.0)
    for call in history.calls:
        if call.ok:
            continue
        if _excused(call, history.faults):
            verdict.excused += 1
            continue
        active = _active(call, history.faults)
        kinds = {f.kind for f in active}
        if kinds & STALLS_STORAGE:
            verdict.stalled[call.outcome] += 1
            continue
        if len({n for f in active for n in f.nodes}) < nodes:
            verdict.unavailable[call.outcome] += 1
            verdict.unavailable_during["+".join(sorted(kinds)) or "no fault"] += 1
            verdict.unavailable_seconds.add(int(call.end - t0))
            verdict.finding("unavailable").add(call.line(), limit=12)
        else:
            verdict.no_healthy_node += 1


def _check_recovery(history: History, verdict: Verdict) -> None:
    if history.heal is None:
        verdict.violations.append("the heal never completed: recovery not measured")
        return
    healed = history.heal[1]
    after = [c for c in history.calls if c.start >= healed]
    oks = [c.end for c in after if c.ok]
    if not oks:
        verdict.violations.append("no successful call after the heal")
        return
    verdict.recovery_first = max(0.0, min(oks) - healed)
    failures = [c.end for c in after if not c.ok]
    verdict.recovery_steady = max(verdict.recovery_first, max(failures, default=0.0) - healed)
    for call in after:
        if not call.ok:
            verdict.finding("failed after heal").add(call.line())


def _check_clients(history: History, clients: int, verdict: Verdict) -> None:
    for client in range(clients):
        summary = history.summaries.get(client)
        if summary is None:
            verdict.leaks.append(f"client {client}: no summary (it did not finish)")
            continue
        if summary.fd_settled != summary.fd_before:
            verdict.leaks.append(
                f"client {client}: {summary.fd_before} fds before open_client,"
                f" {summary.fd_after} after its block ({summary.fd_settled} a second later)"
            )
        if summary.tasks_after != summary.tasks_before:
            verdict.leaks.append(
                f"client {client}: {summary.tasks_before} trio tasks before open_client,"
                f" {summary.tasks_after} after its block"
            )


def check(
    history: History,
    state: FinalState,
    *,
    clients: int,
    nodes: int = 3,
    max_unavailable: float = 0.1,
    client_problems: Sequence[str] = (),
) -> Verdict:
    """Run every check. Availability is a violation when calls failed while a node was
    healthy in more than ``max_unavailable`` of the run's seconds (at least
    :data:`MIN_UNAVAILABLE_SECONDS`; 0 means none at all): seconds, not calls,
    because a driver that fails fast fails thousands of calls in the second a
    retry would have taken."""
    verdict = Verdict(calls=len(history.calls))
    ops: dict[str, list[Call]] = defaultdict(list)
    for call in history.calls:
        ops[call.op].append(call)
        verdict.by_op.setdefault(call.op, Counter())["ok" if call.ok else "failed"] += 1
        if call.ambiguous:
            verdict.by_op[call.op]["ambiguous"] += 1
        if call.ok:
            verdict.ok += 1
        else:
            verdict.errors[call.outcome] += 1
        if call.untyped:
            verdict.finding("untyped").add(call.line())
        if call.duration > call.deadline + HANG_SLACK or call.outcome == "Hang":
            verdict.finding("hang").add(f"took {call.duration:.2f} s: {call.line()}")
        if call.op == "read" and call.ok and call.expect is not None and call.found != call.expect:
            verdict.finding("stale read").add(call.line())
    for category in ("lost", "duplicated", "phantom", "misreported", "hang", "untyped"):
        verdict.finding(category)
    _check_set(ops["insert"], state, verdict)
    _check_batches(ops["batch"], state, verdict)
    _check_phantoms(ops["insert"], ops["batch"], state, verdict)
    _check_counters(ops["increment"], state, range(clients), verdict)
    _check_availability(history, verdict, nodes)
    _check_recovery(history, verdict)
    _check_clients(history, clients, verdict)
    _verdicts(verdict, history, max_unavailable, client_problems)
    return verdict


def _verdicts(
    verdict: Verdict, history: History, max_unavailable: float, client_problems: Sequence[str]
) -> None:
    for category in ("lost", "duplicated", "phantom", "misreported", "partial", "stale read"):
        if verdict.count(category):
            verdict.violations.append(f"{verdict.count(category)} {category}")
    for category in ("hang", "untyped", "anomaly"):
        if verdict.count(category):
            verdict.violations.append(f"{verdict.count(category)} {category}")
    if verdict.recovery_steady is not None and verdict.recovery_steady > RECOVERY_TARGET:
        verdict.violations.append(
            f"recovery took {verdict.recovery_steady:.1f} s > {RECOVERY_TARGET:.0f} s"
        )
    verdict.violations.extend(verdict.leaks)
    verdict.violations.extend(f"client: {p}" for p in client_problems)
    broken = [f for f in history.faults if f.error]
    if broken:
        verdict.violations.append(
            f"{len(broken)} fault(s) could not be applied or reverted: "
            + "; ".join(f"{f.id}: {f.error}" for f in broken[:3])
        )
    seconds = _run_seconds(history)
    limit = max(MIN_UNAVAILABLE_SECONDS, max_unavailable * seconds) if max_unavailable else 0
    unavailable = len(verdict.unavailable_seconds)
    if unavailable > limit:
        verdict.violations.append(
            f"calls failed while a node was healthy in {unavailable} of {seconds} seconds"
            f" (> {limit:.0f}; {sum(verdict.unavailable.values())} calls)"
        )
    if verdict.calls == 0:
        verdict.violations.append("no calls recorded")


def _run_seconds(history: History) -> int:
    if not history.calls:
        return 0
    return int(max(c.end for c in history.calls) - min(c.start for c in history.calls)) + 1


def summary_facts(verdict: Verdict) -> dict[str, Any]:
    """The numbers of the summary line, as a dict (also written to ``verdict.json``)."""
    return {
        "calls": verdict.calls,
        "ok": verdict.ok,
        "lost": verdict.count("lost"),
        "duplicated": verdict.count("duplicated"),
        "phantom": verdict.count("phantom"),
        "misreported": verdict.count("misreported"),
        "partial": verdict.count("partial"),
        "stale_reads": verdict.count("stale read"),
        "hangs": verdict.count("hang"),
        "untyped": verdict.count("untyped"),
        "recovery_first": verdict.recovery_first,
        "recovery_steady": verdict.recovery_steady,
        "unavailable_while_healthy": sum(verdict.unavailable.values()),
        "unavailable_by_class": dict(verdict.unavailable),
        "unavailable_during": dict(verdict.unavailable_during),
        "unavailable_seconds": len(verdict.unavailable_seconds),
        "failed_during_storage_stall": dict(verdict.stalled),
        "failed_with_no_healthy_node": verdict.no_healthy_node,
        "excused_injected": verdict.excused,
        "errors_by_class": dict(verdict.errors),
        "leaks": verdict.leaks,
        "violations": verdict.violations,
    }
