"""The printed result of a soak run: a table, the violations with their history
lines, and one summary line (``SOAK PASS: ...`` or ``SOAK FAIL: ...``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .checker import HANG_SLACK, RECOVERY_TARGET, SETTLE, Verdict
from .faults import KINDS, Schedule
from .history import History

__all__ = ["driver_totals", "render_table", "summary_line"]

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
)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def summary_line(verdict: Verdict, *, seed: int, duration: float) -> str:
    """The one line a person (or CI) reads first."""
    unavailable = sum(verdict.unavailable.values())
    word = "PASS" if verdict.passed else "FAIL"
    return (
        f"SOAK {word}: {verdict.calls} calls, {verdict.count('lost')} lost,"
        f" {verdict.count('duplicated')} duplicated, {verdict.count('phantom')} phantom,"
        f" {verdict.count('misreported')} misreported, {verdict.count('hang')} hangs,"
        f" {verdict.count('untyped')} untyped, recovery {_seconds(verdict.recovery_steady)},"
        f" {unavailable} unavailable-while-healthy (seed {seed}, {duration:.0f} s)"
    )


def driver_totals(history: History) -> dict[str, int]:
    """The driver's statistics totals, summed over the client processes."""
    totals: Counter[str] = Counter()
    for summary in history.summaries.values():
        for name in _TOTALS:
            totals[name] += int(summary.stats.get(name) or 0)
    return dict(totals)


def _ops_table(verdict: Verdict) -> list[str]:
    lines = [f"  {'operation':<10} {'calls':>8} {'ok':>8} {'failed':>8} {'ambiguous':>10}"]
    total: Counter[str] = Counter()
    for op in ("insert", "read", "increment", "batch"):
        row = verdict.by_op.get(op, Counter())
        total.update(row)
        calls = row["ok"] + row["failed"]
        lines.append(
            f"  {op:<10} {calls:>8} {row['ok']:>8} {row['failed']:>8} {row['ambiguous']:>10}"
        )
    calls = total["ok"] + total["failed"]
    lines.append(
        f"  {'total':<10} {calls:>8} {total['ok']:>8} {total['failed']:>8} {total['ambiguous']:>10}"
    )
    return lines


def _checks(verdict: Verdict) -> list[str]:
    rows: list[tuple[str, Any, str]] = [
        ("lost (acknowledged, missing)", verdict.count("lost"), "0"),
        ("duplicated (applied twice)", verdict.count("duplicated"), "0"),
        ("phantom (never written)", verdict.count("phantom"), "0"),
        ("misreported (not applied, yet present)", verdict.count("misreported"), "0"),
        ("partial batches", verdict.count("partial"), "0"),
        ("stale reads", verdict.count("stale read"), "0"),
        (f"hangs (> deadline + {HANG_SLACK:.0f} s)", verdict.count("hang"), "0"),
        ("untyped exceptions", verdict.count("untyped"), "0"),
        ("anomalies (rows affected)", verdict.count("anomaly"), "0"),
        ("recovery: first ok after heal", _seconds(verdict.recovery_first), ""),
        (
            "recovery: steady success",
            _seconds(verdict.recovery_steady),
            f"<= {RECOVERY_TARGET:.0f} s",
        ),
        ("leaks (fds, trio tasks)", len(verdict.leaks), "0"),
        (
            f"unavailable while a node was healthy (settle {SETTLE:.0f} s)",
            sum(verdict.unavailable.values()),
            "reported",
        ),
        ("  ... in distinct seconds", len(verdict.unavailable_seconds), "see --max-unavailable"),
        (
            "failed during a SIGSTOP (shared SQLite lock; apart)",
            sum(verdict.stalled.values()),
            "",
        ),
        ("failed with no healthy node (schedule allows none)", verdict.no_healthy_node, ""),
        (
            "excused: injected non-retryable errors",
            f"{verdict.excused} (of <= {verdict.injected_nonretryable} injected)",
            "",
        ),
        (
            "ambiguous writes: applied / not applied",
            f"{verdict.ambiguous_applied} / {verdict.ambiguous_absent}",
            "",
        ),
    ]
    return [f"  {name:<52} {value!s:>14}  {target}" for name, value, target in rows]


def render_table(verdict: Verdict, history: History, schedule: Schedule) -> list[str]:
    """The report printed after a run (and embedded in the timeline)."""
    lines = ["calls:"]
    lines += _ops_table(verdict)
    if verdict.errors:
        lines.append(
            "errors by class: " + ", ".join(f"{k} {v}" for k, v in verdict.errors.most_common())
        )
    lines.append("checks:")
    lines += _checks(verdict)
    if verdict.unavailable:
        lines.append(
            "  unavailable by class: "
            + ", ".join(f"{k} {v}" for k, v in verdict.unavailable.most_common())
        )
        lines.append(
            "  unavailable during: "
            + ", ".join(f"{k} {v}" for k, v in verdict.unavailable_during.most_common(8))
        )
    lines.append("counters (acknowledged / ambiguous / final):")
    for client, (acked, ambiguous, final) in sorted(verdict.counter_slack.items()):
        lines.append(f"  client {client}: {acked} / {ambiguous} / {final}")
    covered = sorted({f.kind for f in history.faults})
    lines.append(
        f"faults: {len(history.faults)} of {len(schedule.faults)} planned ran,"
        f" {len(covered)}/{len(KINDS)} kinds"
        f" ({', '.join(covered)})"
    )
    lines.append(
        "driver totals: " + ", ".join(f"{k} {v}" for k, v in driver_totals(history).items())
    )
    for category in sorted(verdict.findings):
        finding = verdict.findings[category]
        if not finding.count:
            continue
        lines.append(f"{category}: {finding.count} (first {len(finding.examples)}):")
        lines += [f"    {example}" for example in finding.examples]
    if verdict.violations:
        lines.append("VIOLATIONS:")
        lines += [f"  - {v}" for v in verdict.violations]
    return lines
