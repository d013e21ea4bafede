"""The attempts of a subscription: subscribing and subscribing again, and what
their connections feed in.

A :class:`~.subscription.Subscription` is one ``subscribe`` request, then
another (``from_event`` = the id after the last event received) each time the
connection or the node is lost (each an :class:`~.attempt.Attempt`). This
module holds that producer side: ``_establish`` subscribes and waits for the
node's answer, ``_after_failure`` asks the
:class:`~qdb_client._policies.resume.ResumePolicy` whether and when to go on
(a drain is a move, not a failure), ``_start`` sends the next ``subscribe``
away from the nodes that failed it, and ``_give_up`` makes the error that
ends the subscription (the refusal as is, RequestTimeout, SubscriptionLost or
SubscriptionGap). ``_on_frame`` / ``_on_failed``, called by the connection,
take the node's answer, check each EVENT against the credit granted
(:func:`parse_change` reads its body), drop repeated ids and buffer the rest,
or record why the attempt can't go on.

It is separate from :mod:`.subscription`, which holds the consumer side (the
public API, the argument checks, the event buffer the application drains,
granting credit, the DOWN-node check and closing). :class:`SubscriptionAttempts`
is a base class of Subscription, whose ``__init__`` sets the state it uses.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from typing import Any

import trio

from .._policies import Outcome, OutcomeKind, RetryRule, classify
from .._policies.resume import ResumePolicy
from ..errors import (
    ClientClosed,
    MessageError,
    NotFound,
    ProtocolError,
    QdbError,
    RequestTimeout,
    StreamCorrupted,
    SubscriptionGap,
    SubscriptionLost,
)
from ..protocol import BadMessage, Error, Event, Message, Response, error_from_message
from . import attempt as attempts
from .attempt import Attempt
from .stream import DeliveredFacts, StreamHost
from .types import CHANGE_KINDS, ChangeEvent

__all__ = ["MAX_U64", "SubscriptionAttempts", "parse_change"]

logger = logging.getLogger("qdb_client.streams")

MAX_U64 = 2**64 - 1
_NOT_NOW = (OutcomeKind.NO_NODE, OutcomeKind.CIRCUIT_OPEN)


def parse_change(data: Mapping[str, Any]) -> ChangeEvent:
    """An EVENT ``change`` body as a ChangeEvent; ProtocolError if malformed."""
    event_id, kind, table = data.get("event_id"), data.get("kind"), data.get("table")
    key, row = data.get("key"), data.get("row")
    if not (isinstance(event_id, int) and not isinstance(event_id, bool)):
        raise ProtocolError(f"change event without an integer event_id: {event_id!r:.60}")
    if not 0 < event_id <= MAX_U64:
        raise ProtocolError("change event_id out of range")
    if kind not in CHANGE_KINDS or not isinstance(table, str):
        raise ProtocolError(f"change event with kind {kind!r:.40} and table {table!r:.60}")
    if not isinstance(key, int) or isinstance(key, bool):
        raise ProtocolError(f"change event with a non-integer key {key!r:.60}")
    if not isinstance(row, dict) or not all(isinstance(name, str) for name in row):
        raise ProtocolError("change event whose row is not a map of column names")
    return ChangeEvent(kind, table, key, dict(row), event_id)


class SubscriptionAttempts:
    """The attempts of :class:`~.subscription.Subscription` (its state is set there)."""

    _host: StreamHost
    _table: str
    _where: str | None
    _timeout: float
    #: The ``from_event`` of the next subscribe (None: from now on).
    _next_from: int | None
    _window: int
    _policy: ResumePolicy
    _buffer: deque[ChangeEvent]
    _lot: trio.lowlevel.ParkingLot
    _attempt: Attempt | None
    _ready: bool
    _granted: int
    _used: int
    #: Why the current attempt can't go on, and its classification.
    _failure: tuple[QdbError, Outcome] | None
    _corrupted: StreamCorrupted | None
    _failed_nodes: list[Any]
    _failures_since_progress: int
    _moves_since_progress: int
    _previous_delay: float | None
    _received_id: int | None
    last_event_id: int | None
    subscription_id: int | None
    resumes: int
    duplicates_dropped: int

    # ------------------------------------------------ subscribing and resuming

    async def _establish(self, deadline: float) -> None:
        """Subscribe (again), waiting for the node's answer; resumes per the policy,
        within ``deadline`` (inf: none)."""
        config = self._host.config
        while True:
            failure, self._failure = self._failure, None
            if failure is not None or self._attempt is not None:
                await self._after_failure(failure, deadline)
            until = min(trio.current_time() + config.request_timeout, deadline)
            try:
                with trio.fail_at(until):
                    await self._start(until)
                    while not self._ready and self._failure is None:
                        await self._lot.park()
            except trio.TooSlowError:
                if self._failure is None:
                    error = RequestTimeout("no answer to subscribe in time", timeout=0.0)
                    sent = self._attempt is not None
                    self._failure = (error, classify(None, sent=sent, attempt_timed_out=True))
            except QdbError as exc:
                if self._host._closed:
                    raise
                self._failure = (exc, classify(exc, sent=getattr(exc, "request_sent", False)))
            if self._failure is None and self._ready:
                return

    async def _after_failure(
        self, failure: tuple[QdbError, Outcome] | None, deadline: float
    ) -> None:
        old, self._attempt = self._attempt, None
        # A drain (GOAWAY, a connection the pool retires) is a move, not a failure:
        # it neither counts toward the resume limit nor puts the node aside. Only
        # the first since the last event: drains in a row (a node that GOAWAYs
        # every subscribe) back off and count, so they end instead of spinning.
        drained = failure is not None and failure[1].retry is RetryRule.REQUEUE
        moved = drained and self._moves_since_progress == 0
        if drained:
            self._moves_since_progress += 1
        if old is not None:
            old.stop(cancel=True)  # a subscription has no spool: CANCEL is harmless
            if not moved and old.node is not None and old.node not in self._failed_nodes:
                self._failed_nodes.append(old.node)
        if failure is None:
            return
        error, outcome = failure
        decision = self._policy.decide(
            outcome,
            attempts_done=self._failures_since_progress,
            remaining=deadline - trio.current_time(),
            rng=self._host._rng,
            previous_delay=self._previous_delay,
            error=error,
        )
        logger.debug("subscription to %s failed: %s", self._table, decision.reason)
        if not decision.retry:
            left = deadline - trio.current_time() - decision.delay
            out_of_time = left < self._policy.min_attempt_time
            raise self._give_up(error, outcome, decision.reason, out_of_time=out_of_time)
        delay = decision.delay
        if drained and not moved:
            delay = max(
                delay,
                self._policy.backoff.delay(
                    self._failures_since_progress, self._host._rng, self._previous_delay
                ),
            )
        if not moved:
            self._failures_since_progress += 1
        self._previous_delay = delay
        if delay > 0:
            await trio.sleep(delay)

    async def _start(self, until: float) -> None:
        args: dict[str, Any] = {"table": self._table, "credit": self._window - len(self._buffer)}
        args["credit"] = max(1, args["credit"])
        if self._where is not None:
            args["where"] = self._where
        if self._received_id is not None:
            args["from_event"] = self._received_id + 1
        elif self._next_from is not None:
            args["from_event"] = self._next_from
        if self.subscription_id is not None or self._failures_since_progress:
            self.resumes += 1
        self._ready = False
        self._granted, self._used = args["credit"], 0
        self._attempt = await attempts.start(
            self,
            self._host._require_cluster(),
            "subscribe",
            args,
            exclude=self._failed_nodes,
            deadline_ms=attempts.ms_until(until, 3600),
        )

    def _give_up(
        self, error: QdbError, outcome: Outcome, reason: str, *, out_of_time: bool
    ) -> QdbError:
        """The error that ends the subscription: a refusal of the first subscribe
        as is, RequestTimeout past the entry's deadline, else SubscriptionLost
        (or SubscriptionGap) with the last event delivered."""
        last = self._received_id
        if last is None and self._next_from is not None:
            last = self._next_from - 1  # the position it was to continue after
        facts: DeliveredFacts = {
            "last_event_id": last,
            "resume_attempts": self._failures_since_progress,
        }
        if isinstance(error, NotFound) and error.details.get("reason") == "trimmed":
            oldest = error.details.get("oldest_event_id")
            gap = SubscriptionGap(
                f"the change log of {self._table!r} was trimmed past event {last}: the"
                f" changes after it are gone (oldest kept: {oldest})",
                reason="trimmed",
                oldest_event_id=oldest if isinstance(oldest, int) else None,
                **facts,
            )
            gap.__cause__ = error
            return gap
        refused = outcome.retry is RetryRule.NEVER and outcome.kind not in _NOT_NOW
        never = self.subscription_id is None
        if (refused and never) or isinstance(error, ClientClosed):
            return error  # never subscribed (the request itself was refused), or closed
        if never and out_of_time:
            timeout = RequestTimeout(
                f"could not subscribe to {self._table!r} within {self._timeout:g} s: {reason}",
                timeout=self._timeout,
                request_sent=getattr(error, "request_sent", True),
            )
            timeout.__cause__ = error
            return timeout
        if never:
            message = f"could not subscribe to {self._table!r} (never subscribed): {reason}"
        else:
            message = (
                f"the subscription to {self._table!r} could not be resumed after event"
                f" {last}: {reason}"
            )
        lost = SubscriptionLost(message, reason=reason, **facts)
        lost.__cause__ = error
        return lost

    # ----------------------------------------- connection side (the feed)

    def _fail(self, attempt: Attempt, error: QdbError, outcome: Outcome) -> None:
        if attempt is self._attempt and self._failure is None:
            self._failure = (error, outcome)
        self._lot.unpark_all()

    def _on_frame(self, attempt: Attempt, message: Message | BadMessage) -> bool:
        if attempt is not self._attempt:
            return True
        if isinstance(message, Event):
            if message.topic == "change" and self._ready:
                self._on_event(attempt, message)
            return True
        error: QdbError
        if isinstance(message, Response):
            if self._ready or attempt.pending.done:
                # One reply per request: a node that repeats it can't be trusted
                # with this subscription; subscribe again (the CANCEL ends this one).
                error = MessageError(
                    f"{attempt.address} answered subscribe request {attempt.request_id} twice"
                )
                self._fail(attempt, error, classify(error, sent=True))
            else:
                self._on_subscribed(attempt, message.result)
            return False  # the connection delivers it: the request's slot is freed
        if isinstance(message, Error):
            error = error_from_message(message, node=attempt.address)
            self._fail(attempt, error, classify(error, sent=True))
            return attempt.pending.done
        if isinstance(message, BadMessage):
            # An event lost in transit: subscribe again after the last one received.
            error = message.error
            self._fail(attempt, error, classify(error, sent=True))
            return attempt.pending.done
        return True

    def _on_subscribed(self, attempt: Attempt, result: Any) -> None:
        sub = result.get("subscription") if isinstance(result, dict) else None
        last = result.get("last_event_id") if isinstance(result, dict) else None
        if not (isinstance(sub, int) and isinstance(last, int)) or isinstance(last, bool):
            error = ProtocolError(f"malformed subscribe result: {result!r:.100}")
            self._fail(attempt, error, classify(error, sent=True))
            return
        self.subscription_id = sub
        if self._received_id is None and self._next_from is None:
            self._next_from = last + 1  # a lost connection must not lose what follows
        self._ready = True
        attempt.pin()  # no request slot (section 13.1), but not idle either
        logger.debug("subscribed to %s on %s (after event %d)", self._table, attempt.address, last)
        self._lot.unpark_all()

    def _on_event(self, attempt: Attempt, message: Event) -> None:
        if self._used >= self._granted:
            self._corrupted = StreamCorrupted(
                f"{attempt.address} sent more events than the {self._granted} credited",
                reason="credit overrun",
                last_event_id=self.last_event_id,
            )
        else:
            self._used += 1
            try:
                event = parse_change(message.data)
            except ProtocolError as exc:
                self._corrupted = StreamCorrupted(
                    f"malformed change event from {attempt.address}: {exc}",
                    reason="malformed event",
                    last_event_id=self.last_event_id,
                )
            else:
                if event.event_id <= self._floor():
                    self.duplicates_dropped += 1
                    self._grant_back()
                else:
                    self._received_id = event.event_id
                    self._buffer.append(event)
                    self._failures_since_progress = self._moves_since_progress = 0
                    self._failed_nodes.clear()
        self._lot.unpark_all()

    def _floor(self) -> int:
        """The highest event id not to deliver: the last one received, else the
        one before the subscription's starting point (``from_event``)."""
        if self._received_id is not None:
            return self._received_id
        return self._next_from - 1 if self._next_from is not None else 0

    def _grant_back(self) -> None:
        """A dropped duplicate took a credit the buffer never used: give it back."""
        if self._attempt is not None:
            self._granted += 1
            self._attempt.grant(1)

    def _on_failed(self, attempt: Attempt, error: QdbError) -> None:
        if attempt is not self._attempt:
            return
        error = attempts.connection_error(error, client_closed=self._host._closed)
        self._fail(attempt, error, classify(error, sent=True))
        # Let go of the connection now, not when the consumer next reads: a pin
        # would keep a retiring connection open (and counted) until then.
        attempt.stop(cancel=True)
