"""Result streams on the test node: ``query_stream`` and ``resume_stream`` (section 12).

A :class:`ServedStream` is one such request on one connection, holding its
request slot until STREAM_END or its ERROR:

1. ``query_stream`` spools the whole result first (:mod:`.streamjob`, in the
   shared file, within the request's deadline); ``resume_stream`` finds the
   spool of its token (any node's: the file is shared), checks it belongs to
   the caller, and continues after the token's page. A token never issued,
   or another user's, is NOT_FOUND ``unknown``; one whose spool expired or was
   released is NOT_FOUND ``expired``.
2. Pages go out as the client's credit allows (STREAM_CREDIT adds to it, at
   most 1024 outstanding), read from the spool one at a time, already
   encoded (the bytes the digest covers). No credit for ``stream_retention``:
   ERROR TIMEOUT, the spool kept.
3. STREAM_END closes the request. The spool stays ``stream_retention``
   seconds (counted from the last page sent or resume) so that a client
   whose connection broke just before it can still resume; a CANCEL of the
   finished stream's id releases it at once.

A CANCEL while it runs stops it (CANCELLED) and deletes the spool. The
connection closing stops it and keeps the spool. A node that drains ends
its streams with SHUTTING_DOWN (retryable): their clients resume elsewhere.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import (
    ErrorCode,
    Request,
    StreamEnd,
    encode_body,
    error_message,
)
from ..protocol.stream_codec import encode_stream_page
from ._failure import RequestFailed
from .arguments import arg, sql_args
from .jobs import virtual_time, wait_for_thread
from .ledger import Slot
from .spool import (
    Spool,
    delete_spool,
    expire_spools,
    lookup_spool,
    make_token,
    open_spool_connection,
    parse_token,
    read_page,
    touch_spool,
)
from .streamjob import SpoolJob, Stopped
from .transactions import aborted

if TYPE_CHECKING:
    from .feeds import ConnectionFeeds

__all__ = ["MAX_CREDIT", "PAGE_OVERHEAD", "ServedStream", "in_thread", "storage_failure"]

logger = logging.getLogger("qdb_client.testing")

#: Most credit outstanding on one stream (docs/protocol.md section 12.2).
MAX_CREDIT = 1024
#: Bytes of a STREAM_PAGE frame besides its rows and page 0's columns and types.
PAGE_OVERHEAD = 128
_MAX_PAGE_ROWS = 100_000


async def in_thread(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a worker thread (inline in virtual time, as the storage does)."""
    if virtual_time():
        await trio.lowlevel.checkpoint()
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


