"""What a statement looks like before it runs: its columns' declared types and its parameters.

Typed results (docs/protocol.md section 10.1) need each result column's
*declared* type, and ``prepare`` (section 10.3) the number and names of a
statement's parameters. Python's ``sqlite3`` module exposes neither:
``cursor.description`` has only names, and ``detect_types`` hands a
converter the value without saying which declared type chose it (through
a registry that is global to the process). SQLite's C API has both:
``sqlite3_column_decltype`` and ``sqlite3_bind_parameter_count`` / ``_name``.

So a :class:`StatementProbe` prepares the statement, without running it, on
a connection of its own to the node's database file, through ``ctypes``, and
finalizes it. It uses the very SQLite library the ``sqlite3`` module is linked
against (looked up through the ``_sqlite3`` extension), never a second copy:
two copies of SQLite in one process can corrupt a database (their POSIX
locks don't see each other). Where that library can't be reached this way,
there is no probe: result types are null, values come back as stored, and
``prepare`` counts parameters with :func:`scan_parameters`.

Descriptions are cached per SQL text and schema version (``PRAGMA
schema_version`` of the connection the statement runs on). Before preparing,
the probe reads ``sqlite_schema`` in the same read transaction, which brings
its view of the schema up to date.

Limits: the probe sees what is committed. A table created in the same open
transaction (a ``begin`` transaction or a batch) or a TEMP table of the
request's own connection is unknown to it, so such a statement's columns
have no types (null) and ``prepare`` of it fails as "no such table".
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = ["Description", "ProbeError", "StatementProbe", "named", "scan_parameters"]

logger = logging.getLogger("qdb_client.testing")

#: Descriptions kept per probe, and the longest SQL text worth caching.
CACHE_SIZE = 512
_CACHE_MAX_SQL = 8192

_SQLITE_OK, _SQLITE_ROW = 0, 100
_OPEN_READWRITE, _OPEN_URI = 0x2, 0x40
_P = ctypes.c_void_p


@attrs.frozen
class Description:
    """A prepared (never run) statement: result ``columns`` (names) with their
    ``decltypes`` (None for an expression), its parameter count and the name of
    each (None for ``?``), and ``rest``: text after the first statement."""

    columns: tuple[str, ...]
    decltypes: tuple[str | None, ...]
    param_count: int
    param_names: tuple[str | None, ...]
    rest: str = ""


class ProbeError(Exception):
    """SQLite could not prepare the statement; ``str()`` is its message."""


def _load_library() -> Any:
    """The C library behind the ``sqlite3`` module, or None."""
    try:
        import _sqlite3  # the extension module: dlsym on it finds its own SQLite

        lib = ctypes.CDLL(_sqlite3.__file__)
        lib.sqlite3_prepare_v2  # noqa: B018 - raises AttributeError if not exported
    except (ImportError, OSError, AttributeError) as exc:
        logger.info("no statement probe (declared types and parameters): %s", exc)
        return None
    lib.sqlite3_open_v2.argtypes = [ctypes.c_char_p, ctypes.POINTER(_P), ctypes.c_int, _P]
    lib.sqlite3_close_v2.argtypes = [_P]
    lib.sqlite3_busy_timeout.argtypes = [_P, ctypes.c_int]
    lib.sqlite3_prepare_v2.argtypes = [_P, _P, ctypes.c_int, ctypes.POINTER(_P), ctypes.POINTER(_P)]
    lib.sqlite3_step.argtypes = [_P]
    lib.sqlite3_finalize.argtypes = [_P]
    lib.sqlite3_errmsg.argtypes = [_P]
    lib.sqlite3_errmsg.restype = ctypes.c_char_p
    lib.sqlite3_column_count.argtypes = [_P]
    lib.sqlite3_column_name.argtypes = [_P, ctypes.c_int]
    lib.sqlite3_column_name.restype = ctypes.c_char_p
    lib.sqlite3_column_decltype.argtypes = [_P, ctypes.c_int]
    lib.sqlite3_column_decltype.restype = ctypes.c_char_p
    lib.sqlite3_column_int64.argtypes = [_P, ctypes.c_int]
    lib.sqlite3_column_int64.restype = ctypes.c_int64
    lib.sqlite3_bind_parameter_count.argtypes = [_P]
    lib.sqlite3_bind_parameter_name.argtypes = [_P, ctypes.c_int]
    lib.sqlite3_bind_parameter_name.restype = ctypes.c_char_p
    return lib


_LIBRARY: Any = None
_LIBRARY_LOADED = False
_LIBRARY_LOCK = threading.Lock()


def _library() -> Any:
    global _LIBRARY, _LIBRARY_LOADED
    with _LIBRARY_LOCK:
        if not _LIBRARY_LOADED:
            _LIBRARY, _LIBRARY_LOADED = _load_library(), True
        return _LIBRARY


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "replace")


class StatementProbe:
    """Prepares statements on a connection of its own to ``path``; thread-safe.

    :attr:`available` is False when the SQLite library can't be reached
    (then :meth:`describe` raises ProbeError). :meth:`close` releases the
    connection (idempotent).
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._lib = _library()
        self._db: Any = None
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[str, tuple[int, Description]] = (
            collections.OrderedDict()
        )
        self._closed = False

    @property
    def available(self) -> bool:
        """Whether statements can be described."""
        return self._lib is not None and not self._closed

    def close(self) -> None:
        """Close the probe's connection."""
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._lib.sqlite3_close_v2(self._db)
                self._db = None
            self._cache.clear()

    def cached(self, sql: str, schema_version: int) -> Description | None:
        """The cached description of ``sql`` at ``schema_version``, or None."""
        with self._lock:
            entry = self._cache.get(sql)
            if entry is None or entry[0] != schema_version:
                return None
            self._cache.move_to_end(sql)
            return entry[1]

    def describe(self, sql: str, schema_version: int | None = None) -> Description:
        """Prepare ``sql`` and describe it (ProbeError if SQLite can't prepare it).

        With ``schema_version`` (the statement's own connection's), a
        description at that version is cached and reused.
        """
        if schema_version is not None:
            hit = self.cached(sql, schema_version)
            if hit is not None:
                return hit
        with self._lock:
            if not self.available:
                raise ProbeError("statements can't be described on this platform")
            version, description = self._prepare(sql)
            if version is not None and version == schema_version and len(sql) <= _CACHE_MAX_SQL:
                self._cache[sql] = (version, description)
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            return description

    # ------------------------------------------------------------ C calls (locked)

    def _connection(self) -> Any:
        if self._db is None:
            db = _P()
            rc = self._lib.sqlite3_open_v2(
                self._path.encode("utf-8"), ctypes.byref(db), _OPEN_READWRITE, None
            )
            if rc != _SQLITE_OK:
                message = _text(self._lib.sqlite3_errmsg(db)) if db else f"error {rc}"
                self._lib.sqlite3_close_v2(db)
                raise ProbeError(f"cannot open {self._path}: {message}")
            self._lib.sqlite3_busy_timeout(db, 1000)
            self._db = db
        return self._db

    def _run(self, db: Any, sql: bytes) -> int | None:
        """Step ``sql`` once; the first column of its row as an int (None if no row)."""
        buffer = ctypes.create_string_buffer(sql)
        stmt = _P()
        if self._lib.sqlite3_prepare_v2(db, buffer, len(sql), ctypes.byref(stmt), None):
            raise ProbeError(_text(self._lib.sqlite3_errmsg(db)) or "cannot prepare")
        try:
            if self._lib.sqlite3_step(stmt) != _SQLITE_ROW:
                return None
            return int(self._lib.sqlite3_column_int64(stmt, 0))
        finally:
            self._lib.sqlite3_finalize(stmt)

    def _prepare(self, sql: str) -> tuple[int | None, Description]:
        lib, db = self._lib, self._connection()
        self._run(db, b"BEGIN")
        try:
            self._run(db, b"SELECT 1 FROM sqlite_schema LIMIT 1")  # refreshes the schema
            version = self._run(db, b"PRAGMA schema_version")
            data = sql.encode("utf-8")
            buffer = ctypes.create_string_buffer(data)
            stmt, tail = _P(), _P()
            rc = lib.sqlite3_prepare_v2(
                db, buffer, len(data), ctypes.byref(stmt), ctypes.byref(tail)
            )
            if rc != _SQLITE_OK:
                raise ProbeError(_text(lib.sqlite3_errmsg(db)) or f"error {rc}")
            if not stmt:
                raise ProbeError("the text holds no statement")
            try:
                count = lib.sqlite3_column_count(stmt)
                columns = tuple(_text(lib.sqlite3_column_name(stmt, i)) or "" for i in range(count))
                decltypes = tuple(_text(lib.sqlite3_column_decltype(stmt, i)) for i in range(count))
                params = lib.sqlite3_bind_parameter_count(stmt)
                names = tuple(
                    _text(lib.sqlite3_bind_parameter_name(stmt, i + 1)) for i in range(params)
                )
            finally:
                lib.sqlite3_finalize(stmt)
            used = (tail.value or ctypes.addressof(buffer)) - ctypes.addressof(buffer)
            rest = data[used:].decode("utf-8", "replace")
            return version, Description(columns, decltypes, params, names, rest)
        finally:
            self._run(db, b"COMMIT")


