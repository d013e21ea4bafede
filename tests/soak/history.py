"""The soak's records: every call, every fault, every client's summary, as JSON lines.

Each client process appends to its own ``history-<client>.jsonl``; the
nemesis appends to ``faults.jsonl``. One JSON object per line, with a
``type``:

``call``
    One driver call: ``client``, ``task``, ``op`` (``insert``, ``read``,
    ``increment``, ``batch``), ``value`` (the unique value inserted or read,
    or the counter id), ``start`` and ``end`` (``time.monotonic()``, which
    is one clock for every process of the machine), ``deadline`` (the
    ``timeout=`` given), ``outcome`` (``"ok"`` or the error's class name),
    and for errors the facts the driver reported: ``sent`` (request_sent),
    ``maybe_applied``, ``retryable``, ``key`` (idempotency_key),
    ``attempts`` (how many) and ``attempt_log`` (each one's node, timing and
    outcome, as the driver describes it), ``injected`` (the node's error said ``details.injected``),
    ``untyped`` (not a ``qdb_client.QdbError``) and ``message``. Reads add
    ``found`` (rows matching) and ``expect`` (rows that must match).
``view``
    The driver's view of the nodes at ``t``: per node ``address``,
    ``state`` (UP/SUSPECT/DOWN), ``breaker``, ``opened_by`` (what opened it),
    ``in_flight`` and ``latency`` (the driver's moving average).
``start`` / ``summary``
    A client's configuration, and its end: file descriptors and trio tasks
    before ``open_client`` and after its block exited, the driver's
    statistics totals, and how many calls it made.
``fault``
    One fault of the schedule as it really ran: ``id``, ``kind``,
    ``nodes``, ``params``, ``start``, ``end``, ``nonretryable`` with the
    error classes it is expected to cause (``excuses``), and ``error`` if
    applying or reverting it failed. A ``heal`` record gives the ``start``
    and ``end`` of the final heal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "Call",
    "ClientSummary",
    "FaultRecord",
    "History",
    "HistoryWriter",
    "load_history",
    "read_jsonl",
]


class HistoryWriter:
    """Appends JSON records to one file, one line each, flushed at once.

    Flushing every line costs a write per call, and means a client that is
    killed loses nothing it had recorded.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line."""
        self._file.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of one JSON-lines file; a torn last line (a killed writer) is skipped."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue


@dataclass(frozen=True, slots=True)
class Call:
    """One recorded driver call (see the module docstring for the fields).

    Only a failed call keeps its whole record (``raw``, with the attempt log):
    a long run has millions of successful calls.
    """

    client: int
    task: int
    op: str
    value: Any
    start: float
    end: float
    deadline: float
    outcome: str
    sent: bool = False
    maybe_applied: bool = False
    retryable: bool = False
    key: str | None = None
    attempts: int = 0
    injected: bool = False
    untyped: bool = False
    message: str = ""
    found: int | None = None
    expect: int | None = None
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        """The call returned normally."""
        return self.outcome == "ok"

    @property
    def duration(self) -> float:
        """Seconds from the call's start to its end."""
        return self.end - self.start

    @property
    def ambiguous(self) -> bool:
        """A failed write that may have been applied (or whose outcome nobody knows)."""
        return not self.ok and (self.maybe_applied or self.untyped or self.outcome == "Hang")

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Call:
        """Build from a ``call`` record."""
        names = cls.__dataclass_fields__.keys() - {"raw"}
        raw = None if record.get("outcome") == "ok" else record
        return cls(**{k: record[k] for k in names if k in record}, raw=raw)

    def line(self) -> str:
        """The record as in the history file (rebuilt from the fields for a successful call)."""
        if self.raw is not None:
            return json.dumps(self.raw, separators=(",", ":"), default=str)
        fields = {"type": "call"}
        fields.update((k, getattr(self, k)) for k in _LINE_FIELDS)
        return json.dumps(fields, separators=(",", ":"), default=str)


_LINE_FIELDS = ("client", "task", "op", "value", "deadline", "start", "outcome", "found", "end")


@dataclass(frozen=True)
class ClientSummary:
    """What one client process reported when it finished."""

    client: int
    fd_before: int
    fd_after: int
    fd_settled: int
    tasks_before: int
    tasks_after: int
    calls: int
    stats: dict[str, Any]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ClientSummary:
        """Build from a ``summary`` record."""
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: record[k] for k in names})


@dataclass(frozen=True)
class FaultRecord:
    """One fault as it really ran (times are ``time.monotonic()``)."""

    id: str
    kind: str
    nodes: tuple[int, ...]
    params: dict[str, Any]
    start: float
    end: float
    nonretryable: bool = False
    excuses: tuple[str, ...] = ()
    error: str | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FaultRecord:
        """Build from a ``fault`` record."""
        return cls(
            id=record["id"],
            kind=record["kind"],
            nodes=tuple(record["nodes"]),
            params=dict(record.get("params", {})),
            start=record["start"],
            end=record["end"],
            nonretryable=bool(record.get("nonretryable", False)),
            excuses=tuple(record.get("excuses", ())),
            error=record.get("error"),
        )

    def overlaps(self, start: float, end: float, settle: float = 0.0) -> bool:
        """Whether the fault (extended ``settle`` seconds past its end) meets [start, end]."""
        return self.start <= end and start <= self.end + settle


@dataclass
class History:
    """Everything one run recorded."""

    calls: list[Call] = field(default_factory=list)
    summaries: dict[int, ClientSummary] = field(default_factory=dict)
    starts: dict[int, dict[str, Any]] = field(default_factory=dict)
    faults: list[FaultRecord] = field(default_factory=list)
    #: The clients' ``view`` records: (client, t, per-node dicts in host order).
    views: list[tuple[int, float, list[dict[str, Any]]]] = field(default_factory=list)
    #: When the final heal started and ended (monotonic), if it ran.
    heal: tuple[float, float] | None = None


def load_history(out: str | os.PathLike[str]) -> History:
    """Read every ``history-*.jsonl`` and ``faults.jsonl`` of an output directory."""
    out = Path(out)
    history = History()
    for path in sorted(out.glob("history-*.jsonl")):
        for record in read_jsonl(path):
            kind = record.get("type")
            if kind == "call":
                history.calls.append(Call.from_record(record))
            elif kind == "summary":
                summary = ClientSummary.from_record(record)
                history.summaries[summary.client] = summary
            elif kind == "view":
                history.views.append((record["client"], record["t"], record["nodes"]))
            elif kind == "start":
                history.starts[record["client"]] = record
    faults = out / "faults.jsonl"
    if faults.exists():
        for record in read_jsonl(faults):
            if record.get("type") == "fault":
                history.faults.append(FaultRecord.from_record(record))
            elif record.get("type") == "heal":
                history.heal = (record["start"], record["end"])
    history.calls.sort(key=lambda c: c.start)
    history.faults.sort(key=lambda f: f.start)
    return history
