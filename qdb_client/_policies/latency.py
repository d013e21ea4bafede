"""What a node's replies take: the estimates behind balancing and attempt timeouts. Pure.

Two estimates, fed by the attempt outcomes (:mod:`.outcome`):

- the **reply time** of the node's answers, as TCP estimates a round trip
  (RFC 6298): a smoothed mean ``srtt`` and mean deviation ``rttvar``; only
  replies feed it, so it says what a healthy answer from this node looks
  like. ``srtt + 4 * rttvar`` is a high quantile of it (TCP's RTO);
- the **load** the balancer weighs: a moving average (weight 0.2, as
  MongoDB's server selection) of replies *and* penalties. A penalty (an
  attempt that timed out, a node that answered TIMEOUT) says "at least this
  slow", so silence makes a node look slow instead of unknown.

The attempt timeout of a node (see :meth:`AttemptTimeouts.for_node`) is a
multiple of its reply-time quantile with a floor, so a read stuck on a
stalled node is retried elsewhere long before the caller's deadline, while a
node that is simply slow keeps a timeout that fits it.
"""

from __future__ import annotations

import math

import attrs

__all__ = ["AttemptTimeouts", "LatencyTracker"]

#: Weight of the newest sample in the load average (MongoDB uses 0.2).
LOAD_WEIGHT = 0.2
#: RFC 6298's gains for the smoothed reply time and its deviation.
_ALPHA = 1 / 8
_BETA = 1 / 4


class LatencyTracker:
    """Reply-time and load estimates of one node (seconds)."""

    __slots__ = ("load", "replies", "rttvar", "srtt")

    def __init__(self) -> None:
        #: Smoothed reply time (None until the first reply).
        self.srtt: float | None = None
        #: Smoothed mean deviation of the reply time.
        self.rttvar = 0.0
        #: Moving average of replies and penalties (None until the first sample).
        self.load: float | None = None
        #: Replies seen.
        self.replies = 0

    def record_reply(self, seconds: float) -> None:
        """The node answered after ``seconds``."""
        seconds = max(0.0, seconds)
        self.replies += 1
        srtt = self.srtt
        if srtt is None:
            self.srtt = seconds
            self.rttvar = seconds / 2
        else:
            self.rttvar += _BETA * (abs(srtt - seconds) - self.rttvar)
            self.srtt = srtt + _ALPHA * (seconds - srtt)
        self._fold(seconds)

    def record_penalty(self, seconds: float) -> None:
        """The node did not answer within ``seconds`` (it is at least that slow).

        A penalty only ever raises the load: one below it says nothing new
        (a caller that gave up early proves no node fast).
        """
        load = self.load
        if load is None or seconds > load:
            self._fold(seconds)

    def _fold(self, seconds: float) -> None:
        load = self.load
        self.load = seconds if load is None else load + LOAD_WEIGHT * (seconds - load)

    @property
    def reply_quantile(self) -> float | None:
        """``srtt + 4 * rttvar``: a high quantile of the reply time (None: no reply yet)."""
        if self.srtt is None:
            return None
        return self.srtt + 4 * self.rttvar


@attrs.frozen(kw_only=True)
class AttemptTimeouts:
    """How long one attempt may wait for its reply before trying another node.

    ``factor`` times the node's reply-time quantile, at least ``minimum``
    seconds. A node that has not answered yet gets ``fallback`` (the typical
    quantile of the other nodes) times ``factor``, else ``minimum``.
    ``factor=0`` turns attempt timeouts off: attempts wait for the deadline.
    """

    factor: float = 3.0
    minimum: float = 0.25

    @property
    def enabled(self) -> bool:
        """Whether attempts get their own timeout at all."""
        return self.factor > 0

    def for_node(self, tracker: LatencyTracker, fallback: float | None = None) -> float:
        """The attempt timeout for a node with these estimates (inf when disabled)."""
        if not self.enabled:
            return math.inf
        return self._scaled(tracker, fallback, self.factor)

    def slow_threshold(self, tracker: LatencyTracker, fallback: float | None = None) -> float:
        """How long a wait makes a node *slower than usual*: its attempt timeout,
        also when attempt timeouts are off (then with the default factor, 3)."""
        return self._scaled(tracker, fallback, self.factor if self.enabled else 3.0)

    def _scaled(self, tracker: LatencyTracker, fallback: float | None, factor: float) -> float:
        quantile = tracker.reply_quantile
        if quantile is None:
            quantile = fallback
        if quantile is None:
            return self.minimum
        return max(self.minimum, factor * quantile)
