"""What a test node runs on one SQLite connection, inside a worker thread.

:mod:`.storage` owns the pool, the deadlines and the error mapping; the
functions here take a ``sqlite3.Connection`` in autocommit mode and run one
method's SQL on it, with a :class:`Control` shared with the job that runs
them (its CANCEL flag, the client's frame limit, what the SQL did to the
connection):

- :func:`execute_one`: one statement; its row count, the id of the row an
  INSERT inserted, and the rows of ``... RETURNING`` (or of any statement
  that produces rows). It runs under a :class:`~.authorizers.WriteGuard`.
- :func:`run_execute`: ``execute`` without a key; a statement with
  RETURNING gets a transaction of its own, so it can still be rolled back.
- :func:`query_one`: one statement that must only read, under ``PRAGMA
  query_only`` and a :class:`~.authorizers.ReadGuard` (a refusal is
  READ_ONLY, raised before anything ran), with SQLite's length limit set
  to the client's maximum frame; both are switched off again afterwards.
- :func:`commit_now`: COMMIT once the work is done.

Batches, ``executemany`` and keyed writes are in :mod:`.writes`; the SQL of
``begin`` transactions in :mod:`.txsql`.

A statement that produces rows reports each column's declared type
(``types``) and its values converted by that type (:mod:`.typed`), as
described by the storage's :class:`~.decltypes.StatementProbe`. ``execute``
and batch statements may carry an expected row count (``expect_rows``):
another count raises CONFLICT, and the write is rolled back with its
transaction.

Results are fetched row by row and their size counted as they come: a
result that can't fit the client's maximum frame stops with
FRAME_TOO_LARGE before it is all in memory (and a write is rolled back).
A transaction is checked for a CANCEL once it holds the write lock and
again right before COMMIT (:meth:`Control.checkpoint`): waiting for the
lock or running a short statement may outlast the CANCEL's interrupt.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..protocol import HEADER_SIZE, ErrorCode
from ._failure import RequestFailed
from .authorizers import ReadGuard, VacuumGuard, WriteGuard
from .decltypes import ProbeError, StatementProbe
from .typed import converters, encoded_at_least, type_name

__all__ = [
    "ROWID_MARK",
    "ROWID_MARK_TABLE",
    "Control",
    "Params",
    "Statement",
    "Stopped",
    "commit_now",
    "execute_one",
    "expect_conflict",
    "internal_refusal",
    "is_insert",
    "query_one",
    "refused_statement",
    "run_execute",
]

Params = Sequence[Any] | Mapping[str, Any]
#: One statement of a batch: SQL text and its parameters.
Statement = tuple[str, Params]

#: What ``last_insert_rowid()`` is set to before a statement (see :func:`execute_one`).
ROWID_MARK = -(2**63)
#: The TEMP table (one row) each connection inserts into to set :data:`ROWID_MARK`.
ROWID_MARK_TABLE = "qdb_last_insert"

_RETURNING = re.compile(r"returning", re.IGNORECASE)
_NO_ROWS: dict[str, Any] = {"rows_affected": 0, "last_insert_id": None}


class Stopped(Exception):
    """A CANCEL stopped the request at a :meth:`Control.checkpoint`; it is rolled back."""


class Control:
    """What the SQL of one request shares with the job that runs it.

    ``result_limit`` is the client's maximum frame in bytes (None: no
    limit); ``writes`` says the request is ``execute`` or ``batch``, whose
    refusals carry ``details.executed``. The event loop sets
    :attr:`cancelled` (a CANCEL); the write authorizer sets
    :attr:`connection_changed` (a setting or a TEMP object), after which the
    storage replaces the pooled connection.
    """

    def __init__(
        self,
        result_limit: int | None = None,
        *,
        writes: bool = False,
        probe: StatementProbe | None = None,
    ) -> None:
        self.result_limit = result_limit
        self.writes = writes
        #: Describes statements (declared types); None: no types, values as stored.
        self.probe = probe
        #: Set (from the event loop) when the request is to stop.
        self.cancelled = False
        #: Set when a statement changed the pooled connection.
        self.connection_changed = False
        self._size = HEADER_SIZE  # a lower bound of the RESPONSE frame so far

    def column_types(
        self, conn: sqlite3.Connection, sql: str, count: int
    ) -> tuple[list[str | None], list[Callable[[Any], Any] | None] | None]:
        """The declared type names of the ``count`` result columns of ``sql`` and
        their value conversions (None: none); all None when unknown."""
        unknown: list[str | None] = [None] * count
        probe = self.probe
        if probe is None or not probe.available:
            return unknown, None
        try:
            version = conn.execute("PRAGMA schema_version").fetchone()[0]
            description = probe.describe(sql, version)
        except (ProbeError, sqlite3.Error):
            return unknown, None
        if len(description.decltypes) != count:
            return unknown, None
        return [type_name(d) for d in description.decltypes], converters(description.decltypes)

    def checkpoint(self) -> None:
        """Raise :class:`Stopped` if the request was cancelled (thread side)."""
        if self.cancelled:
            raise Stopped("cancelled by the client")

    def fetch(
        self,
        cursor: sqlite3.Cursor,
        convert: Sequence[Callable[[Any], Any] | None] | None = None,
    ) -> list[list[Any]]:
        """Every row of ``cursor``, one at a time, each value converted by its column's
        ``convert`` entry; FRAME_TOO_LARGE once past the limit."""
        rows: list[list[Any]] = []
        limit = self.result_limit
        for raw in cursor:
            row = list(raw)
            if convert is not None:
                pairs = zip(convert, row, strict=True)
                row = [v if c is None or v is None else c(v) for c, v in pairs]
            if limit is not None:
                self._size += 1 + sum(encoded_at_least(value) for value in row)
                if self._size > limit:
                    raise self._too_large(f"result of more than {self._size} bytes", self._size)
            rows.append(row)
        return rows

    def rows_of(self, conn: sqlite3.Connection, sql: str, cursor: sqlite3.Cursor) -> dict[str, Any]:
        """``{"columns", "rows", "types"}`` of a statement that produces rows."""
        assert cursor.description is not None
        columns = [d[0] for d in cursor.description]
        types, convert = self.column_types(conn, sql, len(columns))
        return {"columns": columns, "rows": self.fetch(cursor, convert), "types": types}

    def too_big_value(self) -> RequestFailed:
        """FRAME_TOO_LARGE for a string or blob above SQLite's length limit (the frame)."""
        return self._too_large(
            "a string or blob the query builds or reads",
            None,
            " (the node's limit on a query's values, since no such value can be sent)",
        )

    def _too_large(self, what: str, size: int | None, why: str = "") -> RequestFailed:
        limit = self.result_limit
        text = f"{what} exceeds the client's maximum frame of {limit} bytes{why}"
        text += "; use a LIMIT or a result stream"
        details: dict[str, Any] = {"max_frame": limit}
        if size is not None:
            details["frame_size"] = size
        if self.writes:
            text += "; nothing was applied"
            details["executed"] = False
        return RequestFailed(ErrorCode.FRAME_TOO_LARGE, text, details=details)


