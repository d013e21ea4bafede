"""The change log of subscribed tables, in the cluster's shared SQLite file (thread side).

The first subscription to a table creates three triggers on it (AFTER INSERT,
UPDATE, DELETE, for each row) that append a row to ``qdb_changes`` inside
the writing transaction, whichever node (or process) writes: a change is
logged exactly when it commits, and a rolled-back write leaves nothing. The
log's ``event_id`` is SQLite's AUTOINCREMENT: writers hold the file's one
write lock, so ids increase in commit order across the cluster, and a
reader that sees an id sees every smaller one (docs/protocol.md 13.1).

The triggers use built-in SQL only (every connection of every node runs
them, including ones this module never configured): the row is a JSON text
of ``{column: [type, value]}`` with blobs in hex and reals printed with 17
significant digits, so every value comes back exactly. Columns are those the
table had when its triggers were created.

``qdb_change_tables`` records each logged table, its columns and
``trimmed_through``: the newest event of the table trimmed away. A
subscription from an older event is NOT_FOUND ``trimmed``. Changes are kept
``change_retention`` seconds and at most :data:`MAX_CHANGES_PER_TABLE` per table.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import attrs

from ..protocol import ErrorCode
from ._failure import RequestFailed

__all__ = [
    "CHANGE_TABLES",
    "MAX_CHANGES_PER_TABLE",
    "SCHEMA",
    "Change",
    "LoggedTable",
    "ensure_logged",
    "newest_event_id",
    "open_log_connection",
    "read_changes",
    "trigger_names",
    "trim",
    "trimmed_through",
    "where_holds",
    "where_sql",
]

#: Tables of the change log (never reachable by the client's SQL).
CHANGE_TABLES = ("qdb_changes", "qdb_change_tables")
#: Changes kept per table at most (the oldest go first).
MAX_CHANGES_PER_TABLE = 100_000
#: Prefix of the triggers' names (an authorizer lets their inserts into the log through).
TRIGGER_PREFIX = "qdb_change_"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS qdb_changes ("
    " event_id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, kind TEXT NOT NULL,"
    " key INTEGER, row TEXT NOT NULL, created_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS qdb_changes_tbl ON qdb_changes (tbl, event_id)",
    "CREATE INDEX IF NOT EXISTS qdb_changes_created ON qdb_changes (created_at)",
    "CREATE TABLE IF NOT EXISTS qdb_change_tables ("
    " tbl TEXT PRIMARY KEY, columns TEXT NOT NULL, trimmed_through INTEGER NOT NULL,"
    " created_at REAL NOT NULL)",
)
_NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"
#: Column pairs per json_object call (SQLite functions take at most 127 arguments).
_PAIRS_PER_OBJECT = 50


@attrs.frozen
class LoggedTable:
    """A table whose changes are logged: its name as SQLite knows it, its logged
    columns, and the declared type of each column it has now (by name)."""

    name: str
    columns: tuple[str, ...]
    trimmed_through: int
    decltypes: dict[str, str | None] = attrs.field(factory=dict)


@attrs.frozen
class Change:
    """One logged change."""

    event_id: int
    kind: str
    key: int | None
    row: dict[str, Any]


def open_log_connection(path: str) -> sqlite3.Connection:
    """A connection of its own to the cluster's file with the log's tables (any thread)."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        for statement in SCHEMA:
            conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def trigger_names(table: str) -> dict[str, str]:
    """The names of a table's three triggers (from a hash: any table name works)."""
    tag = hashlib.sha256(table.lower().encode("utf-8")).hexdigest()[:16]
    return {kind: f"{TRIGGER_PREFIX}{tag}_{kind}" for kind in ("insert", "update", "delete")}


def _row_sql(columns: Sequence[str], ref: str) -> str:
    def value(column: str) -> str:
        col = f"{ref}.{_quote(column)}"
        return (
            f"json_array(typeof({col}), CASE typeof({col}) WHEN 'blob' THEN hex({col})"
            f" WHEN 'real' THEN printf('%!.17g', {col}) ELSE {col} END)"
        )

    objects = []
    for start in range(0, len(columns), _PAIRS_PER_OBJECT):
        pairs = ", ".join(
            f"{_literal(c)}, {value(c)}" for c in columns[start : start + _PAIRS_PER_OBJECT]
        )
        objects.append(f"json_object({pairs})")
    return f"json_array({', '.join(objects)})"


def _find_table(conn: sqlite3.Connection, table: str) -> str:
    row = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE",
        (table,),
    ).fetchone()
    if row is None or row[0].lower().startswith(("qdb_", "sqlite_")):
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"no table named {table!r} to subscribe to",
            details={"table": table},
        )
    name = row[0]
    try:
        conn.execute(f"SELECT rowid FROM {_quote(name)} LIMIT 0")
    except sqlite3.Error as exc:
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"table {name!r} has no rowid (WITHOUT ROWID): its changes can't be keyed",
        ) from exc
    return name