# -------------------------------------------------------------------- fallback


def scan_parameters(sql: str) -> tuple[int, tuple[str | None, ...]]:
    """Count the parameters of ``sql`` without SQLite: ``?``, ``?NNN``, ``:name``,
    ``@name`` and ``$name`` outside strings, quoted names and comments (the
    fallback when there is no probe). Returns (count, names) as the probe does."""
    names: list[str | None] = []
    index: dict[str, int] = {}
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            end = sql.find(close, i + 1)
            i = n if end < 0 else end + 1
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == "?":
            j = i + 1
            while j < n and sql[j].isdigit():
                j += 1
            if j > i + 1:
                number = int(sql[i + 1 : j])
                while len(names) < number:
                    names.append(None)
                names[number - 1] = sql[i:j]
            else:
                names.append(None)
            i = j
        elif c in ":@$" and i + 1 < n and (sql[i + 1].isalnum() or sql[i + 1] == "_"):
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "_"):
                j += 1
            name = sql[i:j]
            if name not in index:
                names.append(name)
                index[name] = len(names)
            i = j
        else:
            i += 1
    return len(names), tuple(names)


def named(names: Sequence[str | None]) -> list[str] | None:
    """The parameter names a client uses (without ``:``/``@``/``$``) when every
    parameter is named; [] when none is; None when the two are mixed."""
    plain = [name[1:] for name in names if name is not None and not name.startswith("?")]
    if not plain:
        return []
    if len(plain) != len(names):
        return None
    return plain