def expect_conflict(expected: int, affected: int) -> RequestFailed:
    """CONFLICT for a statement that affected ``affected`` rows instead of ``expected``."""
    return RequestFailed(
        ErrorCode.CONFLICT,
        f"the statement affected {affected} row(s), not the {expected} expected;"
        " it was rolled back",
        details={"expected": expected, "rows_affected": affected, "executed": False},
    )


# ------------------------------------------------------------------ execute


def _first_word(sql: str) -> str:
    """The statement's first word, lowercased, after whitespace and comments ("" if none).

    One forward pass (each comment is skipped with one ``str.find``), so no
    input can make it slow, unlike a regular expression whose comment
    repetition backtracks exponentially on ``/**//**/...``.
    """
    i, n = 0, len(sql)
    while i < n:
        if sql[i].isspace():
            i += 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i + 2)
            if end < 0:
                return ""
            i = end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                return ""
            i = end + 2
        else:
            break
    end = i
    while end < n and (sql[end].isalnum() or sql[end] == "_"):
        end += 1
    return sql[i:end].lower()


def is_insert(sql: str) -> bool:
    """Whether ``sql`` starts with INSERT or REPLACE, after whitespace and comments."""
    return _first_word(sql) in ("insert", "replace")


def internal_refusal(what: str) -> RequestFailed:
    """SQL_ERROR (SQLITE_AUTH, nothing executed) for a statement that touched the node's
    internals (an internal table, a change-log trigger: see :mod:`.authorizers`)."""
    if what.startswith(("function ", "virtual table ", "pragma ")):
        why = "it would reach into the node's process or its files"
    else:
        why = "it belongs to the node (idempotency keys, sessions, the change log)"
    return RequestFailed(
        ErrorCode.SQL_ERROR,
        f"access to {what} is not allowed: {why}. Nothing was executed",
        details={"executed": False, "sqlite_error": "SQLITE_AUTH"},
    )


