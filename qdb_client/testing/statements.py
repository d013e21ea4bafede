"""What a test node runs on one SQLite connection, inside a worker thread.

:mod:`.storage` owns the pool, the deadlines and the error mapping; the
functions here take a ``sqlite3.Connection`` in autocommit mode and run one
method's SQL on it:

- :func:`execute_one`: one statement; its row count, the id of the row an
  INSERT inserted, and the rows of ``... RETURNING`` (or of any statement
  that produces rows).
- :func:`query_one`: one statement that must only read. It runs with
  ``PRAGMA query_only`` on (SQLite then refuses every write before it
  starts) and an authorizer refusing what query_only lets through:
  ATTACH/DETACH, which create files and change the pooled connection, and
  pragmas that change settings (``journal_mode = delete`` would switch the
  whole cluster's file out of WAL). Either refusal is READ_ONLY, raised
  before anything ran; both are switched off again afterwards.
- :func:`run_batch` / :func:`run_statements`: statements in order, in one
  transaction or inside the caller's.
- :func:`run_keyed`: a write at most once per idempotency key.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cbor2

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .idempotency import IdempotencyKey, KeyedOutcome, KeyedResult

__all__ = [
    "PURGE_LIMIT",
    "BatchFailure",
    "Params",
    "Statement",
    "execute_one",
    "is_insert",
    "query_one",
    "run_batch",
    "run_keyed",
    "run_statements",
]

#: Most expired idempotency entries deleted by one keyed write.
PURGE_LIMIT = 100

Params = Sequence[Any] | Mapping[str, Any]
#: One statement of a batch: SQL text and its parameters.
Statement = tuple[str, Params]

#: Pragmas that take an argument and still only read (``PRAGMA table_info(t)``).
_READING_PRAGMAS = frozenset(
    {
        "foreign_key_check",
        "foreign_key_list",
        "index_info",
        "index_list",
        "index_xinfo",
        "integrity_check",
        "quick_check",
        "table_info",
        "table_list",
        "table_xinfo",
    }
)
#: Pragmas that act even without an argument.
_ACTING_PRAGMAS = frozenset({"incremental_vacuum", "optimize", "shrink_memory", "wal_checkpoint"})


class BatchFailure(Exception):
    """Statement ``index`` of a batch raised ``error``."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


# ------------------------------------------------------------------ execute


