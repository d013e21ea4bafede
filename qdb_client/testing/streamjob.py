"""Spooling one stream's result: the query's read transaction and the spool's writes.

A :class:`SpoolJob` runs in a worker thread (inline under a MockClock, as the
storage does) on two connections of its own: one to the cluster's database
reads the query inside one read transaction, read-only (``PRAGMA query_only`` and
an authorizer that refuses what would change the file or the connection,
and the node's internal tables), the other writes the pages to the spool
file (:class:`~.spool.SpoolWriter`). Memory holds one page at a time.

Cancellation never abandons the thread: :meth:`SpoolJob.cancel` raises a
flag that the writer checks before each page and interrupts the read; the
job then deletes what it wrote. The deadline (the time until page 0 is due)
is checked the same way, in real time, since SQL work is real work.

Errors come out as :class:`~._failure.RequestFailed`: READ_ONLY for a
statement that writes (nothing executed), SQL_ERROR for one that fails,
TIMEOUT at the deadline, FRAME_TOO_LARGE for a row no frame can carry.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..protocol import ErrorCode, ValueNotEncodable
from ._failure import RequestFailed
from .authorizers import ReadGuard
from .spool import Spool, SpoolWriter, open_spool_connection
from .statements import internal_refusal

__all__ = ["InternalGuard", "SpoolJob", "Stopped"]

logger = logging.getLogger("qdb_client.testing")

#: VM instructions between two checks of the deadline and the cancel flag.
_PROGRESS_STEPS = 1000

ColumnTypes = Callable[
    [sqlite3.Connection, str, int],
    tuple[Sequence[str | None], Sequence[Callable[[Any], Any] | None] | None],
]


class Stopped(Exception):
    """The job was cancelled (CANCEL, a closed connection): nothing is kept."""


class InternalGuard(ReadGuard):
    """A read's authorizer (:class:`~.authorizers.ReadGuard`, which keeps the node's
    internal tables out of reach: using one fails as an SQL error, ``internal``)."""


def _name(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


class SpoolJob:
    """Run ``sql`` with ``params`` to its end and spool its result (see the module doc).

    ``column_types(conn, sql, n)`` gives the declared type names of the ``n``
    result columns and their value conversions (the node's typed values).
    ``writer`` holds the keyword arguments of :class:`~.spool.SpoolWriter`
    other than the connection, columns and types. ``read_conn``: read on that
    connection, inside the transaction it holds (a ``begin`` transaction's),
    instead of a connection and a read transaction of its own.
    """

    def __init__(
        self,
        path: str,
        spool: str,
        sql: str,
        params: Any,
        *,
        budget: float,
        column_types: ColumnTypes,
        first_overhead: Callable[[Sequence[str], Sequence[str | None] | None], int],
        writer: dict[str, Any],
        read_conn: sqlite3.Connection | None = None,
    ) -> None:
        self._path = path
        self._spool = spool
        self._given = read_conn
        self._sql = sql
        self._params = params
        self._budget = budget
        self._column_types = column_types
        self._first_overhead = first_overhead
        self._writer_options = writer
        self._deadline = 0.0
        self._read: sqlite3.Connection | None = None
        self.cancelled = False
        self.timed_out = False

    # --------------------------------------------------------- event loop side

    def cancel(self) -> None:
        """Stop (event loop side): raise the flag, interrupt the read."""
        self.cancelled = True
        read = self._read
        if read is not None:
            try:
                read.interrupt()
            except sqlite3.Error:
                pass

    # --------------------------------------------------------------- thread side

    def capture(self) -> tuple[bool, Any]:
        """:meth:`run`, with an exception returned instead of raised."""
        try:
            return True, self.run()
        except Exception as exc:
            return False, exc

    def checkpoint(self) -> None:
        """Raise if cancelled or past the deadline (before each page)."""
        if self.cancelled:
            raise Stopped("cancelled")
        if time.monotonic() >= self._deadline:
            self.timed_out = True
            raise self._timeout()

    def _progress(self) -> int:
        if self.cancelled:
            return 1
        if time.monotonic() >= self._deadline:
            self.timed_out = True
            return 1
        return 0

    def _timeout(self) -> RequestFailed:
        return RequestFailed(
            ErrorCode.TIMEOUT,
            "the result could not be spooled before the request deadline; nothing is kept",
            details={"executed": False},
        )

    def run(self) -> Spool:
        """Spool the result (thread side); RequestFailed or Stopped if it can't."""
        if self.cancelled:
            raise Stopped("cancelled before it started")
        self._deadline = time.monotonic() + self._budget
        given = self._given
        read = given or sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        if given is None:  # no value longer than a row may be built (a given one has its limit)
            max_row = self._writer_options.get("max_row")
            if isinstance(max_row, int):
                read.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max(1, max_row))
        self._read = read
        write: sqlite3.Connection | None = None
        writer: SpoolWriter | None = None
        guard = InternalGuard()
        was_read_only = bool(read.execute("PRAGMA query_only").fetchone()[0])
        try:
            read.execute(f"PRAGMA busy_timeout = {max(1, int(self._budget * 1000))}")
            read.execute("PRAGMA query_only = ON")
            read.set_progress_handler(self._progress, _PROGRESS_STEPS)
            if given is None:
                read.execute("BEGIN")  # one snapshot for the whole result
            read.set_authorizer(guard)
            cursor = read.execute(self._sql, self._params)
            columns = [d[0] for d in cursor.description or ()]
            read.set_authorizer(None)
            types, convert = self._column_types(read, self._sql, len(columns))
            typed = None if all(t is None for t in types) else types
            options = dict(self._writer_options)
            overhead = self._first_overhead(columns, typed)
            options["first_limit"] = max(
                1, min(options["page_bytes"], options["max_row"] - overhead)
            )
            write = open_spool_connection(self._spool)
            writer = SpoolWriter(
                write, columns=columns, types=typed, checkpoint=self.checkpoint, **options
            )
            for raw in cursor:
                row = list(raw)
                if convert is not None:
                    row = [
                        v if c is None or v is None else c(v)
                        for c, v in zip(convert, row, strict=True)
                    ]
                writer.add(row)
            spool = writer.finish()
            writer = None
            return spool
        except (RequestFailed, Stopped):
            raise
        except sqlite3.Error as exc:
            raise self._translate(exc, guard) from exc
        except ValueNotEncodable as exc:
            raise RequestFailed(ErrorCode.INTERNAL, f"a row can't be encoded: {exc}") from exc
        except (OverflowError, ValueError, TypeError) as exc:
            raise RequestFailed(ErrorCode.INVALID_REQUEST, f"bad parameter: {exc}") from exc
        finally:
            self._read = None
            read.set_authorizer(None)
            read.set_progress_handler(None, 0)
            if writer is not None:
                try:
                    writer.abandon()
                except sqlite3.Error:
                    logger.warning("could not delete an abandoned spool", exc_info=True)
            if write is not None:
                write.close()
            if given is None:
                read.close()
            elif not was_read_only:
                read.execute("PRAGMA query_only = OFF")

    def _translate(self, exc: sqlite3.Error, guard: InternalGuard) -> Exception:
        name = _name(exc)
        if self.cancelled:
            return Stopped("cancelled")
        if guard.internal is not None:
            return internal_refusal(guard.internal)
        if guard.refused is not None or name.startswith("SQLITE_READONLY"):
            what = guard.refused or str(exc)
            return RequestFailed(
                ErrorCode.READ_ONLY,
                f"a stream is read-only and the statement writes ({what}); use execute for"
                " writes. Nothing was executed",
                details={"executed": False},
            )
        if self.timed_out or name.startswith("SQLITE_INTERRUPT"):
            return self._timeout()
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return RequestFailed(ErrorCode.UNAVAILABLE, f"database is busy: {exc}")
        return RequestFailed(ErrorCode.SQL_ERROR, str(exc), details={"sqlite_error": name})
