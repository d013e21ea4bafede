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

import math
from collections import deque
from typing import Any

import trio

from .._cluster import NodeState
from .._policies import Outcome, classify
from ..errors import ConnectionLost, InvalidArgument, QdbError, StreamCorrupted
from ..validation import seconds_or_error
from .attempt import Attempt
from .stream import StreamHost, resume_policy
from .subscription_attempts import MAX_U64, SubscriptionAttempts, parse_change
from .types import ChangeEvent

__all__ = ["Subscription", "parse_change"]


class Subscription(SubscriptionAttempts):
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
            or not 0 <= from_event <= MAX_U64
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