def ensure_logged(conn: sqlite3.Connection, table: str, now: float) -> LoggedTable:
    """Make sure ``table``'s changes are logged (creating its triggers if missing)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        name = _find_table(conn, table)
        names = trigger_names(name)
        known = conn.execute(
            "SELECT columns, trimmed_through FROM qdb_change_tables WHERE tbl = ?", (name,)
        ).fetchone()
        present = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (name,)
            )
        }
        info = conn.execute(f"PRAGMA table_info({_quote(name)})").fetchall()
        decltypes = {column[1]: column[2] or None for column in info}
        if known is not None and set(names.values()) <= present:
            conn.execute("COMMIT")
            return LoggedTable(name, tuple(json.loads(known[0])), known[1], decltypes)
        columns = [column[1] for column in info]
        for kind, trigger in names.items():
            ref = "OLD" if kind == "delete" else "NEW"
            conn.execute(f"DROP TRIGGER IF EXISTS {_quote(trigger)}")
            conn.execute(
                f"CREATE TRIGGER {_quote(trigger)} AFTER {kind.upper()} ON {_quote(name)}"
                f" FOR EACH ROW BEGIN INSERT INTO qdb_changes (tbl, kind, key, row, created_at)"
                f" VALUES ({_literal(name)}, {_literal(kind)}, {ref}.rowid,"
                f" {_row_sql(columns, ref)}, {_NOW_SQL}); END"
            )
        trimmed = known[1] if known is not None else 0
        conn.execute(
            "INSERT OR REPLACE INTO qdb_change_tables (tbl, columns, trimmed_through, created_at)"
            " VALUES (?, ?, ?, ?)",
            (name, json.dumps(columns), trimmed, now),
        )
        conn.execute("COMMIT")
        return LoggedTable(name, tuple(columns), trimmed, decltypes)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def newest_event_id(conn: sqlite3.Connection) -> int:
    """The id of the newest change ever logged in the cluster (0 if none)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'qdb_changes'").fetchone()
    return int(row[0]) if row is not None else 0


def trimmed_through(conn: sqlite3.Connection, table: str) -> int:
    """The newest event of ``table`` trimmed from the log (0 if none)."""
    row = conn.execute(
        "SELECT trimmed_through FROM qdb_change_tables WHERE tbl = ?", (table,)
    ).fetchone()
    return int(row[0]) if row is not None else 0


def _value(pair: Any) -> Any:
    kind, value = pair
    if kind == "blob":
        return bytes.fromhex(value)
    if kind == "real":
        return float(value)
    return value


def read_changes(conn: sqlite3.Connection, table: str, from_event: int, limit: int) -> list[Change]:
    """Up to ``limit`` changes of ``table`` from ``from_event`` on, oldest first."""
    changes = []
    for event_id, kind, key, text in conn.execute(
        "SELECT event_id, kind, key, row FROM qdb_changes WHERE tbl = ? AND event_id >= ?"
        " ORDER BY event_id LIMIT ?",
        (table, from_event, limit),
    ):
        row: dict[str, Any] = {}
        for part in json.loads(text):
            row.update({name: _value(pair) for name, pair in part.items()})
        changes.append(Change(event_id, kind, key, row))
    return changes


def trim(conn: sqlite3.Connection, older_than: float) -> int:
    """Delete changes logged before ``older_than`` (unix seconds) and beyond the
    per-table cap, recording each table's ``trimmed_through``; how many went."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        removed = 0
        for (table,) in conn.execute("SELECT tbl FROM qdb_change_tables").fetchall():
            cap = conn.execute(
                "SELECT event_id FROM qdb_changes WHERE tbl = ? ORDER BY event_id DESC"
                " LIMIT 1 OFFSET ?",
                (table, MAX_CHANGES_PER_TABLE),
            ).fetchone()
            through = conn.execute(
                "SELECT max(event_id) FROM qdb_changes WHERE tbl = ? AND (created_at < ?"
                " OR event_id <= ?)",
                (table, older_than, cap[0] if cap is not None else 0),
            ).fetchone()[0]
            if through is None:
                continue
            removed += conn.execute(
                "DELETE FROM qdb_changes WHERE tbl = ? AND event_id <= ?", (table, through)
            ).rowcount
            conn.execute(
                "UPDATE qdb_change_tables SET trimmed_through = max(trimmed_through, ?)"
                " WHERE tbl = ?",
                (through, table),
            )
        conn.execute("COMMIT")
        return removed
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def where_sql(table: LoggedTable, where: str) -> str:
    """A query that returns a row when the values bound to the table's columns
    satisfy ``where``."""
    values = ", ".join(f"? AS {_quote(c)}" for c in table.columns) or "NULL AS _"
    return f"SELECT 1 FROM (SELECT {values}) AS {_quote(table.name)} WHERE ({where})"


def where_holds(
    conn: sqlite3.Connection, sql: str, table: LoggedTable, row: dict[str, Any]
) -> bool:
    """Whether ``row`` satisfies the subscription's filter (``sql`` from :func:`where_sql`)."""
    params = [row.get(column) for column in table.columns]
    return conn.execute(sql, params).fetchone() is not None
