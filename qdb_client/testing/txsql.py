"""The SQL of a ``begin`` transaction, on its own connection, in a worker thread.

docs/protocol.md section 10.2. :mod:`.transactions` decides when; this
module runs it (through :meth:`.storage.Storage.run_on`, so the transaction
stays open between requests):

- :func:`begin`: ``BEGIN DEFERRED`` (the write lock is taken at the first
  write), plus ``PRAGMA query_only`` for a read-only transaction;
- :func:`in_savepoint`: one write request inside the transaction, all or
  nothing (its failure leaves the transaction as it was);
- :func:`commit`: store the outcome under the commit's idempotency key in the
  transaction itself, then COMMIT.

**Commit and its fence.** The key row is *inserted*, not looked up first: a
deferred transaction reads from the snapshot of its first read, where a
fence written since (another node's "not committed" for this key) is not
visible, but an INSERT needs the write lock, which WAL only grants at the
newest snapshot. So the insert either fails on the primary key, with the
newest snapshot in hand (the stored outcome is read and is the answer: the
transaction is rolled back), or cannot take the lock because the snapshot is
stale (SQLITE_BUSY_SNAPSHOT: a write conflict, nothing stored, nothing
applied). A transaction that wrote nothing has nothing to lose: its reads
end, and the key is stored in a transaction of its own (``BEGIN IMMEDIATE``,
:func:`~.statements.run_keyed`) at the newest snapshot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import cbor2

from .idempotency import IdempotencyKey, KeyedOutcome, KeyedResult
from .statements import Control, commit_now
from .writes import PURGE_LIMIT, run_keyed

__all__ = [
    "COMMITTED",
    "NOT_COMMITTED",
    "SAVEPOINT",
    "begin",
    "commit",
    "in_savepoint",
    "rollback",
]

T = TypeVar("T")

#: The stored outcome of a commit that applied, and the RESPONSE result.
COMMITTED: dict[str, Any] = {"committed": True}
#: The stored outcome of a fenced key: the transaction did not commit and never will.
NOT_COMMITTED: dict[str, Any] = {"committed": False, "reason": "not committed"}
#: The savepoint around each write request of a transaction.
SAVEPOINT = "qdb_request"


def begin(conn: sqlite3.Connection, *, read_only: bool) -> None:
    """Open the transaction (thread side)."""
    conn.execute("BEGIN DEFERRED")
    if read_only:
        conn.execute("PRAGMA query_only = ON")


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back whatever is open (a cancel's interrupt may hit the first try)."""
    for _ in range(2):
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError:
            continue


def in_savepoint(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``work`` inside a savepoint of the open transaction: on failure it is
    undone and the transaction goes on (unless SQLite ended it)."""
    conn.execute(f"SAVEPOINT {SAVEPOINT}")
    try:
        result = work(conn)
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute(f"ROLLBACK TO {SAVEPOINT}")
                conn.execute(f"RELEASE {SAVEPOINT}")
            except sqlite3.Error:
                pass  # the transaction is gone with it; the caller sees that
        raise
    conn.execute(f"RELEASE {SAVEPOINT}")
    return result


def commit(
    conn: sqlite3.Connection,
    key: IdempotencyKey,
    *,
    wrote: bool,
    clock: Callable[[], float],
    ttl: float,
    control: Control,
) -> KeyedResult:
    """Commit the open transaction with its outcome stored under ``key`` (see the
    module docstring). Whatever happens, the transaction is over afterwards.

    STORED: committed. REPLAYED: the key already had an outcome (the
    transaction was rolled back; the stored outcome is the answer).
    CONFLICT: the key is stored for another request (rolled back). A failure
    (a deferred constraint, a stale snapshot) raises, rolled back.
    """
    try:
        if not wrote:
            rollback(conn)
            conn.execute("PRAGMA query_only = OFF")
            return run_keyed(
                conn, key, lambda c: dict(COMMITTED), clock=clock, ttl=ttl, control=control
            )
        control.checkpoint()
        now = clock()
        outcome = cbor2.dumps(COMMITTED)
        try:
            conn.execute(
                "INSERT INTO qdb_idempotency (scope, key, request_hash, result, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (key.scope, key.key, key.request_hash, outcome, now),
            )
        except sqlite3.IntegrityError:
            # We hold the write lock now, so this reads the newest snapshot.
            row = conn.execute(
                "SELECT request_hash, result, created_at FROM qdb_idempotency"
                " WHERE scope = ? AND key = ?",
                (key.scope, key.key),
            ).fetchone()
            if row is not None and now < row[2] + ttl:
                rollback(conn)
                if bytes(row[0]) != key.request_hash:
                    return KeyedResult(KeyedOutcome.CONFLICT)
                return KeyedResult(KeyedOutcome.REPLAYED, cbor2.loads(row[1]))
            conn.execute(  # expired: the key counts as absent
                "INSERT OR REPLACE INTO qdb_idempotency"
                " (scope, key, request_hash, result, created_at) VALUES (?, ?, ?, ?, ?)",
                (key.scope, key.key, key.request_hash, outcome, now),
            )
        conn.execute(
            "DELETE FROM qdb_idempotency WHERE rowid IN"
            " (SELECT rowid FROM qdb_idempotency WHERE created_at <= ? LIMIT ?)",
            (now - ttl, PURGE_LIMIT),
        )
        control.checkpoint()
        commit_now(conn)
        return KeyedResult(KeyedOutcome.STORED, dict(COMMITTED))
    finally:
        rollback(conn)  # a failure (or a deferred constraint at COMMIT) leaves nothing open
