"""The spool of result streams in the cluster's shared SQLite file (thread side, no trio).

A ``query_stream`` runs its query to the end in one read transaction (one
snapshot) and writes the result, page by page, into the cluster's shared
store before page 0 is sent (docs/protocol.md section 12.1): two tables of
the spool file, ``<database>-streams`` beside the cluster's database file,
which every node opens too (:func:`spool_path`):

- ``qdb_stream_spools``: one row per stream: its id (16 random bytes), the
  user it belongs to, columns, types, page and row counts, the digest, when
  it expires, and its state (``spooling``, ``ready``, or ``deleted``: a
  tombstone, so that a resume of an expired stream says ``expired`` rather
  than ``unknown``);
- ``qdb_stream_pages``: one row per page: the CBOR of its rows, each in the
  deterministic encoding (the bytes the digest covers and the frame carries).

So any node can continue a stream from a token, with exactly the rows of
the original snapshot, however the tables changed since. Memory stays
bounded by one page while spooling and while sending. A file of its own
(WAL mode, like the database) keeps spooling clear of the database's write
lock: a 10 MB spool never holds up the cluster's writers, and a transaction
that holds the lock can still stream. The client's SQL can't reach the
spool at all (ATTACH is refused).

A token is ``01`` + the stream id + the page's ``seq`` (8 bytes, big-endian):
unguessable (128 random bits), and bound to the user, which a resume must
match (another user's token is "unknown"). The SQL of the client never
reaches these tables: a query's authorizer denies them
(:data:`INTERNAL_TABLES`, also to be denied by the node's own guards).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import cbor2

from ..protocol import ErrorCode
from ..protocol.stream_codec import encode_row
from ._failure import RequestFailed
from .authorizers import INTERNAL_TABLES as _INTERNAL_TABLES

__all__ = [
    "INTERNAL_TABLES",
    "SCHEMA",
    "SPOOL_TABLES",
    "Spool",
    "SpoolWriter",
    "delete_spool",
    "expire_spools",
    "lookup_spool",
    "make_token",
    "open_spool_connection",
    "parse_token",
    "read_page",
    "spool_path",
    "touch_spool",
]

#: Tables of the stream spool.
SPOOL_TABLES = ("qdb_stream_spools", "qdb_stream_pages")
#: Tables the client's SQL must never reach (idempotency keys, sessions, the change
#: log's; the spool's are in a file of their own, listed for completeness): the
#: authorizers' list (:data:`~.authorizers.INTERNAL_TABLES`).
INTERNAL_TABLES = _INTERNAL_TABLES
#: Created on first use by any node (idempotent).
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS qdb_stream_spools ("
    " stream_id BLOB PRIMARY KEY, scope TEXT NOT NULL, columns BLOB NOT NULL,"
    " types BLOB, pages INTEGER NOT NULL, row_count INTEGER NOT NULL,"
    " digest BLOB NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,"
    " state TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS qdb_stream_spools_expires ON qdb_stream_spools (expires_at)",
    "CREATE TABLE IF NOT EXISTS qdb_stream_pages ("
    " stream_id BLOB NOT NULL, seq INTEGER NOT NULL, row_count INTEGER NOT NULL,"
    " rows BLOB NOT NULL, PRIMARY KEY (stream_id, seq)) WITHOUT ROWID",
)
#: Seconds a tombstone of a deleted stream is kept (so a late resume says "expired").
TOMBSTONE_SECONDS = 24 * 3600.0
_TOKEN_VERSION = 1
_ID_SIZE = 16
_TOKEN_SIZE = 1 + _ID_SIZE + 8
#: Page bytes written between two commits (the write lock is released in between).
_COMMIT_BYTES = 1 << 20


def make_token(stream_id: bytes, seq: int) -> bytes:
    """The resume token naming the position right after page ``seq``."""
    return bytes((_TOKEN_VERSION,)) + stream_id + seq.to_bytes(8, "big")


def parse_token(token: Any) -> tuple[bytes, int] | None:
    """``(stream_id, seq)`` of a token this node issued, or None."""
    if type(token) is not bytes or len(token) != _TOKEN_SIZE or token[0] != _TOKEN_VERSION:
        return None
    return token[1 : 1 + _ID_SIZE], int.from_bytes(token[1 + _ID_SIZE :], "big")


@attrs.frozen
class Spool:
    """One spooled stream, as recorded."""

    stream_id: bytes
    scope: str
    columns: tuple[str, ...]
    types: tuple[str | None, ...] | None
    pages: int
    row_count: int
    digest: bytes
    expires_at: float
    state: str


def spool_path(database: str) -> str:
    """The spool file of the cluster whose database file is ``database``."""
    return f"{database}-streams"


def open_spool_connection(path: str, *, patience: float = 10.0) -> sqlite3.Connection:
    """A connection to the spool file ``path`` in WAL mode, its tables created
    (any thread; autocommit mode, so transactions are explicit). Switching a new
    file to WAL needs it alone: nodes starting together retry while it is locked."""
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        give_up = time.monotonic() + patience
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                for statement in SCHEMA:
                    conn.execute(statement)
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > give_up:
                    raise
                time.sleep(0.02)
    except BaseException:
        conn.close()
        raise
    return conn


class SpoolWriter:
    """Writes one stream's pages on ``conn`` (autocommit mode) as the query yields
    rows, committing every megabyte so other writers are not held up.

    ``first_limit``/``page_bytes`` bound the encoded rows of page 0 (which also
    carries the columns) and of the others; ``max_row`` is the largest row
    that fits a frame (a larger one is FRAME_TOO_LARGE).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        scope: str,
        columns: Sequence[str],
        types: Sequence[str | None] | None,
        page_rows: int,
        page_bytes: int,
        first_limit: int,
        max_row: int,
        expires_at: float,
        checkpoint: Callable[[], None],
    ) -> None:
        self.conn = conn
        self.stream_id = secrets.token_bytes(_ID_SIZE)
        self._page_rows = page_rows
        self._page_bytes = page_bytes
        self._limit = first_limit
        self._max_row = max_row
        self._checkpoint = checkpoint
        self._rows: list[bytes] = []
        self._size = 0
        self._uncommitted = 0
        self._digest = hashlib.sha256()
        self.pages = 0
        self.row_count = 0
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO qdb_stream_spools (stream_id, scope, columns, types, pages, row_count,"
            " digest, created_at, expires_at, state) VALUES (?, ?, ?, ?, 0, 0, x'', ?, ?,"
            " 'spooling')",
            (
                self.stream_id,
                scope,
                cbor2.dumps(list(columns)),
                None if types is None else cbor2.dumps(list(types)),
                time.time(),
                expires_at,
            ),
        )

    def add(self, row: list[Any]) -> None:
        """One row of the result (values converted already)."""
        data = encode_row(row)
        if len(data) > self._max_row:
            raise RequestFailed(
                ErrorCode.FRAME_TOO_LARGE,
                f"a row of {len(data)} bytes can't fit the client's maximum frame",
                details={"row_size": len(data)},
            )
        if self._rows and (
            len(self._rows) >= self._page_rows or self._size + len(data) > self._limit
        ):
            self._flush()
        self._rows.append(data)
        self._size += len(data)
        self._digest.update(data)
        self.row_count += 1

    def _flush(self) -> None:
        self._checkpoint()
        blob = b"".join(self._rows)
        self.conn.execute(
            "INSERT INTO qdb_stream_pages (stream_id, seq, row_count, rows) VALUES (?, ?, ?, ?)",
            (self.stream_id, self.pages, len(self._rows), blob),
        )
        self.pages += 1
        self._uncommitted += len(blob)
        self._rows, self._size, self._limit = [], 0, self._page_bytes
        if self._uncommitted >= _COMMIT_BYTES:
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN IMMEDIATE")
            self._uncommitted = 0

    def finish(self) -> Spool:
        """Write the last page (page 0 even when empty) and the totals; commit."""
        if self._rows or self.pages == 0:
            self._flush()
        self._checkpoint()
        digest = self._digest.digest()
        self.conn.execute(
            "UPDATE qdb_stream_spools SET pages = ?, row_count = ?, digest = ?, state = 'ready'"
            " WHERE stream_id = ?",
            (self.pages, self.row_count, digest, self.stream_id),
        )
        self.conn.execute("COMMIT")
        spool = lookup_spool(self.conn, self.stream_id)
        assert spool is not None
        return spool

    def abandon(self) -> None:
        """The spool failed (deadline, CANCEL, error): nothing of it is kept."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        delete_spool(self.conn, self.stream_id, tombstone=False)


def lookup_spool(conn: sqlite3.Connection, stream_id: bytes) -> Spool | None:
    """The spool of ``stream_id`` (a tombstone included), or None."""
    row = conn.execute(
        "SELECT scope, columns, types, pages, row_count, digest, expires_at, state"
        " FROM qdb_stream_spools WHERE stream_id = ?",
        (stream_id,),
    ).fetchone()
    if row is None:
        return None
    scope, columns, types, pages, row_count, digest, expires_at, state = row
    return Spool(
        stream_id,
        scope,
        tuple(cbor2.loads(columns)),
        None if types is None else tuple(cbor2.loads(types)),
        pages,
        row_count,
        bytes(digest),
        expires_at,
        state,
    )


def read_page(conn: sqlite3.Connection, stream_id: bytes, seq: int) -> tuple[int, bytes] | None:
    """``(row_count, rows' bytes)`` of page ``seq``, or None if it is gone."""
    row = conn.execute(
        "SELECT row_count, rows FROM qdb_stream_pages WHERE stream_id = ? AND seq = ?",
        (stream_id, seq),
    ).fetchone()
    return None if row is None else (row[0], bytes(row[1]))


def touch_spool(conn: sqlite3.Connection, stream_id: bytes, expires_at: float) -> bool:
    """Keep a live spool until ``expires_at``; False if it is gone (or expired)."""
    cursor = conn.execute(
        "UPDATE qdb_stream_spools SET expires_at = max(expires_at, ?)"
        " WHERE stream_id = ? AND state = 'ready'",
        (expires_at, stream_id),
    )
    return cursor.rowcount == 1


def delete_spool(conn: sqlite3.Connection, stream_id: bytes, *, tombstone: bool = True) -> None:
    """Delete a stream's pages; keep a tombstone (state ``deleted``) or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM qdb_stream_pages WHERE stream_id = ?", (stream_id,))
        if tombstone:
            conn.execute(
                "UPDATE qdb_stream_spools SET state = 'deleted' WHERE stream_id = ?", (stream_id,)
            )
        else:
            conn.execute("DELETE FROM qdb_stream_spools WHERE stream_id = ?", (stream_id,))
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def expire_spools(conn: sqlite3.Connection, now: float, *, limit: int = 16) -> int:
    """Delete the pages of up to ``limit`` spools past their expiry (keeping
    tombstones), and old tombstones; return how many spools expired."""
    expired = [
        row[0]
        for row in conn.execute(
            "SELECT stream_id FROM qdb_stream_spools WHERE expires_at < ? AND state != 'deleted'"
            " LIMIT ?",
            (now, limit),
        )
    ]
    for stream_id in expired:
        delete_spool(conn, stream_id)
    conn.execute(
        "DELETE FROM qdb_stream_spools WHERE rowid IN (SELECT rowid FROM qdb_stream_spools"
        " WHERE state = 'deleted' AND expires_at < ? LIMIT ?)",
        (now - TOMBSTONE_SECONDS, limit),
    )
    return len(expired)