def refused_statement(what: str, *, in_batch: bool) -> RequestFailed:
    """SQL_ERROR (SQLITE_AUTH, nothing executed) for a statement a write guard refused."""
    if what == "VACUUM INTO":
        why = "it would copy the whole database, every user's rows included, to a file"
    elif what in ("ATTACH", "DETACH"):
        why = "it would change the node's pooled connection (and may create files)"
    elif what.startswith("PRAGMA"):
        why = "it would change the database file every node of the cluster shares"
    elif in_batch:
        why = "it would end the batch's transaction"
    else:
        why = (
            "a transaction can't span requests (each may run on another connection);"
            " send the statements as one batch, which is one transaction"
        )
    outcome = "Nothing of the batch was applied" if in_batch else "Nothing was executed"
    return RequestFailed(
        ErrorCode.SQL_ERROR,
        f"{what} is not allowed here: {why}. {outcome}",
        details={"executed": False, "sqlite_error": "SQLITE_AUTH"},
    )


def _mark_rowid(conn: sqlite3.Connection) -> int:
    """Set the connection's ``last_insert_rowid()`` to :data:`ROWID_MARK`; return it.

    SQLite keeps the rowid of the connection's last insert, whatever it
    became since (rolled back, deleted), and offers no SQL to reset it. An
    insert into the connection's own TEMP table :data:`ROWID_MARK_TABLE`
    sets it; the table is created on first use. Where nothing may be
    written (a batch that set ``query_only``), the current value is returned.
    """
    insert = f"INSERT OR REPLACE INTO temp.{ROWID_MARK_TABLE}(rowid) VALUES (?)"
    try:
        try:
            conn.execute(insert, (ROWID_MARK,))
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {ROWID_MARK_TABLE}(x)")
            conn.execute(insert, (ROWID_MARK,))
    except sqlite3.OperationalError as exc:
        if not _sqlite_name(exc).startswith("SQLITE_READONLY"):
            raise
        return conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    return ROWID_MARK


def execute_one(
    conn: sqlite3.Connection,
    sql: str,
    params: Params,
    control: Control | None = None,
    *,
    in_batch: bool = False,
    expect_rows: int | None = None,
) -> dict[str, Any]:
    """Run one statement: ``{"rows_affected", "last_insert_id"}``, plus
    ``"columns"``, ``"rows"`` and ``"types"`` when it produces rows (``... RETURNING``).

    A statement without a result keeps exactly the two keys, so results of
    plain writes are the same bytes as before RETURNING rows were returned.
    ``last_insert_id`` is set only when an INSERT (or REPLACE) inserted a row
    with a rowid. SQLite's ``last_insert_rowid()`` belongs to the connection
    and does not change for an upsert that updated nor for a WITHOUT ROWID
    table, so it is set to :data:`ROWID_MARK` first (:func:`_mark_rowid`) and
    must have changed. (A row inserted with the rowid -2**63 itself is
    reported as null.)
    ``in_batch``: the statement is part of a batch, whose transaction the
    node owns (see :class:`~.authorizers.WriteGuard`). ``expect_rows``: the
    rows it must affect; another count raises CONFLICT (the caller's
    transaction rolls the statement back).
    """
    control = control if control is not None else Control()
    mark = _mark_rowid(conn)
    # VACUUM attaches a scratch database and opens a transaction of its own: it gets
    # a guard of its own, which refuses only VACUUM INTO a file.
    vacuum = _first_word(sql) == "vacuum"
    guard = None if vacuum else WriteGuard(in_batch=in_batch)
    vacuum_guard = VacuumGuard() if vacuum else None
    conn.set_authorizer(guard if guard is not None else vacuum_guard)
    try:
        try:
            cursor = conn.execute(sql, params)
        except sqlite3.Error as exc:
            if vacuum_guard is not None and vacuum_guard.refused is not None:
                raise refused_statement(vacuum_guard.refused, in_batch=in_batch) from exc
            if guard is not None and guard.internal is not None:
                raise internal_refusal(guard.internal) from exc
            if guard is not None and guard.skipped is not None:
                return dict(_NO_ROWS)  # BEGIN/COMMIT in a batch: the node commits it
            if guard is not None and guard.refused is not None:
                raise refused_statement(guard.refused, in_batch=in_batch) from exc
            raise
        try:
            rows = None
            if cursor.description is not None:
                rows = control.rows_of(conn, sql, cursor)  # also finishes the statement
            affected = max(cursor.rowcount, 0)
            rowid = cursor.lastrowid
        finally:
            cursor.close()
    finally:
        conn.set_authorizer(None)
        if guard is not None:
            control.connection_changed |= guard.changes_connection
    if expect_rows is not None and affected != expect_rows:
        raise expect_conflict(expect_rows, affected)
    inserted = affected and rowid is not None and rowid != mark and is_insert(sql)
    result: dict[str, Any] = {
        "rows_affected": affected,
        "last_insert_id": rowid if inserted else None,
    }
    if rows is not None:
        result.update(rows)
    return result


