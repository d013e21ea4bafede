"""The fault schedule: which fault hits which node when, drawn from one seed.

Pure code (no trio, no processes): ``make_schedule(seed, duration)`` gives
the same :class:`Schedule` for the same arguments, so a run is reproduced by
its seed. :mod:`tests.soak.nemesis` carries the schedule out.

Shape of a run (``t`` in seconds after the workload started)::

    0 .. warmup            no faults: every client reaches a steady state
    warmup .. heal_at      faults, in two lanes
    heal_at                heal: clear every toxic and node fault, SIGCONT, restart
    heal_at .. duration    no faults: recovery is measured

Each lane runs one fault at a time, and a node counts as held by a fault
until :data:`MARGIN` seconds after it ends (a restarted node, and the
driver's view of it, take a moment to recover). A fault is placed only where
at most two nodes are held at any moment, so at least one node is always
healthy, and never on a node the other lane holds, so one node never has
two faults at once. Lane 0 is dense and lane 1 sparse, so the run has
stretches with one fault and stretches with two faults on two nodes at once.
The kinds are dealt from a shuffled deck, so every kind comes up before any
repeats; a run of 60 s covers them all, and durations shrink for short runs
so that they fit.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "KINDS",
    "NONRETRYABLE_CODES",
    "STALLS_STORAGE",
    "FaultSpec",
    "Schedule",
    "make_schedule",
]

#: kind -> (family, shortest, longest duration in seconds at full pace).
KINDS: dict[str, tuple[str, float, float]] = {
    "kill": ("process", 1.0, 6.0),  # SIGKILL, restart at the end
    "pause": ("process", 1.0, 8.0),  # SIGSTOP, SIGCONT at the end
    "terminate": ("process", 1.0, 6.0),  # SIGTERM (graceful), restart at the end
    "latency": ("proxy", 2.0, 8.0),
    "bandwidth": ("proxy", 2.0, 6.0),
    "timeout": ("proxy", 1.0, 5.0),
    "reset_peer": ("proxy", 1.0, 5.0),
    "slicer": ("proxy", 2.0, 6.0),
    "limit_data": ("proxy", 1.0, 5.0),
    "slow_close": ("proxy", 2.0, 6.0),
    "down-refuse": ("proxy", 1.0, 5.0),
    "down-blackhole": ("proxy", 1.0, 5.0),
    "fail-retryable": ("node", 1.0, 4.0),
    "fail-nonretryable": ("node", 1.0, 3.0),
    "drop_after_commit": ("node", 1.0, 4.0),
    "drop_connections": ("node", 1.0, 5.0),
    "refuse_connections": ("node", 1.0, 5.0),
    "stop_pings": ("node", 2.0, 8.0),
    "node-latency": ("node", 2.0, 6.0),
}
#: Codes injected by ``fail-nonretryable`` -> the error class the driver raises for each.
NONRETRYABLE_CODES = {
    "SQL_ERROR": "SqlError",
    "INVALID_REQUEST": "InvalidRequest",
    "PERMISSION_DENIED": "PermissionDenied",
}
#: Kinds that stall every node, not just the one they hit. The test nodes share one
#: SQLite file, and a SIGSTOPped node under write load holds its write lock most of
#: the time (8 of 10 tries), so every other node's writes wait for it, and their
#: reads starve behind those writes for the nodes' small connection pools. No
#: node is healthy meanwhile: the checker leaves these windows out of availability.
STALLS_STORAGE = frozenset({"pause"})
_RETRYABLE_CODES = ("UNAVAILABLE", "INTERNAL", "OVERLOADED", "TIMEOUT", "CAPACITY_EXCEEDED")
#: Seconds a lane keeps away from a node the other lane holds, before and after.
MARGIN = 2.0


@dataclass(frozen=True)
class FaultSpec:
    """One planned fault: ``kind`` on ``nodes`` from ``at`` for ``duration`` seconds."""

    id: str
    kind: str
    nodes: tuple[int, ...]
    at: float
    duration: float
    lane: int
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> float:
        """Planned end, seconds after the workload started."""
        return self.at + self.duration

    @property
    def family(self) -> str:
        """``process``, ``proxy`` or ``node`` (fault controls)."""
        return KINDS[self.kind][0]

    @property
    def nonretryable(self) -> bool:
        """Whether it makes calls fail with errors no retry may absorb."""
        return self.kind == "fail-nonretryable"

    @property
    def excuses(self) -> tuple[str, ...]:
        """Error classes this fault is expected to raise to callers."""
        if self.nonretryable:
            return (NONRETRYABLE_CODES[self.params["code"]],)
        return ()

    def describe(self) -> str:
        """One line for the printed schedule."""
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        nodes = ",".join(f"n{n}" for n in self.nodes)
        return (
            f"{self.id:<24} lane {self.lane}  t={self.at:6.1f}..{self.end:6.1f}s"
            f"  {nodes:<6} {params}"
        )


@dataclass(frozen=True)
class Schedule:
    """A whole run's faults, and its phases (seconds after the workload started)."""

    seed: int
    duration: float
    warmup: float
    heal_at: float
    faults: tuple[FaultSpec, ...]

    def kinds(self) -> set[str]:
        """The kinds this schedule covers."""
        return {f.kind for f in self.faults}

    def max_concurrent_nodes(self) -> int:
        """The most nodes faulted at one moment (planned)."""
        best = 0
        for f in self.faults:
            at = f.at + 1e-9
            nodes = {n for g in self.faults if g.at <= at < g.end for n in g.nodes}
            best = max(best, len(nodes))
        return best

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``schedule.json``)."""
        return {
            "seed": self.seed,
            "duration": self.duration,
            "warmup": self.warmup,
            "heal_at": self.heal_at,
            "faults": [
                {**asdict(f), "end": f.end, "nonretryable": f.nonretryable, "excuses": f.excuses}
                for f in self.faults
            ],
        }

    def describe(self) -> str:
        """The schedule as printed at the start of a run."""
        lines = [
            f"fault schedule: seed {self.seed}, {len(self.faults)} faults of"
            f" {len(self.kinds())}/{len(KINDS)} kinds, t={self.warmup:.0f}..{self.heal_at:.0f}s,"
            f" heal at t={self.heal_at:.0f}s, run {self.duration:.0f}s",
        ]
        lines += [f"  {f.describe()}" for f in self.faults]
        missing = sorted(set(KINDS) - self.kinds())
        if missing:
            lines.append(f"  (kinds not in this run, too short: {', '.join(missing)})")
        return "\n".join(lines)


def _params(kind: str, rng: random.Random) -> dict[str, Any]:
    direction = rng.choice(["downstream", "upstream", "both"])
    toxicity = rng.choice([1.0, 1.0, 1.0, 0.5])
    if kind == "latency":
        jitter = rng.randrange(0, 300, 10)
        return {
            "latency": rng.randrange(100, 1000, 10),
            "jitter": jitter,
            "direction": direction,
            "toxicity": toxicity,
        }
    if kind == "bandwidth":
        return {"rate": rng.choice([1, 2, 4, 8, 16, 32]), "direction": direction}
    if kind == "timeout":
        return {
            "timeout": rng.choice([0, 0, rng.randrange(200, 2000, 100)]),
            "direction": direction,
        }
    if kind == "reset_peer":
        return {"timeout": rng.choice([0, rng.randrange(100, 1500, 100)]), "toxicity": toxicity}
    if kind == "slicer":
        size = rng.randint(1, 64)
        return {
            "average_size": size,
            "size_variation": rng.randint(0, size - 1),
            "delay": rng.randrange(0, 2000, 100),
            "direction": direction,
        }
    if kind == "limit_data":
        return {
            "bytes": rng.choice([0, rng.randint(1, 200), rng.randint(200, 4000)]),
            "direction": direction,
        }
    if kind == "slow_close":
        return {"delay": rng.randrange(100, 3000, 100), "direction": direction}
    if kind == "fail-retryable":
        return {"code": rng.choice(_RETRYABLE_CODES), "count": rng.randint(5, 40)}
    if kind == "fail-nonretryable":
        return {"code": rng.choice(sorted(NONRETRYABLE_CODES)), "count": rng.randint(1, 4)}
    if kind == "drop_after_commit":
        return {"count": rng.randint(1, 10)}
    if kind == "drop_connections":
        return {"every": round(rng.uniform(0.3, 1.5), 2)}
    if kind == "refuse_connections":
        return {"drop": rng.random() < 0.5}
    if kind == "node-latency":
        return {"seconds": round(rng.uniform(0.1, 1.5), 2)}
    return {}


def _affected(fault: FaultSpec, node: int, start: float, end: float) -> bool:
    """Whether ``fault`` holds ``node`` at some moment of [start, end], counting the
    :data:`MARGIN` after it ends (the node and the driver's view of it recovering)."""
    return node in fault.nodes and fault.at < end and start < fault.end + MARGIN


def _allowed(placed: list[FaultSpec], lane: int, node: int, at: float, end: float) -> bool:
    """Whether a fault of ``lane`` may hit ``node`` over [at, end]: the other lane does not
    hold the node, and at most one other node is faulted or recovering meanwhile."""
    if any(f.lane != lane and _affected(f, node, at - MARGIN, end) for f in placed):
        return False
    others = {n for f in placed for n in f.nodes if n != node and _affected(f, n, at, end + MARGIN)}
    return len(others) <= 1


def make_schedule(
    seed: int,
    duration: float,
    *,
    nodes: int = 3,
    warmup: float | None = None,
    recovery: float | None = None,
) -> Schedule:
    """The fault schedule of a run of ``duration`` seconds, drawn from ``seed``.

    ``warmup`` (default 3 s) passes before the first fault; ``recovery``
    (default ``max(10, 0.15 * duration)``) seconds at the end have none.
    """
    if nodes < 3:
        raise ValueError("the soak needs at least 3 nodes (two lanes, one healthy node)")
    warmup = 3.0 if warmup is None else warmup
    recovery = max(10.0, 0.15 * duration) if recovery is None else recovery
    heal_at = max(warmup, duration - recovery)
    rng = random.Random(seed)
    window = heal_at - warmup
    mean_lane = sum((lo + hi) / 2 + 1.0 for _, lo, hi in KINDS.values()) / 2
    pace = max(0.2, min(1.0, 0.8 * window / mean_lane))
    gaps = {0: (0.2, 1.0), 1: (0.5, 3.0)}
    cursor = {0: warmup, 1: warmup + rng.uniform(0.5, 3.0) * pace}
    deck: list[str] = []
    placed: list[FaultSpec] = []
    while True:
        lane = min(cursor, key=lambda k: cursor[k])
        at = cursor[lane]
        if at >= heal_at - 1.0:
            break
        if not deck:
            deck = sorted(KINDS)
            rng.shuffle(deck)
        kind = deck[-1]
        _, lo, hi = KINDS[kind]
        length = min(lo + (hi - lo) * rng.random() * pace, heal_at - at)
        if length < min(lo, 0.5):
            cursor[lane] = heal_at  # no room left in this lane
            continue
        end = at + length
        free = [n for n in range(nodes) if _allowed(placed, lane, n, at, end)]
        if not free:
            cursor[lane] = at + 0.5
            continue
        deck.pop()
        node = rng.choice(free)
        spec = FaultSpec(
            id=f"f{len(placed):02d}-{kind}",
            kind=kind,
            nodes=(node,),
            at=round(at, 2),
            duration=round(length, 2),
            lane=lane,
            params=_params(kind, rng),
        )
        placed.append(spec)
        gap_lo, gap_hi = gaps[lane]
        cursor[lane] = spec.end + rng.uniform(gap_lo, gap_hi) * pace
    placed.sort(key=lambda f: f.at)
    return Schedule(
        seed=seed, duration=duration, warmup=warmup, heal_at=heal_at, faults=tuple(placed)
    )
