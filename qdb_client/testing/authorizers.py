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

Both also keep the client's SQL away from the node's own tables
(:data:`INTERNAL_TABLES`: idempotency keys, sessions, the change log and its
tables, the stream spool) and from the change log's triggers: no read, write,
schema change, index or trigger on an internal table, and no trigger named
``qdb_change_...`` created or dropped (:func:`internal_access`). The one
exception is what those triggers do themselves: a write to a subscribed
table fires its trigger, which inserts into ``qdb_changes``; SQLite names
the trigger as the source of that insert, and an insert into ``qdb_changes``
whose source is a trigger named ``qdb_change_<16 hex digits>_insert``
(``_update``, ``_delete``) passes. A client can't create a trigger with such
a name, so only the node's own do. The node's own SQL (key lookups, session
rows, the log's upkeep) runs with no authorizer at all.

Every guard also keeps client SQL inside the database (:func:`sandbox_refusal`):
no :data:`DENIED_FUNCTIONS` call (``fts3_tokenizer`` reads and plants pointers
of the node process), no :data:`DENIED_MODULES` table (``dbstat``: the file's
pages), not the file's path (``PRAGMA database_list``). And the names of
:data:`RESERVED_PREFIXES` are the node's: no object so named is created or
dropped by client SQL, so none can stand in for one the node makes later.

:class:`VacuumGuard` (``VACUUM``, which attaches a scratch database and
runs a transaction of its own): refuses ``VACUUM INTO 'file'``, which would
copy the whole database, every user's rows and the internal tables
included, to a path the client chooses.

A refused statement fails to prepare, so nothing of it runs, and SQLite
caches nothing for it. Neither guard ever answers SQLITE_IGNORE: a statement
compiled as a no-op would stay in the connection's statement cache.
"""

from __future__ import annotations

import sqlite3

__all__ = [
    "ACTING_PRAGMAS",
    "CHANGE_TRIGGER_PREFIX",
    "DAMAGING_PRAGMAS",
    "DENIED_FUNCTIONS",
    "DENIED_MODULES",
    "INTERNAL_TABLES",
    "READING_PRAGMAS",
    "RESERVED_PREFIXES",
    "ReadGuard",
    "VacuumGuard",
    "WriteGuard",
    "internal_access",
    "is_change_trigger",
    "sandbox_refusal",
]

#: The node's own tables, which the client's SQL must never reach: idempotency keys,
#: sessions, the change log and its tables (in the database file), the stream
#: spool (in a file of its own, which the client's SQL can't attach anyway).
INTERNAL_TABLES = frozenset(
    {
        "qdb_idempotency",
        "qdb_sessions",
        "qdb_changes",
        "qdb_change_tables",
        "qdb_stream_spools",
        "qdb_stream_pages",
    }
)
#: Prefixes of every name the node gives an object in the database file (its tables,
#: their indexes, the change log's triggers): client SQL may neither create nor drop
#: a table, view, index, trigger or virtual table (TEMP ones too) so named. Other
#: ``qdb_`` names stay the client's: the driver's saga store is ``qdb_sagas``.
RESERVED_PREFIXES = ("qdb_change", "qdb_idempotency", "qdb_session", "qdb_stream")
#: SQL functions client SQL may not call. ``fts3_tokenizer`` (SQLite built with
#: ENABLE_FTS3_TOKENIZER, as the usual distributions are) returns a pointer of the
#: node process and, with two arguments, installs one that a CREATE VIRTUAL TABLE
#: then calls; ``load_extension`` loads a library. The shell's file functions are
#: listed in case a build has them.
DENIED_FUNCTIONS = frozenset({"edit", "fts3_tokenizer", "load_extension", "readfile", "writefile"})
#: Virtual table modules client SQL may neither read nor create a table of:
#: ``dbstat`` (the page layout of every table, the node's own included) and
#: ``sqlite_dbpage`` (the raw pages: every row of every table); ``fsdir`` (the
#: shell's, in case a build has it) lists the node's files.
DENIED_MODULES = frozenset({"dbstat", "fsdir", "sqlite_dbpage"})
#: The column of ``pragma_database_list`` that holds the database file's path on
#: the node's machine (its ``seq`` and ``name`` columns stay readable).
_PATH_COLUMN = ("pragma_database_list", "file")
#: Prefix of the change log's trigger names (``changelog.trigger_names``).
CHANGE_TRIGGER_PREFIX = "qdb_change_"
_TRIGGER_KINDS = ("insert", "update", "delete")
_HEX = frozenset("0123456789abcdef")

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
#: Pragmas whose assignment changes the shared file for every node or can corrupt it
#: (``journal_mode``, ``schema_version``, ``writable_schema``), or changes the whole
#: node process rather than one connection (memory limits, where temporary files go),
#: which replacing the connection would not undo.
DAMAGING_PRAGMAS = frozenset(
    {
        "data_store_directory",
        "hard_heap_limit",
        "journal_mode",
        "schema_version",
        "soft_heap_limit",
        "temp_store_directory",
        "writable_schema",
    }
)
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


#: Actions whose first argument is a table name.
_TABLE_FIRST = frozenset(
    {
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_TABLE,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_TABLE,
        sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_VTABLE,
    }
)
#: Actions whose second argument is a table name (an index's, a trigger's table).
_TABLE_SECOND = frozenset(
    {
        sqlite3.SQLITE_ALTER_TABLE,
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TEMP_INDEX,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TEMP_INDEX,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_TEMP_TRIGGER,
    }
)
_TRIGGER_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_TEMP_TRIGGER,
    }
)


#: Actions whose first argument names the object created or dropped.
_NAMING = frozenset(
    {
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_INDEX,
        sqlite3.SQLITE_CREATE_TEMP_TABLE,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_VIEW,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_VIEW,
        sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_INDEX,
        sqlite3.SQLITE_DROP_TEMP_TABLE,
        sqlite3.SQLITE_DROP_TEMP_TRIGGER,
        sqlite3.SQLITE_DROP_TEMP_VIEW,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_DROP_VIEW,
        sqlite3.SQLITE_DROP_VTABLE,
    }
)


def is_change_trigger(name: str | None) -> bool:
    """Whether ``name`` is a change-log trigger's: ``qdb_change_<16 hex>_insert``
    (``_update``, ``_delete``), exactly (no pattern matching: fixed positions)."""
    if name is None or not name.startswith(CHANGE_TRIGGER_PREFIX):
        return False
    tag, sep, kind = name[len(CHANGE_TRIGGER_PREFIX) :].partition("_")
    return sep == "_" and len(tag) == 16 and _HEX.issuperset(tag) and kind in _TRIGGER_KINDS


def internal_access(
    action: int, arg1: str | None, arg2: str | None, source: str | None
) -> str | None:
    """What of the node's internals an action of the client's SQL touches (its name,
    for the error), or None: an internal table, a ``qdb_change_...`` trigger, or
    an object created or dropped with a name of the node's (:data:`RESERVED_PREFIXES`).

    An insert into ``qdb_changes`` by a change-log trigger (``source``) is the node's.
    """
    if action in _TRIGGER_ACTIONS and (arg1 or "").lower().startswith(CHANGE_TRIGGER_PREFIX):
        return f"trigger {arg1}"
    table = arg1 if action in _TABLE_FIRST else arg2 if action in _TABLE_SECOND else None
    name = (table or "").lower()
    if name in INTERNAL_TABLES:
        if action == sqlite3.SQLITE_INSERT and name == "qdb_changes" and is_change_trigger(source):
            return None
        return table
    if action in _NAMING and (arg1 or "").lower().startswith(RESERVED_PREFIXES):
        # A client's object with the name of one the node makes later (a view named
        # qdb_changes, say) would take its place in the shared file for good.
        return f"the name {arg1} (names like the node's own tables are reserved for it)"
    return None


def sandbox_refusal(action: int, arg1: str | None, arg2: str | None) -> str | None:
    """What of the node's process or machine an action of the client's SQL would
    reach (for the error), or None: a :data:`DENIED_FUNCTIONS` call, a read or a
    creation of a :data:`DENIED_MODULES` table, the database file's path."""
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in DENIED_FUNCTIONS:
        return f"function {arg2}()"
    if action == sqlite3.SQLITE_READ:
        table = (arg1 or "").lower()
        if table in DENIED_MODULES:
            return f"virtual table {arg1}"
        if (table, (arg2 or "").lower()) == _PATH_COLUMN:
            return "pragma database_list (the path of the database file)"
    if action == sqlite3.SQLITE_CREATE_VTABLE and (arg2 or "").lower() in DENIED_MODULES:
        return f"virtual table module {arg2}"
    return None


class _Sandbox:
    """What both statement guards refuse before anything else (:attr:`internal`): the
    node's internals (:func:`internal_access`) and what reaches out of the database
    (:func:`sandbox_refusal`; ``PRAGMA database_list``, which prints the file's path,
    while the table-valued ``pragma_database_list`` may be read but for its
    ``file`` column)."""

    def __init__(self) -> None:
        #: What was refused, for the error message (None: nothing).
        self.refused: str | None = None
        #: The internal table (or trigger, name, function...) the statement tried to
        #: use (None: none).
        self.internal: str | None = None
        self._lists_databases = False

    def _denied(self, action: int, arg1: str | None, arg2: str | None, source: str | None) -> bool:
        internal = internal_access(action, arg1, arg2, source) or sandbox_refusal(
            action, arg1, arg2
        )
        name = (arg1 or "").lower()
        if action == sqlite3.SQLITE_READ and name == "pragma_database_list":
            self._lists_databases = True  # SQLite asks about its columns before the pragma
        elif (
            action == sqlite3.SQLITE_PRAGMA
            and name == "database_list"
            and not self._lists_databases
        ):
            internal = "pragma database_list (the path of the database file)"
        if internal is None:
            return False
        self.internal = internal
        return True


class ReadGuard(_Sandbox):
    """Authorizer of a read: refuses ATTACH, DETACH, acting pragmas, the node's
    internals and what reaches out of the database (:attr:`internal`)."""

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        """SQLite's authorizer callback."""
        if self._denied(action, arg1, arg2, source):
            return sqlite3.SQLITE_DENY
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            self.refused = "ATTACH" if action == sqlite3.SQLITE_ATTACH else "DETACH"
        elif action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in ACTING_PRAGMAS or (arg2 is not None and name not in READING_PRAGMAS):
                self.refused = f"PRAGMA {name}"
        if self.refused is not None:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK


class WriteGuard(_Sandbox):
    """Authorizer of one statement of ``execute`` (``in_batch=False``) or of a batch.

    After the statement: :attr:`refused` names what was refused (the request
    fails), :attr:`skipped` the batch statement that is a no-op (BEGIN,
    COMMIT or END: the node commits the batch itself), and
    :attr:`changes_connection` says that the pooled connection is no longer
    like a fresh one.
    """

    def __init__(self, *, in_batch: bool) -> None:
        super().__init__()
        self.in_batch = in_batch
        #: A transaction statement of a batch that the node skips (None: none).
        self.skipped: str | None = None
        #: Whether the statement changed a setting of the connection or made a TEMP object.
        self.changes_connection = False

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        """SQLite's authorizer callback."""
        if self._denied(action, arg1, arg2, source):
            return sqlite3.SQLITE_DENY
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


class VacuumGuard:
    """Authorizer of a ``VACUUM``: refuses ``VACUUM INTO`` a file (:attr:`refused`).

    A VACUUM attaches a scratch database (its ATTACH names no file: ``''``)
    and copies everything into it, internal tables included, inside a
    transaction of its own; all of that is let through. ``VACUUM INTO
    'path'`` attaches the path the client chose instead, and is refused.
    """

    def __init__(self) -> None:
        #: What was refused, for the error message (None: nothing).
        self.refused: str | None = None

    def __call__(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None
    ) -> int:
        """SQLite's authorizer callback."""
        if action == sqlite3.SQLITE_ATTACH and arg1 != "":
            self.refused = "VACUUM INTO"
            return sqlite3.SQLITE_DENY
        refused = sandbox_refusal(action, arg1, arg2)
        if refused is not None:  # the statement guards' refusals, whatever VACUUM runs
            self.refused = refused
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK
