"""Writes that apply all or nothing, on one SQLite connection, in a worker thread.

Beside :mod:`.statements` (one statement), the SQL of the methods that run
several in one transaction:

- :func:`run_batch` / :func:`run_statements`: ``batch``, its statements in
  order, in one transaction of its own or inside the caller's; a failure
  raises :class:`BatchFailure` naming the statement;
- :func:`run_executemany` / :func:`run_rows`: ``executemany``, one statement
  per parameter row, likewise; a failure raises :class:`RowFailure` naming
  the row;
- :func:`run_keyed`: a write at most once per idempotency key (the keyed
  transaction of docs/protocol.md section 8.5).

A transaction is checked for a CANCEL once it holds the write lock and again
right before COMMIT (:meth:`~.statements.Control.checkpoint`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

from .authorizers import WriteGuard
from .idempotency import IdempotencyKey, KeyedOutcome, KeyedResult
from .statements import (
    Control,
    Params,
    Statement,
    commit_now,
    execute_one,
    internal_refusal,
    refused_statement,
)

__all__ = [
    "PURGE_LIMIT",
    "BatchFailure",
    "RowFailure",
    "run_batch",
    "run_executemany",
    "run_keyed",
    "run_rows",
    "run_statements",
]

#: Most expired idempotency entries deleted by one keyed write.
PURGE_LIMIT = 100


class BatchFailure(Exception):
    """Statement ``index`` of a batch raised ``error``."""

    #: The ``details`` key that names the failing part.
    field = "statement_index"

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class RowFailure(BatchFailure):
    """Parameter row ``index`` of an ``executemany`` raised ``error``."""

    field = "row_index"


# -------------------------------------------------------------------- batch


def run_statements(
    conn: sqlite3.Connection,
    statements: Sequence[Statement],
    control: Control | None = None,
    expects: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """Run ``statements`` in order (in the caller's transaction): ``{"results": [...]}``.

    Each result is :func:`execute_one`'s; ``expects[i]`` is statement i's
    expected row count (None: any). A failure raises BatchFailure.
    """
    control = control if control is not None else Control()
    results = []
    for index, (sql, params) in enumerate(statements):
        expect = expects[index] if expects is not None else None
        try:
            results.append(
                execute_one(conn, sql, params, control, in_batch=True, expect_rows=expect)
            )
        except Exception as exc:
            raise BatchFailure(index, exc) from exc
    return {"results": results}


def run_rows(
    conn: sqlite3.Connection,
    sql: str,
    rows: Sequence[Params],
    control: Control | None = None,
) -> dict[str, Any]:
    """Run ``sql`` once per parameter row (in the caller's transaction):
    ``{"rows_affected": total}``. Rows it produces are read and dropped. A
    failure raises RowFailure naming the row. The statement runs under a
    :class:`~.authorizers.WriteGuard`, as through ``execute``.
    """
    control = control if control is not None else Control()
    guard = WriteGuard(in_batch=False)
    conn.set_authorizer(guard)
    total = 0
    try:
        for index, params in enumerate(rows):
            try:
                cursor = conn.execute(sql, params)
                try:
                    if cursor.description is not None:
                        for _ in cursor:
                            pass
                    total += max(cursor.rowcount, 0)
                finally:
                    cursor.close()
            except sqlite3.Error as exc:
                error: Exception = exc
                if guard.internal is not None:
                    error = internal_refusal(guard.internal)
                elif guard.refused is not None:
                    error = refused_statement(guard.refused, in_batch=False)
                raise RowFailure(index, error) from exc
            except Exception as exc:
                raise RowFailure(index, exc) from exc
    finally:
        conn.set_authorizer(None)
        control.connection_changed |= guard.changes_connection
    return {"rows_affected": total}


def run_executemany(
    conn: sqlite3.Connection, sql: str, rows: Sequence[Params], control: Control | None = None
) -> dict[str, Any]:
    """:func:`run_rows` in one transaction of its own: all rows apply or none."""
    control = control if control is not None else Control()
    conn.execute("BEGIN IMMEDIATE")
    control.checkpoint()
    result = run_rows(conn, sql, rows, control)
    control.checkpoint()
    commit_now(conn)
    return result


def run_batch(
    conn: sqlite3.Connection,
    statements: Sequence[Statement],
    control: Control | None = None,
    expects: Sequence[int | None] | None = None,
) -> dict[str, Any]:
    """:func:`run_statements` in one transaction of its own: all apply or none."""
    control = control if control is not None else Control()
    conn.execute("BEGIN IMMEDIATE")
    control.checkpoint()  # the lock may have taken long to come
    result = run_statements(conn, statements, control, expects)
    control.checkpoint()
    commit_now(conn)
    return result


# ------------------------------------------------------------ idempotency


def run_keyed(
    conn: sqlite3.Connection,
    key: IdempotencyKey,
    work: Callable[[sqlite3.Connection], Any],
    *,
    clock: Callable[[], float],
    ttl: float,
    control: Control | None = None,
) -> KeyedResult:
    """Run ``work`` at most once for ``key``, in one transaction (thread side).

    ``conn`` must be in autocommit mode with no transaction open. Exceptions
    from ``work`` propagate with the transaction still open; the caller
    rolls it back (the storage's job runner does), so a failure stores
    nothing. The stored result is the whole result, RETURNING rows included,
    so a replay is identical to the first answer.
    """
    control = control if control is not None else Control()
    conn.execute("BEGIN IMMEDIATE")
    control.checkpoint()  # the lock may have taken long to come
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
    control.checkpoint()
    commit_now(conn)
    return KeyedResult(KeyedOutcome.STORED, result)
