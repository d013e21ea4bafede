"""An event listener that narrates what the driver does, for the main job.

``Narrator`` is passed to ``open_client(..., listeners=[narrator])``. It
prints the events an operator cares about as they happen (a node going
DOWN or UP, a breaker opening or closing, a node refusing credentials) and
counts the frequent ones (retries, failed attempts, deduplicated writes) so
that :meth:`Narrator.summary` can say, at the end of a phase, what the
driver absorbed on the application's behalf. It never prints SQL,
parameters or secrets: the events carry none.
"""

from __future__ import annotations

import time
from collections import Counter

from qdb_client import events

__all__ = ["Narrator"]

#: Live lines per phase before the narrator only counts (keeps a storm readable).
_LIVE_LINES_PER_PHASE = 12


class Narrator:
    """Prints state changes live and sums up retries per phase."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._lines = 0
        self._hidden = 0
        self.retries: Counter[str] = Counter()
        self.failed_attempts: Counter[str] = Counter()
        self.replays = 0
        self.transitions = 0

    def __call__(self, event: events.Event) -> None:
        if isinstance(event, events.NodeStateChanged):
            reason = f" ({event.reason})" if event.reason else ""
            self._say(f"node {event.node}: {event.previous} -> {event.state}{reason}")
        elif isinstance(event, events.BreakerStateChanged):
            self._say(f"breaker of {event.node}: {event.previous} -> {event.state}")
        elif isinstance(event, events.AuthenticationRefused):
            self._say(f"node {event.node} refused the credentials: {event.reason}")
        elif isinstance(event, events.RetryScheduled):
            self.retries[_short(event.reason)] += 1
        elif isinstance(event, events.RequestFailed):
            self.failed_attempts[event.outcome] += 1
        elif isinstance(event, events.IdempotentReplay):
            self.replays += 1

    def _say(self, text: str) -> None:
        self.transitions += 1
        if self._lines >= _LIVE_LINES_PER_PHASE:
            self._hidden += 1
            return
        self._lines += 1
        print(f"     [event +{time.monotonic() - self._start:5.1f}s] {text}")

    def summary(self) -> None:
        """Print what was counted since the last summary, then start counting afresh."""
        if self._hidden:
            print(f"     [event] ... and {self._hidden} more state changes")
        if self.failed_attempts:
            shown = ", ".join(f"{k} {v}" for k, v in self.failed_attempts.most_common(4))
            print(f"     [event] attempts that failed (the driver saw them): {shown}")
        if self.retries:
            shown = ", ".join(f"{k} {v}" for k, v in self.retries.most_common(4))
            print(f"     [event] retries scheduled: {sum(self.retries.values())} ({shown})")
        if self.replays:
            print(f"     [event] writes answered from their stored outcome: {self.replays}")
        self._lines = self._hidden = self.replays = 0
        self.retries.clear()
        self.failed_attempts.clear()


def _short(reason: str) -> str:
    """The cause of a retry, without the policy's verdict after it ("..., retryable")."""
    return reason.split(",", 1)[0].strip() or "unspecified"
