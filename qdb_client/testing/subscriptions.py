"""Table subscriptions on the test node: ``subscribe`` (docs/protocol.md section 13.1).

A :class:`ServedSubscription` is one ``subscribe`` request on one connection:

1. it makes sure the table's changes are logged (:mod:`.changelog`: triggers
   created on the first subscription to the table, by any node), checks the
   ``where`` filter compiles, and that ``from_event`` is still in the log
   (else NOT_FOUND ``trimmed`` with ``details.oldest_event_id``);
2. it answers ``{"subscription", "last_event_id"}``, which frees its request
   slot (the subscription lives on, outside ``max_in_flight``);
3. it tails the log: the changes after its position, in event id order,
   filtered, one EVENT each, as credit allows. It polls the shared file a
   few times a second, and at once when this node commits a write. Without
   credit it waits: the changes stay in the log, nothing is lost. Each row's
   values are converted by their columns' declared types as a query's are
   (:func:`typed_row`); the ``where`` filter sees them as stored.

It ends with an ERROR: CANCELLED for a CANCEL, SHUTTING_DOWN when the node
drains, NOT_FOUND ``trimmed`` if its position falls out of the log. A closed
connection just ends it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import ErrorCode, Event, Request, Response, error_message
from ._failure import RequestFailed
from .arguments import arg
from .changelog import (
    LoggedTable,
    ensure_logged,
    newest_event_id,
    open_log_connection,
    read_changes,
    trim,
    trimmed_through,
    where_holds,
    where_sql,
)
from .jobs import virtual_time, wait_for_thread
from .ledger import Slot
from .streamjob import InternalGuard
from .streams import in_thread, storage_failure
from .typed import converters

if TYPE_CHECKING:
    from .feeds import ConnectionFeeds

__all__ = [
    "FILTER_SECONDS",
    "MAX_EVENT_CREDIT",
    "POLL_SECONDS",
    "ServedSubscription",
    "WhereFilter",
    "typed_row",
]

logger = logging.getLogger("qdb_client.testing")

#: Most events of credit outstanding on one subscription.
MAX_EVENT_CREDIT = 4096
#: Seconds between two looks at the shared log when nothing woke the subscription.
POLL_SECONDS = 0.2
#: Seconds between two trims of the log by one subscription.
TRIM_SECONDS = 10.0
_MAX_BATCH = 256
#: Seconds of SQLite work a subscription's ``where`` filter may take on one row (the
#: node's default: ``NodeFeeds.filter_seconds``).
FILTER_SECONDS = 1.0
#: VM instructions between two checks of a filter's budget and cancel flag.
_PROGRESS_STEPS = 1000


def _trimmed(oldest: int) -> RequestFailed:
    return RequestFailed(
        ErrorCode.NOT_FOUND,
        "the change log no longer holds the changes from that event on (trimmed)",
        details={"reason": "trimmed", "oldest_event_id": oldest},
    )


def typed_row(table: LoggedTable) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """What turns a logged row of ``table`` into the values a query of it returns:
    each column converted by its declared type, as in query results (:mod:`.typed`)."""
    readers = converters(list(table.decltypes.values()))
    if readers is None:
        return lambda row: row
    by_column = {
        name: reader
        for name, reader in zip(table.decltypes, readers, strict=True)
        if reader is not None
    }

    def typed(row: dict[str, Any]) -> dict[str, Any]:
        return {
            name: value
            if value is None or (reader := by_column.get(name)) is None
            else reader(value)
            for name, value in row.items()
        }

    return typed


class WhereFilter:
    """A subscription's ``where`` filter: its query (:func:`~.changelog.where_sql`) on a
    read-only connection of its own, each evaluation within a budget of real time.

    Like every SQL job of the node, an evaluation runs in a worker thread
    (inline under a MockClock) that is never abandoned: a progress handler
    ends it at its budget, and :meth:`cancel` (CANCEL, the node draining, the
    connection closing) interrupts it, so no filter pins a thread or keeps the
    node from stopping.
    """

    def __init__(self, path: str, table: LoggedTable, where: str) -> None:
        self._path = path
        self._table = table
        self._sql = where_sql(table, where)
        self._guard = InternalGuard()
        self._conn: sqlite3.Connection | None = None
        self._row: dict[str, Any] = {}
        self._budget = 0.0
        self._deadline = 0.0
        self._cancelled = False
        self._timed_out = False

    async def check(self, budget: float, per_event: float) -> None:
        """Open the connection and evaluate the filter on a row of NULLs, within
        ``budget`` (the request's time left) and ``per_event``: INVALID_REQUEST if it
        can't be used (an error, or longer than ``per_event``), TIMEOUT at the deadline."""
        if budget <= 0:
            raise RequestFailed(ErrorCode.TIMEOUT, "deadline passed", details={"executed": False})
        ok, value = await self._evaluate({}, min(budget, per_event))
        if ok:
            return
        if self._conn is None and isinstance(value, sqlite3.Error):
            raise storage_failure(value, "the database") from value
        if self._timed_out and budget < per_event:
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                "the where expression could not be checked before the request deadline",
                details={"executed": False},
            ) from value
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"the subscription's where expression can't be used: {self._why(value, per_event)}",
            details={"executed": False, "reason": "where"},
        ) from value

    async def holds(self, event_id: int, row: dict[str, Any], per_event: float) -> bool:
        """Whether ``row`` (of event ``event_id``) satisfies the filter; INVALID_REQUEST
        naming the event if the filter fails on it or runs longer than ``per_event``."""
        ok, value = await self._evaluate(row, per_event)
        if ok:
            return bool(value)
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"the subscription's where expression failed on event {event_id}:"
            f" {self._why(value, per_event)}; the subscription ended there (subscribing"
            f" again from_event {event_id + 1} skips that change)",
            details={"reason": "where", "event_id": event_id},
        ) from value

    def close(self) -> None:
        """Close the connection (no evaluation runs: each is awaited to its end)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------ event loop side

    async def _evaluate(self, row: dict[str, Any], budget: float) -> tuple[bool, Any]:
        self._row, self._budget = row, budget
        if virtual_time():
            await trio.lowlevel.checkpoint()
            ok, value = self.capture()
        else:
            ok, value = await wait_for_thread(self)
        await trio.lowlevel.checkpoint()  # a cancel that interrupted it is raised here
        return ok, value

    def cancel(self) -> None:
        """Stop the running evaluation (event loop side)."""
        self._cancelled = True
        conn = self._conn
        if conn is not None:
            try:
                conn.interrupt()
            except sqlite3.Error:
                pass

    def _why(self, exc: BaseException, per_event: float) -> str:
        if self._timed_out:
            return f"it ran longer than {per_event:g} s on one row"
        if self._guard.internal is not None:
            return f"it uses {self._guard.internal}, which is not allowed"
        return str(exc)

    # ---------------------------------------------------------------- thread side

    def capture(self) -> tuple[bool, Any]:
        """One evaluation (thread side): ``(True, holds)`` or ``(False, exception)``."""
        self._timed_out = False
        self._deadline = time.monotonic() + self._budget
        try:
            conn = self._conn
            if conn is None:
                conn = sqlite3.connect(
                    self._path,
                    check_same_thread=False,
                    isolation_level=None,
                    timeout=max(self._budget, 0.001),
                )
                try:
                    conn.execute("PRAGMA query_only = ON")
                    conn.set_progress_handler(self._progress, _PROGRESS_STEPS)
                    conn.set_authorizer(self._guard)
                except BaseException:
                    conn.close()
                    raise
                self._conn = conn
            return True, where_holds(conn, self._sql, self._table, self._row)
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:
            return False, exc

    def _progress(self) -> int:
        if self._cancelled:
            return 1
        if time.monotonic() >= self._deadline:
            self._timed_out = True
            return 1
        return 0


class ServedSubscription:
    """One ``subscribe`` request, from its arrival until it ends."""

    def __init__(
        self,
        feeds: ConnectionFeeds,
        request: Request,
        slot: Slot,
        deadline: float,
        free_slot: Callable[[], None],
    ) -> None:
        self._feeds = feeds
        self._request = request
        self._slot = slot
        self._deadline = deadline
        self._free_slot = free_slot
        self.request_id = request.request_id
        self.credit = 0
        self._credit_lot = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()
        self._stop_with: RequestFailed | None = None
        self._cancelled = False
        #: Whether the RESPONSE went out (the subscription is established).
        self.answered = False

    def add_credit(self, pages: int) -> None:
        """STREAM_CREDIT on the subscription's id."""
        if self.credit + pages > MAX_EVENT_CREDIT:
            self.stop(
                RequestFailed(
                    ErrorCode.PARSE_ERROR,
                    f"STREAM_CREDIT would raise the outstanding credit above {MAX_EVENT_CREDIT}",
                )
            )
            return
        self.credit += pages
        self._credit_lot.unpark_all()

    def stop(self, error: RequestFailed) -> None:
        """End the subscription with ``error`` at its next step."""
        if self._stop_with is None:
            self._stop_with = error
            self._scope.cancel()

    def cancel(self) -> None:
        """A CANCEL of the established subscription."""
        self._cancelled = True
        self._scope.cancel()

    async def run(self) -> None:
        """Serve the subscription until it ends; every reply is written here."""
        feeds = self._feeds
        rid = self.request_id
        reply: Any = None
        db: sqlite3.Connection | None = None
        where: WhereFilter | None = None
        try:
            with self._slot.scope, self._scope:
                await feeds.apply_faults(self._request)
                db = await in_thread(open_log_connection, feeds.database_path())
                table, position, newest, expression = await self._establish(db)
                if expression is not None:
                    where = WhereFilter(feeds.database_path(), table, expression)
                    budget = self._deadline - trio.current_time()
                    await where.check(budget, feeds.node.filter_seconds)
                response = Response(rid, {"subscription": rid, "last_event_id": newest})
                if not await feeds.send(response):
                    return
                self.answered = True
                self._free_slot()
                feeds.node.stats["subscriptions"] += 1
                await self._tail(db, where, table, position)
        except RequestFailed as exc:
            reply = exc.to_message(rid)
        except sqlite3.Error as exc:  # the log's own SQL: the subscription ends, not the connection
            logger.info("%s: subscription %d: %s", feeds.node_id(), rid, exc)
            reply = storage_failure(exc, "the change log").to_message(rid)
        finally:
            with trio.move_on_after(2.0, shield=True):
                if self._cancelled or self._slot.cancel_requested:
                    reply = error_message(
                        rid, ErrorCode.CANCELLED, f"subscription {rid} was cancelled"
                    )
                elif reply is None and self._stop_with is not None:
                    reply = self._stop_with.to_message(rid)
                if reply is not None:
                    await feeds.send(reply)
            if where is not None:
                where.close()
            if db is not None:
                db.close()

    async def _establish(self, db: sqlite3.Connection) -> tuple[LoggedTable, int, int, str | None]:
        args = self._request.args
        name = arg(args, "table", str)
        where = arg(args, "where", str, None)
        from_event = arg(args, "from_event", int, None)
        credit = arg(args, "credit", int)
        if not 1 <= credit <= MAX_EVENT_CREDIT or (from_event is not None and from_event < 0):
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"'credit' must be within 1..{MAX_EVENT_CREDIT} and 'from_event' a uint",
            )
        self.credit = credit
        node = self._feeds.node
        try:
            table = await in_thread(ensure_logged, db, name, node.clock())
            await in_thread(trim, db, node.clock() - node.change_retention)
            newest = await in_thread(newest_event_id, db)
            through = await in_thread(trimmed_through, db, table.name)
        except sqlite3.Error as exc:
            raise RequestFailed(ErrorCode.UNAVAILABLE, f"the change log is busy: {exc}") from exc
        if from_event is not None and from_event <= through:
            raise _trimmed(through + 1)
        position = from_event if from_event is not None else newest + 1
        return table, position, newest, where

    async def _tail(
        self, db: sqlite3.Connection, where: WhereFilter | None, table: LoggedTable, position: int
    ) -> None:
        feeds = self._feeds
        node = feeds.node
        typed = typed_row(table)
        trimmed_at = trio.current_time()
        while True:
            await self._wait_credit()
            limit = min(self.credit, _MAX_BATCH)
            changes = await in_thread(read_changes, db, table.name, position, limit)
            if not changes:
                if trio.current_time() - trimmed_at >= TRIM_SECONDS:
                    trimmed_at = trio.current_time()
                    await in_thread(trim, db, node.clock() - node.change_retention)
                    through = await in_thread(trimmed_through, db, table.name)
                    if through >= position:
                        raise _trimmed(through + 1)
                with trio.move_on_after(POLL_SECONDS):
                    await node.commits.park()
                continue
            for change in changes:
                position = change.event_id + 1
                if where is not None and not await where.holds(
                    change.event_id, change.row, node.filter_seconds
                ):
                    continue
                data = {
                    "event_id": change.event_id,
                    "kind": change.kind,
                    "table": table.name,
                    "key": change.key,
                    "row": typed(change.row),
                }
                if not await feeds.send(Event("change", data, request_id=self.request_id)):
                    return
                self.credit -= 1
                node.stats["events_sent"] += 1

    async def _wait_credit(self) -> None:
        while self.credit <= 0:
            await self._credit_lot.park()
        await trio.lowlevel.checkpoint()