def is_insert(sql: str) -> bool:
    """Whether ``sql`` starts with INSERT or REPLACE, after whitespace and comments.

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
                return False
            i = end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            if end < 0:
                return False
            i = end + 2
        else:
            break
    for keyword in ("insert", "replace"):
        end = i + len(keyword)
        if sql[i:end].lower() == keyword and not (
            end < n and (sql[end].isalnum() or sql[end] == "_")
        ):
            return True
    return False


def execute_one(conn: sqlite3.Connection, sql: str, params: Params) -> dict[str, Any]:
    """Run one statement: ``{"rows_affected", "last_insert_id"}``, plus
    ``"columns"`` and ``"rows"`` when it produces rows (``... RETURNING``).

    A statement without a result keeps exactly the two keys, so results of
    plain writes are the same bytes as before RETURNING rows were returned.
    """
    cursor = conn.execute(sql, params)
    try:
        columns = None
        rows: list[list[Any]] = []
        if cursor.description is not None:
            columns = [d[0] for d in cursor.description]
            rows = [list(row) for row in cursor.fetchall()]  # also finishes the statement
        affected = max(cursor.rowcount, 0)
        # lastrowid is the connection's last insert, so only an INSERT's own counts.
        last_id = cursor.lastrowid if affected and is_insert(sql) else None
    finally:
        cursor.close()
    result: dict[str, Any] = {"rows_affected": affected, "last_insert_id": last_id}
    if columns is not None:
        result["columns"] = columns
        result["rows"] = rows
    return result


# -------------------------------------------------------------------- query


class _ReadOnlyGuard:
    """SQLite authorizer of a read: refuses ATTACH, DETACH and acting pragmas."""

    def __init__(self) -> None:
        #: What was refused, for the error message (None: nothing).
        self.refused: str | None = None

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            self.refused = "ATTACH" if action == sqlite3.SQLITE_ATTACH else "DETACH"
        elif action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in _ACTING_PRAGMAS or (arg2 is not None and name not in _READING_PRAGMAS):
                self.refused = f"PRAGMA {name}"
        if self.refused is not None:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK


def _read_only(what: str) -> RequestFailed:
    return RequestFailed(
        ErrorCode.READ_ONLY,
        f"query is read-only and the statement writes ({what}); use execute for writes."
        " Nothing was executed",
        details={"executed": False},
    )


def query_one(conn: sqlite3.Connection, sql: str, params: Params) -> dict[str, Any]:
    """Run one read-only statement and fetch its rows: ``{"columns", "rows"}``.

    Raises RequestFailed READ_ONLY for a statement that writes; SQLite refuses
    it before executing anything.
    """
    guard = _ReadOnlyGuard()
    conn.execute("PRAGMA query_only = ON")
    conn.set_authorizer(guard)
    try:
        try:
            cursor = conn.execute(sql, params)
        except sqlite3.Error as exc:
            if guard.refused is not None:
                raise _read_only(guard.refused) from exc
            if (getattr(exc, "sqlite_errorname", None) or "").startswith("SQLITE_READONLY"):
                raise _read_only(str(exc)) from exc
            raise
        try:
            columns = [d[0] for d in cursor.description or ()]
            rows = [list(row) for row in cursor.fetchall()]
        finally:
            cursor.close()
    finally:
        _writable_again(conn)
    return {"columns": columns, "rows": rows}


def _writable_again(conn: sqlite3.Connection) -> None:
    """Undo what :func:`query_one` set, so the pooled connection can write again.

    The statement is over, so the deadline check is switched off first. A
    cancel's ``interrupt()`` can still land on the first attempt (it races
    with the end of the statement); it never outlives that statement, so one
    retry is enough.
    """
    conn.set_authorizer(None)
    conn.set_progress_handler(None, 0)
    try:
        conn.execute("PRAGMA query_only = OFF")
    except sqlite3.OperationalError:
        conn.execute("PRAGMA query_only = OFF")


# -------------------------------------------------------------------- batch


def run_statements(conn: sqlite3.Connection, statements: Sequence[Statement]) -> dict[str, Any]:
    """Run ``statements`` in order (in the caller's transaction): ``{"results": [...]}``.

    Each result is :func:`execute_one`'s. A failure raises BatchFailure.
    """
    results = []
    for index, (sql, params) in enumerate(statements):
        try:
            results.append(execute_one(conn, sql, params))
        except Exception as exc:
            raise BatchFailure(index, exc) from exc
    return {"results": results}


def _commit(conn: sqlite3.Connection) -> None:
    """COMMIT the open transaction, with the deadline check switched off.

    Once every statement ran the write is finished: answering TIMEOUT now
    could report as not executed a COMMIT that SQLite completed. A cancel
    (``interrupt()``) still stops a COMMIT that has not started.
    """
    conn.set_progress_handler(None, 0)
    conn.execute("COMMIT")


def run_batch(conn: sqlite3.Connection, statements: Sequence[Statement]) -> dict[str, Any]:
    """:func:`run_statements` in one transaction of its own: all apply or none."""
    conn.execute("BEGIN IMMEDIATE")
    result = run_statements(conn, statements)
    _commit(conn)
    return result


# ------------------------------------------------------------ idempotency


def run_keyed(
    conn: sqlite3.Connection,
    key: IdempotencyKey,
    work: Callable[[sqlite3.Connection], Any],
    *,
    clock: Callable[[], float],
    ttl: float,
) -> KeyedResult:
    """Run ``work`` at most once for ``key``, in one transaction (thread side).

    ``conn`` must be in autocommit mode with no transaction open. Exceptions
    from ``work`` propagate with the transaction still open; the caller
    rolls it back (the storage's job runner does), so a failure stores
    nothing. The stored result is the whole result, RETURNING rows included,
    so a replay is identical to the first answer.
    """
    conn.execute("BEGIN IMMEDIATE")
    now = clock()  # read once the write lock is held: waiting for it takes time
    row = conn.execute(
        "SELECT request_hash, result, created_at FROM qdb_idempotency WHERE scope = ? AND key = ?",
        (key.scope, key.key),
    ).fetchone()
    if row is not None and now < row[2] + ttl:
        conn.execute("ROLLBACK")
        if bytes(row[0]) != key.request_hash:
            return KeyedResult(KeyedOutcome.CONFLICT)
        return KeyedResult(KeyedOutcome.REPLAYED, cbor2.loads(row[1]))
    conn.execute(
        "DELETE FROM qdb_idempotency WHERE rowid IN"
        " (SELECT rowid FROM qdb_idempotency WHERE created_at <= ? LIMIT ?)",
        (now - ttl, PURGE_LIMIT),
    )
    result = work(conn)
    conn.execute(
        "INSERT OR REPLACE INTO qdb_idempotency"
        " (scope, key, request_hash, result, created_at) VALUES (?, ?, ?, ?, ?)",
        (key.scope, key.key, key.request_hash, cbor2.dumps(result), now),
    )
    _commit(conn)
    return KeyedResult(KeyedOutcome.STORED, result)
