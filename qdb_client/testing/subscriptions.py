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
   credit it waits: the changes stay in the log, nothing is lost.

It ends with an ERROR: CANCELLED for a CANCEL, SHUTTING_DOWN when the node
drains, NOT_FOUND ``trimmed`` if its position falls out of the log. A closed
connection just ends it.
"""

from __future__ import annotations

import logging
import sqlite3
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
from .ledger import Slot
from .streamjob import InternalGuard
from .streams import in_thread

if TYPE_CHECKING:
    from .feeds import ConnectionFeeds

__all__ = ["MAX_EVENT_CREDIT", "POLL_SECONDS", "ServedSubscription"]

logger = logging.getLogger("qdb_client.testing")

#: Most events of credit outstanding on one subscription.
MAX_EVENT_CREDIT = 4096
#: Seconds between two looks at the shared log when nothing woke the subscription.
POLL_SECONDS = 0.2
#: Seconds between two trims of the log by one subscription.
TRIM_SECONDS = 10.0
_MAX_BATCH = 256


def _trimmed(oldest: int) -> RequestFailed:
    return RequestFailed(
        ErrorCode.NOT_FOUND,
        "the change log no longer holds the changes from that event on (trimmed)",
        details={"reason": "trimmed", "oldest_event_id": oldest},
    )


def _open_filter(path: str, table: LoggedTable, where: str) -> tuple[sqlite3.Connection, str]:
    """A read-only connection and the filter's query, checked to compile (thread side)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
    try:
        conn.execute("PRAGMA query_only = ON")
        guard = InternalGuard()
        conn.set_authorizer(guard)
        sql = where_sql(table, where)
        try:
            where_holds(conn, sql, table, {})
        except sqlite3.Error as exc:
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"the subscription's where expression can't be used: {exc}",
                details={"executed": False},
            ) from exc
        return conn, sql
    except BaseException:
        conn.close()
        raise


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
        reader: sqlite3.Connection | None = None
        try:
            with self._slot.scope, self._scope:
                await feeds.apply_faults(self._request)
                db = await in_thread(open_log_connection, feeds.database_path())
                table, position, newest, where = await self._establish(db)
                if where is not None:
                    reader, sql = await in_thread(_open_filter, feeds.database_path(), table, where)
                    where = sql
                response = Response(rid, {"subscription": rid, "last_event_id": newest})
                if not await feeds.send(response):
                    return
                self.answered = True
                self._free_slot()
                feeds.node.stats["subscriptions"] += 1
                await self._tail(db, reader, table, position, where)
        except RequestFailed as exc:
            reply = exc.to_message(rid)
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
            for conn in (db, reader):
                if conn is not None:
                    conn.close()

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
        self,
        db: sqlite3.Connection,
        reader: sqlite3.Connection | None,
        table: LoggedTable,
        position: int,
        where: str | None,
    ) -> None:
        feeds = self._feeds
        node = feeds.node
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
                if where is not None and reader is not None:
                    holds = await in_thread(where_holds, reader, where, table, change.row)
                    if not holds:
                        continue
                data = {
                    "event_id": change.event_id,
                    "kind": change.kind,
                    "table": table.name,
                    "key": change.key,
                    "row": change.row,
                }
                if not await feeds.send(Event("change", data, request_id=self.request_id)):
                    return
                self.credit -= 1
                node.stats["events_sent"] += 1

    async def _wait_credit(self) -> None:
        while self.credit <= 0:
            await self._credit_lot.park()
        await trio.lowlevel.checkpoint()