def run_execute(
    conn: sqlite3.Connection,
    sql: str,
    params: Params,
    control: Control | None = None,
    *,
    expect_rows: int | None = None,
) -> dict[str, Any]:
    """``execute`` without an idempotency key.

    A statement that mentions RETURNING, or has an expected row count, runs
    in a transaction of its own (``BEGIN IMMEDIATE``), so that a result too
    large for the client, another row count, or a CANCEL, rolls its write
    back; any other statement runs in autocommit mode.
    """
    control = control if control is not None else Control()
    if expect_rows is None and not _RETURNING.search(sql):
        return execute_one(conn, sql, params, control)
    conn.execute("BEGIN IMMEDIATE")
    control.checkpoint()
    result = execute_one(conn, sql, params, control, expect_rows=expect_rows)
    control.checkpoint()
    commit_now(conn)
    return result


# -------------------------------------------------------------------- query


def _read_only(what: str) -> RequestFailed:
    return RequestFailed(
        ErrorCode.READ_ONLY,
        f"query is read-only and the statement writes ({what}); use execute for writes."
        " Nothing was executed",
        details={"executed": False},
    )


def _sqlite_name(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or ""


def query_one(
    conn: sqlite3.Connection,
    sql: str,
    params: Params,
    control: Control | None = None,
    *,
    stay_read_only: bool = False,
) -> dict[str, Any]:
    """Run one read-only statement and fetch its rows: ``{"columns", "rows", "types"}``.

    Raises RequestFailed READ_ONLY for a statement that writes; SQLite refuses
    it before executing anything. With a ``control.result_limit``, no string
    or blob longer than it can be built or read (FRAME_TOO_LARGE).
    ``stay_read_only``: leave ``query_only`` on afterwards (a read-only
    transaction's connection).
    """
    control = control if control is not None else Control()
    guard = ReadGuard()
    limit = control.result_limit
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(guard)
    previous = None if limit is None else conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)
    try:
        try:
            cursor = conn.execute(sql, params)
            try:
                if cursor.description is not None:
                    result = control.rows_of(conn, sql, cursor)
                else:
                    result = {"columns": [], "rows": control.fetch(cursor), "types": []}
            finally:
                cursor.close()
        except sqlite3.Error as exc:
            if guard.internal is not None:
                raise internal_refusal(guard.internal) from exc
            if guard.refused is not None:
                raise _read_only(guard.refused) from exc
            if _sqlite_name(exc).startswith("SQLITE_READONLY"):
                raise _read_only(str(exc)) from exc
            if limit is not None and _sqlite_name(exc).startswith("SQLITE_TOOBIG"):
                raise control.too_big_value() from exc
            raise
    finally:
        if previous is not None:
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, previous)
        _writable_again(conn, stay_read_only=stay_read_only)
    return result


def _writable_again(conn: sqlite3.Connection, *, stay_read_only: bool = False) -> None:
    """Undo what :func:`query_one` set, so the pooled connection can write again.

    The statement is over, so the deadline check is switched off first. A
    cancel's ``interrupt()`` can still land on the first attempt (it races
    with the end of the statement); it never outlives that statement, so one
    retry is enough.
    """
    conn.set_authorizer(None)
    conn.set_progress_handler(None, 0)
    if stay_read_only:
        return
    try:
        conn.execute("PRAGMA query_only = OFF")
    except sqlite3.OperationalError:
        conn.execute("PRAGMA query_only = OFF")


# ------------------------------------------------------------------ commit


def commit_now(conn: sqlite3.Connection) -> None:
    """COMMIT the open transaction, with the deadline check switched off.

    Once every statement ran the write is finished: answering TIMEOUT now
    could report as not executed a COMMIT that SQLite completed. A cancel
    (``interrupt()``) still stops a COMMIT that has not started.
    """
    conn.set_progress_handler(None, 0)
    conn.execute("COMMIT")