def storage_failure(exc: sqlite3.Error, what: str) -> RequestFailed:
    """The ERROR for an SQLite error of the node's own work on a stream or a
    subscription (``what``: the spool, the change log): UNAVAILABLE (retryable)
    while the file is busy or locked, INTERNAL otherwise."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    busy = name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
    return RequestFailed(
        ErrorCode.UNAVAILABLE if busy else ErrorCode.INTERNAL,
        f"{what} can't be used now: {exc}",
        details={"executed": False, "sqlite_error": name},
    )


def _count(args: Any, key: str, low: int, high: int, default: Any = None) -> int:
    value = arg(args, key, int, default)
    if value is None or not low <= value <= high:
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST, f"argument {key!r} must be an integer within {low}..{high}"
        )
    return int(value)


def _not_found(reason: str, text: str) -> RequestFailed:
    return RequestFailed(ErrorCode.NOT_FOUND, text, details={"reason": reason})


class ServedStream:
    """One ``query_stream`` or ``resume_stream`` request, from its arrival to its end."""

    def __init__(self, feeds: ConnectionFeeds, request: Request, slot: Slot, deadline: float):
        self._feeds = feeds
        self._request = request
        self._slot = slot
        self._deadline = deadline
        self.request_id = request.request_id
        self.credit = 0
        self._credit_lot = trio.lowlevel.ParkingLot()
        #: Set to end the stream with this ERROR (credit overrun, the node draining).
        self._stop_with: RequestFailed | None = None
        self._scope = trio.CancelScope()
        self._spool: Spool | None = None
        self._touched = -math.inf
        self._ended = False

    # ---------------------------------------------------------- from the reader

    def add_credit(self, pages: int) -> None:
        """STREAM_CREDIT for this stream."""
        if self.credit + pages > MAX_CREDIT:
            self.stop(
                RequestFailed(
                    ErrorCode.PARSE_ERROR,
                    f"STREAM_CREDIT would raise the outstanding credit above {MAX_CREDIT} pages",
                )
            )
            return
        self.credit += pages
        self._credit_lot.unpark_all()

    def stop(self, error: RequestFailed) -> None:
        """End the stream with ``error`` at its next step (the spool stays)."""
        if self._stop_with is None:
            self._stop_with = error
            self._scope.cancel()

    # ------------------------------------------------------------------ serving

    async def run(self) -> None:
        """Serve the request to its end; every outcome is written by this method."""
        feeds = self._feeds
        rid = self.request_id
        reply: Any = None
        db: sqlite3.Connection | None = None
        try:
            with self._slot.scope, self._scope:
                await feeds.apply_faults(self._request)
                db = await in_thread(open_spool_connection, feeds.spool_path())
                if self._request.method == "query_stream":
                    spool, first = await self._open(db), 0
                else:
                    spool, first = await self._resume(db)
                self._spool = spool
                await self._send_pages(db, spool, first)
                return
        except RequestFailed as exc:
            reply = exc.to_message(rid)
        except Stopped:
            pass  # cancelled while spooling: nothing was kept
        except sqlite3.Error as exc:  # the spool's own SQL: the stream ends, not the connection
            logger.info("%s: stream %d: %s", feeds.node_id(), rid, exc)
            reply = storage_failure(exc, "the stream's spool").to_message(rid)
        finally:
            with trio.move_on_after(2.0, shield=True):
                await self._after(db, reply)

    async def _after(self, db: sqlite3.Connection | None, reply: Any) -> None:
        """Write the outcome, keep or delete the spool, close the spool connection."""
        feeds = self._feeds
        spool = self._spool
        try:
            if self._slot.cancel_requested:
                if spool is not None and db is not None:
                    await self._quietly(delete_spool, db, spool.stream_id)
                text = f"stream {self.request_id} was cancelled; its spool is deleted"
                reply = error_message(
                    self.request_id, ErrorCode.CANCELLED, text, details={"executed": False}
                )
            elif self._stop_with is not None and reply is None and not self._ended:
                reply = self._stop_with.to_message(self.request_id)
            if spool is not None and db is not None and not self._slot.cancel_requested:
                expires = feeds.node.clock() + feeds.node.stream_retention
                await self._quietly(touch_spool, db, spool.stream_id, expires)
            if reply is not None:
                await feeds.send(reply)
        finally:
            if db is not None:
                db.close()

    async def _quietly(self, fn: Any, *args: Any) -> None:
        """``fn(*args)`` in a thread, an SQLite error only logged: the outcome goes out
        anyway (a spool not deleted or not kept longer expires in its time)."""
        try:
            await in_thread(fn, *args)
        except sqlite3.Error as exc:
            name = getattr(fn, "__name__", fn)
            logger.info("%s: stream %d: %s: %s", self._feeds.node_id(), self.request_id, name, exc)

    async def _open(self, db: sqlite3.Connection) -> Spool:
        feeds = self._feeds
        args = self._request.args
        sql, params = sql_args(args)
        max_frame = feeds.max_frame()
        page_rows = _count(args, "page_rows", 1, _MAX_PAGE_ROWS)
        limit = max(1024, max_frame - 1024)
        page_bytes = _count(args, "page_bytes", 1024, limit, limit)
        self.credit = _count(args, "credit", 1, MAX_CREDIT)
        tx_id = arg(args, "tx", str, None)
        node = feeds.node
        await in_thread(expire_spools, db, node.clock())
        budget = self._deadline - trio.current_time()
        if budget <= 0:
            raise RequestFailed(ErrorCode.TIMEOUT, "deadline passed", details={"executed": False})
        transactions, tx = self._transaction(tx_id)
        job = SpoolJob(
            feeds.database_path(),
            feeds.spool_path(),
            sql,
            params,
            budget=budget,
            column_types=feeds.column_types,
            first_overhead=_first_overhead,
            writer={
                "scope": feeds.scope(),
                "page_rows": page_rows,
                "page_bytes": page_bytes,
                "max_row": max_frame - PAGE_OVERHEAD,
                "expires_at": node.clock() + node.stream_retention,
            },
            read_conn=None if tx is None else tx.conn,
        )
        if tx is None:
            ok, value = await _run(job)
        else:  # in the transaction's turn, on its connection: its snapshot, its writes

            async def in_turn() -> tuple[bool, Any]:
                ok, value = await _run(job)
                if not ok and isinstance(value, RequestFailed):
                    raise value  # the transaction's rules apply (a TIMEOUT ends it)
                return ok, value

            ok, value = await transactions.run(tx, self.request_id, self._deadline, in_turn)
        if ok:
            self._spool = value  # a CANCEL that came too late still deletes it
        await trio.lowlevel.checkpoint()  # a CANCEL during the job is raised here
        if not ok:
            raise value
        node.stats["streams_opened"] += 1
        logger.debug(
            "%s: stream %d spooled %d rows in %d pages",
            feeds.node_id(),
            self.request_id,
            value.row_count,
            value.pages,
        )
        return value

    def _transaction(self, tx_id: str | None) -> tuple[Any, Any]:
        """The session's transactions and transaction ``tx_id`` (None, None without one)."""
        if tx_id is None:
            return None, None
        state = self._feeds.session_state()
        if state is None:
            raise RequestFailed(ErrorCode.INVALID_REQUEST, "this node has no transactions")
        transactions = state.transactions
        tx = transactions.get(tx_id)
        if tx is None:
            raise aborted(tx_id, transactions.why_not(tx_id))
        return transactions, tx

    async def _resume(self, db: sqlite3.Connection) -> tuple[Spool, int]:
        feeds = self._feeds
        args = self._request.args
        token = arg(args, "token", bytes)
        self.credit = _count(args, "credit", 1, MAX_CREDIT)
        parsed = parse_token(token)
        if parsed is None:
            raise _not_found("unknown", "no stream has this resume token")
        stream_id, seq = parsed
        spool = await in_thread(lookup_spool, db, stream_id)
        if spool is None or spool.scope != feeds.scope() or seq >= max(spool.pages, 1):
            raise _not_found("unknown", "no stream has this resume token")
        node = feeds.node
        if spool.state == "ready" and spool.expires_at < node.clock():
            await in_thread(delete_spool, db, stream_id)
            spool = await in_thread(lookup_spool, db, stream_id)
        if spool is None or spool.state != "ready":
            raise _not_found("expired", "the stream's spool expired or was released")
        await in_thread(touch_spool, db, stream_id, node.clock() + node.stream_retention)
        node.stats["streams_resumed"] += 1
        return spool, seq + 1

    async def _send_pages(self, db: sqlite3.Connection, spool: Spool, first: int) -> None:
        feeds = self._feeds
        node = feeds.node
        retention = node.stream_retention
        for seq in range(first, spool.pages):
            await self._wait_credit(retention)
            failure = node.take_page_failure()
            if failure is not None:
                raise failure
            page = await in_thread(read_page, db, spool.stream_id, seq)
            if page is None:
                raise _not_found("expired", "the stream's spool was deleted while it was sent")
            count, rows = page
            first_page = seq == 0
            frame = encode_stream_page(
                self.request_id,
                seq,
                rows,
                count,
                make_token(spool.stream_id, seq),
                spool.columns if first_page else None,
                spool.types if first_page else None,
            )
            if len(frame) > feeds.max_frame():
                raise RequestFailed(
                    ErrorCode.FRAME_TOO_LARGE, f"page {seq} exceeds the client's maximum frame"
                )
            if not await feeds.send(frame):
                return  # the connection is gone; the spool stays
            self.credit -= 1
            node.stats["stream_pages_sent"] += 1
            node.stats["stream_bytes_sent"] += len(frame)
            now = trio.current_time()
            if now - self._touched > retention / 4:
                self._touched = now
                await self._quietly(touch_spool, db, spool.stream_id, node.clock() + retention)
        end = StreamEnd(self.request_id, max(spool.pages - 1, 0), spool.row_count, spool.digest)
        self._ended = True
        feeds.finished(self.request_id, spool.stream_id)  # before the write: a CANCEL may follow
        await feeds.send(end)

    async def _wait_credit(self, retention: float) -> None:
        if self.credit > 0:
            return
        with trio.move_on_after(retention) as waited:
            while self.credit <= 0:
                await self._credit_lot.park()
        if waited.cancelled_caught:
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                f"no STREAM_CREDIT for {retention:g} s; the stream stopped (its spool is kept)",
            )


async def _run(job: SpoolJob) -> tuple[bool, Any]:
    """Run the job in a worker thread (inline in virtual time); ``(ok, value)``."""
    if virtual_time():
        await trio.lowlevel.checkpoint()
        return job.capture()
    return await wait_for_thread(job)


def _first_overhead(columns: Any, types: Any) -> int:
    """Bytes page 0 carries besides the rows: its columns and types."""
    size = PAGE_OVERHEAD + len(encode_body(list(columns)))
    if types is not None:
        size += len(encode_body(list(types)))
    return size
