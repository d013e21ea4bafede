"""SQLite authorizers of the test node: what a request's SQL may do to the file and the pool.

Every node of a cluster opens the same SQLite file, and every request of a
node runs on one of a few pooled connections, in turn. So a statement
must neither damage the shared file nor leave its pooled connection
different for the next request (which may be another client's). SQLite
asks an authorizer about every action while it prepares a statement; the
two here answer for the node.

- :class:`ReadGuard` (``query``, which also runs with ``PRAGMA query_only``):
  refuses what query_only lets through: ATTACH and DETACH (they create files
  and change the pooled connection), pragmas that set a value
  (``journal_mode = delete`` would take the shared file out of WAL) and the
  ones that act without one (``wal_checkpoint``, ``optimize``, ...).
- :class:`WriteGuard` (``execute``, ``batch``): refuses ATTACH, DETACH and
  the pragmas that would damage the shared file (``journal_mode``,
  ``schema_version``, ``writable_schema``); refuses transaction control
  (BEGIN, COMMIT, END, ROLLBACK, SAVEPOINT, RELEASE) through ``execute``, and
  inside a batch ROLLBACK, while it records a batch's BEGIN, COMMIT and END
  as no-ops; and notes the statements that change the pooled connection (a
  pragma setting a value, a TEMP object) so that the storage replaces that
  connection once the request is over.

A refused statement fails to prepare, so nothing of it runs, and SQLite
caches nothing for it. Neither guard ever answers SQLITE_IGNORE: a statement
compiled as a no-op would stay in the connection's statement cache.
"""

from __future__ import annotations

import sqlite3

__all__ = [
    "ACTING_PRAGMAS",
    "DAMAGING_PRAGMAS",
    "READING_PRAGMAS",
    "ReadGuard",
    "WriteGuard",
]

#: Pragmas that take an argument and still only read (``PRAGMA table_info(t)``).
READING_PRAGMAS = frozenset(
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
#: Pragmas that act even without an argument (on the file, not on the connection's settings).
ACTING_PRAGMAS = frozenset({"incremental_vacuum", "optimize", "shrink_memory", "wal_checkpoint"})
#: Pragmas whose assignment changes the shared file for every node, or can corrupt it.
DAMAGING_PRAGMAS = frozenset({"journal_mode", "schema_version", "writable_schema"})
#: Pragmas whose assignment is a write to the file itself, like any other data.
_FILE_PRAGMAS = frozenset({"application_id", "user_version"})

#: The statement behind each SAVEPOINT action (its ``arg1``).
_SAVEPOINT_FORMS = {"BEGIN": "SAVEPOINT", "RELEASE": "RELEASE", "ROLLBACK": "ROLLBACK TO"}
_TEMP_CREATES = frozenset(
    {
        sqlite3.SQLITE_CREATE_TEMP_INDEX,
        sqlite3.SQLITE_CREATE_TEMP_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_VIEW,
    }
)
#: Creations that make a TEMP object when their schema is ``temp`` (``CREATE TABLE temp.t``).
_CREATES = frozenset(
    {
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_VIEW,
        sqlite3.SQLITE_CREATE_VTABLE,
    }
)


class ReadGuard:
    """Authorizer of a read: refuses ATTACH, DETACH and acting pragmas."""

    def __init__(self) -> None:
        #: What was refused, for the error message (None: nothing).
        self.refused: str | None = None

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        """SQLite's authorizer callback."""
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            self.refused = "ATTACH" if action == sqlite3.SQLITE_ATTACH else "DETACH"
        elif action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in ACTING_PRAGMAS or (arg2 is not None and name not in READING_PRAGMAS):
                self.refused = f"PRAGMA {name}"
        if self.refused is not None:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK


class WriteGuard:
    """Authorizer of one statement of ``execute`` (``in_batch=False``) or of a batch.

    After the statement: :attr:`refused` names what was refused (the request
    fails), :attr:`skipped` the batch statement that is a no-op (BEGIN,
    COMMIT or END: the node commits the batch itself), and
    :attr:`changes_connection` says that the pooled connection is no longer
    like a fresh one.
    """

    def __init__(self, *, in_batch: bool) -> None:
        self.in_batch = in_batch
        #: What was refused, for the error message (None: nothing).
        self.refused: str | None = None
        #: A transaction statement of a batch that the node skips (None: none).
        self.skipped: str | None = None
        #: Whether the statement changed a setting of the connection or made a TEMP object.
        self.changes_connection = False

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        """SQLite's authorizer callback."""
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            self.refused = "ATTACH" if action == sqlite3.SQLITE_ATTACH else "DETACH"
        elif action == sqlite3.SQLITE_PRAGMA:
            self._pragma((arg1 or "").lower(), arg2)
        elif action == sqlite3.SQLITE_TRANSACTION:
            what = arg1 or "BEGIN"
            if self.in_batch and what != "ROLLBACK":
                self.skipped = what
            else:
                self.refused = what
        elif action == sqlite3.SQLITE_SAVEPOINT and not self.in_batch:
            self.refused = _SAVEPOINT_FORMS.get(arg1 or "", "SAVEPOINT")
        elif action in _TEMP_CREATES or (action in _CREATES and db == "temp"):
            self.changes_connection = True
        if self.refused is not None or self.skipped is not None:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _pragma(self, name: str, value: str | None) -> None:
        if value is None or name in READING_PRAGMAS or name in ACTING_PRAGMAS:
            return  # reads, or acts on the file
        if name in DAMAGING_PRAGMAS:
            self.refused = f"PRAGMA {name}"
        elif name not in _FILE_PRAGMAS:
            self.changes_connection = True
