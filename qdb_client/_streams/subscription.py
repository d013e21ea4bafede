"""Table subscriptions: ``async with client.subscribe("t") as events: async for event in events``.

A subscription is a ``subscribe`` request (docs/protocol.md section 13.1):
the node answers with the subscription and the newest event id of the
cluster's change log, then pushes an EVENT for every change committed to
the table (by any client, on any node), in commit order, as credit allows.
The driver keeps at most ``subscription_credit`` events buffered or on their
way, granting more as the application takes them.

Entering the block waits for the node's answer, subscribing again on
another node as resuming would, all within ``timeout`` (default
``request_timeout``); past it the block raises
:class:`~qdb_client.errors.RequestTimeout`, and attempts that all failed
earlier raise :class:`~qdb_client.errors.SubscriptionLost` saying that
nothing was subscribed.

An established subscription holds no request slot on its connection
(docs/protocol.md section 13.1): it *pins* the connection, so the pool does
not close it as idle, and requests beside it have every slot. A node that
answers one ``subscribe`` twice breaks the protocol (one reply per
request): the second RESPONSE fails that attempt with
:class:`~qdb_client.errors.MessageError`, and the subscription is made
again as after a lost connection.

When the connection or the node is lost, the driver subscribes again on
any node with ``from_event`` = the id after the last event it received:
events already buffered are kept, every later change comes exactly once
(an id at or below the last one received, or before the subscription's
starting point when none was received yet, is dropped, should a node
repeat one). Resuming follows the stream's
:class:`~qdb_client._policies.resume.ResumePolicy`, with no overall
deadline. If the log was trimmed past that point the changes in between
are gone: :class:`~qdb_client.errors.SubscriptionGap` names the last event
delivered.

One task consumes a subscription: a second task iterating while the first
waits raises :class:`~qdb_client.errors.InvalidArgument`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import trio

from .._cluster import NodeState
from .._policies import Outcome, OutcomeKind, RetryRule, classify
from ..errors import (
    ClientClosed,
    ConnectionLost,
    InvalidArgument,
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
from ..validation import seconds_or_error
from . import attempt as attempts
from .attempt import Attempt
from .stream import DeliveredFacts, StreamHost, resume_policy
from .types import CHANGE_KINDS, ChangeEvent

__all__ = ["Subscription", "parse_change"]

logger = logging.getLogger("qdb_client.streams")

_MAX_U64 = 2**64 - 1
_NOT_NOW = (OutcomeKind.NO_NODE, OutcomeKind.CIRCUIT_OPEN)


def parse_change(data: Mapping[str, Any]) -> ChangeEvent:
    """An EVENT ``change`` body as a ChangeEvent; ProtocolError if malformed."""
    event_id, kind, table = data.get("event_id"), data.get("kind"), data.get("table")
    key, row = data.get("key"), data.get("row")
    if not (isinstance(event_id, int) and not isinstance(event_id, bool)):
        raise ProtocolError(f"change event without an integer event_id: {event_id!r:.60}")
    if not 0 < event_id <= _MAX_U64:
        raise ProtocolError("change event_id out of range")
    if kind not in CHANGE_KINDS or not isinstance(table, str):
        raise ProtocolError(f"change event with kind {kind!r:.40} and table {table!r:.60}")
    if not isinstance(key, int) or isinstance(key, bool):
        raise ProtocolError(f"change event with a non-integer key {key!r:.60}")
    if not isinstance(row, dict) or not all(isinstance(name, str) for name in row):
        raise ProtocolError("change event whose row is not a map of column names")
    return ChangeEvent(kind, table, key, dict(row), event_id)


class Subscription:
    """An open subscription; use it inside its ``async with`` block, from one task.

    ``async for event in subscription`` gives :class:`ChangeEvent` objects.
    ``last_event_id`` is the id of the last event delivered (None before the
    first); ``resumes`` counts the times it was re-established elsewhere.
    ``timeout`` bounds entering the block (default ``request_timeout``).
    """

    def __init__(
        self,
        host: StreamHost,
        table: str,
        *,
        where: str | None = None,
        from_event: int | None = None,
        timeout: float | None = None,
    ) -> None:
        if not isinstance(table, str) or not table or len(table) > 128:
            raise InvalidArgument(
                f"table must be a table name (1..128 characters), not {table!r:.60}"
            )
        if where is not None and (not isinstance(where, str) or not where.strip()):
            raise InvalidArgument(f"where must be an SQL expression (text), not {where!r:.60}")
        if from_event is not None and (
            isinstance(from_event, bool)
            or not isinstance(from_event, int)
            or not 0 <= from_event <= _MAX_U64
        ):
            raise InvalidArgument(
                f"from_event must be an event id (int >= 0), not {from_event!r:.60}"
            )
        self._timeout = (
            host.config.request_timeout
            if timeout is None
            else seconds_or_error(timeout, name="timeout", error=InvalidArgument)
        )
        self._host = host
        self._table = table
        self._where = where
        #: The ``from_event`` of the next subscribe (None: from now on).
        self._next_from = from_event
        self._window = host.config.subscription_credit
        self._policy = resume_policy(host.config)
        self._buffer: deque[ChangeEvent] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._attempt: Attempt | None = None
        self._ready = False
        self._granted = 0
        self._used = 0
        self._failure: tuple[QdbError, Outcome] | None = None
        self._corrupted: StreamCorrupted | None = None
        self._failed_nodes: list[Any] = []
        self._failures_since_progress = 0
        #: Drains (GOAWAY, retired connections) in a row since the last event.
        self._moves_since_progress = 0
        self._previous_delay: float | None = None
        self._received_id: int | None = None
        self._entered = self._admitted = self._closed = False
        #: A task is waiting in __anext__ (a second one is refused).
        self._consuming = False
        #: The last event handed to the application (None before the first).
        self.last_event_id: int | None = None
        #: The node's subscription id on the current connection.
        self.subscription_id: int | None = None
        #: Times the subscription was made again after a lost connection or node.
        self.resumes = 0
        #: Events dropped: at or below the last id received, or before the starting point.
        self.duplicates_dropped = 0

    # ------------------------------------------------------------- public

    @property
    def node(self) -> str | None:
        """The address of the node the subscription currently lives on (None between)."""
        attempt = self._attempt
        return attempt.address if attempt is not None else None

    async def __aenter__(self) -> Subscription:
        if self._entered:
            raise InvalidArgument("a subscription can be entered once")
        self._entered = True
        await self._host._admit()
        self._admitted = True
        try:
            await self._establish(trio.current_time() + self._timeout)
        except BaseException:
            self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._close()
        if exc_info[0] is None:
            await trio.lowlevel.checkpoint()
        else:
            # Only the schedule half: a Cancelled here would replace the block's error.
            await trio.lowlevel.cancel_shielded_checkpoint()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ChangeEvent:
        if not self._entered or self._closed:
            raise InvalidArgument("use a subscription inside its 'async with' block")
        await trio.lowlevel.checkpoint()
        if self._consuming:
            raise InvalidArgument(
                "another task is already waiting for this subscription's next event"
                " (consume a subscription from one task)"
            )
        self._consuming = True
        try:
            return await self._next_event()
        finally:
            self._consuming = False

    async def _next_event(self) -> ChangeEvent:
        while True:
            if self._corrupted is not None:
                self._close()
                raise self._corrupted
            if self._buffer:
                event = self._buffer.popleft()
                self.last_event_id = event.event_id
                self._grant()
                return event
            if self._attempt is None or self._failure is not None:
                await self._establish(math.inf)
                continue
            # Quiet is normal for a subscription; a node its health checks found DOWN
            # (a frozen process: no PONG) is not, and its connection is left for another.
            with trio.move_on_after(self._host.config.heartbeat_interval):
                await self._lot.park()
            self._check_node()

    # ------------------------------------------------------------ internals

    def _check_node(self) -> None:
        attempt = self._attempt
        if attempt is None or self._failure is not None or self._buffer:
            return
        if attempt.node is not None and attempt.node.state is NodeState.DOWN:
            why = f"{attempt.address} is DOWN (its health checks failed)"
            error = ConnectionLost(f"subscription left its node: {why}", request_sent=True)
            self._fail(attempt, error, classify(error, sent=True))
            attempt.abort_connection(why)

    def _grant(self) -> None:
        attempt = self._attempt
        if attempt is None or not self._ready or self._failure is not None:
            return
        room = self._window - len(self._buffer) - (self._granted - self._used)
        if room >= max(1, self._window // 2):
            self._granted += room
            attempt.grant(room)

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

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.stop(cancel=True)
        if self._admitted:
            self._admitted = False
            self._host._active -= 1
        self._buffer.clear()

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
