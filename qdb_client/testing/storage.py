"""SQLite storage of a test node: a small pool of connections used from worker threads.

All nodes of a cluster open the same database file (WAL mode, busy timeout
5 s), so a write through one node is visible through every other. Each
statement runs in a worker thread (``trio.to_thread.run_sync``) on one
pooled connection at a time.

Deadlines: waiting for a pooled connection is bounded by the request
deadline in trio time. Running a statement is real work that a virtual
clock cannot speed up, so it gets the remaining budget in *real* time: a
SQLite progress handler aborts the statement once the budget is spent, and
cancelling the waiting task (CANCEL, dropped connection, shutdown) calls
``connection.interrupt()``. Either way SQLite stops with SQLITE_INTERRUPT
and rolls the statement (or batch transaction) back, reported as TIMEOUT
with ``details={"executed": False}`` (which the connection turns into
CANCELLED when the client's CANCEL caused it).

Idempotency keys (:mod:`.idempotency`, :func:`.statements.run_keyed`): a
keyed write runs in one transaction opened with ``BEGIN IMMEDIATE``, which
takes SQLite's write lock up front and so serialises keyed writes across
connections *and* processes sharing the file. Inside it the key is looked
up; a live entry is replayed (or is a CONFLICT) without executing anything,
otherwise the statements run and the result is stored under the key before
COMMIT. Any failure, an interrupt at the deadline or by CANCEL included,
rolls the whole transaction back: nothing applied, nothing stored. Expired
entries count as absent and are purged, a bounded number per stored key.

What runs on a connection (the SQL of each method, read-only queries,
the keyed transaction) is in :mod:`.statements`.

Under a ``trio.testing.MockClock`` statements run inline on the event loop
instead of in a worker thread: a thread wait looks idle to the clock, so
autojump would fire unrelated timers (the test's own ``fail_after``, a
driver deadline) while a 1 ms statement runs. Inline, SQL takes exactly
zero virtual time, which keeps virtual-time tests exact.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import trio
import trio.testing

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .idempotency import DEFAULT_TTL, SCHEMA, IdempotencyKey, KeyedResult
from .statements import (
    PURGE_LIMIT,
    BatchFailure,
    Params,
    Statement,
    execute_one,
    query_one,
    run_batch,
    run_keyed,
    run_statements,
)

__all__ = ["BUSY_TIMEOUT_MS", "PURGE_LIMIT", "Params", "Statement", "Storage", "run_keyed"]

logger = logging.getLogger("qdb_client.testing")

#: SQLite busy timeout (waiting for another writer's lock), in milliseconds.
BUSY_TIMEOUT_MS = 5000
#: VM instructions between two deadline checks of the progress handler.
_PROGRESS_STEPS = 1000

T = TypeVar("T")


class _Job:
    """One unit of work on one connection, run in a worker thread."""

    def __init__(
        self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any], budget: float
    ) -> None:
        self.conn = conn
        self.fn = fn
        self.budget = budget
        self.real_deadline = 0.0
        self.timed_out = False
        self.cancelled = False

    def run(self) -> Any:
        conn = self.conn
        self.real_deadline = time.monotonic() + self.budget
        busy_ms = max(1, min(BUSY_TIMEOUT_MS, int(self.budget * 1000)))
        conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
        conn.set_progress_handler(self._progress, _PROGRESS_STEPS)
        try:
            return self.fn(conn)
        finally:
            conn.set_progress_handler(None, 0)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.OperationalError:
                    # A cancel's interrupt() raced with the end of the work and hit
                    # the ROLLBACK; it never outlives that statement, so once more.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")

    def _progress(self) -> int:
        if self.cancelled:
            return 1
        if time.monotonic() >= self.real_deadline:
            self.timed_out = True
            return 1
        return 0

    def past_deadline(self) -> bool:
        return self.timed_out or time.monotonic() >= self.real_deadline


# ---------------------------------------------------------------- error mapping


def _sqlite_name(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


def _translate(exc: BaseException, job: _Job, index: int | None = None) -> RequestFailed | None:
    """The structured error for an exception from a statement; None if unexpected."""
    details: dict[str, Any] = {} if index is None else {"statement_index": index}
    name = _sqlite_name(exc)
    text = str(exc)
    if isinstance(exc, sqlite3.Error):
        details["sqlite_error"] = name
    if isinstance(exc, sqlite3.OperationalError) and (
        name.startswith("SQLITE_INTERRUPT") or text == "interrupted"
    ):
        return RequestFailed(
            ErrorCode.TIMEOUT,
            "statement interrupted at the request deadline; it was rolled back",
            details={**details, "executed": False},
        )
    if isinstance(exc, sqlite3.OperationalError) and name.startswith(
        ("SQLITE_BUSY", "SQLITE_LOCKED")
    ):
        if job.past_deadline():
            return RequestFailed(
                ErrorCode.TIMEOUT,
                f"database stayed locked until the request deadline: {text}",
                details={**details, "executed": False},
            )
        return RequestFailed(ErrorCode.UNAVAILABLE, f"database is busy: {text}", details=details)
    if isinstance(exc, sqlite3.IntegrityError):
        return RequestFailed(ErrorCode.CONSTRAINT_VIOLATION, text, details=details)
    if isinstance(exc, sqlite3.Error):
        return RequestFailed(ErrorCode.SQL_ERROR, text, details=details)
    if isinstance(exc, (OverflowError, ValueError, TypeError)):
        return RequestFailed(ErrorCode.INVALID_REQUEST, f"bad parameter: {exc}", details=details)
    return None


def _virtual_time() -> bool:
    """Whether the current trio run is driven by a MockClock."""
    return isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


# ---------------------------------------------------------------------- storage


class Storage:
    """A pool of ``pool_size`` SQLite connections to one database file.

    ``path=None`` creates a private temporary database, deleted by
    :meth:`close`. Connections are opened on first use (or by
    :meth:`open`), in a worker thread. Opening creates the
    ``qdb_idempotency`` table if missing.

    ``idempotency_ttl`` is how long (seconds) a keyed write's outcome is
    kept; ``clock`` gives the time stored with it and compared against it.
    It defaults to ``time.time``: wall-clock time, because the nodes sharing
    the file may be separate processes. Tests may assign :attr:`clock` to
    move time without sleeping.
    """

    def __init__(
        self,
        path: str | None,
        *,
        pool_size: int = 4,
        idempotency_ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._path = path
        self._pool_size = pool_size
        #: Seconds a keyed write's outcome is kept.
        self.idempotency_ttl = idempotency_ttl
        #: Wall-clock source (seconds) for idempotency entries; called in worker threads.
        self.clock = clock
        self._temp_dir: str | None = None
        self._connections: list[sqlite3.Connection] = []
        self._free_send: trio.MemorySendChannel[sqlite3.Connection] | None = None
        self._free_receive: trio.MemoryReceiveChannel[sqlite3.Connection] | None = None
        self._open_lock = trio.Lock()
        self._closed = False

    @property
    def path(self) -> str | None:
        """The database file (None until a temporary one is created)."""
        return self._path

    async def open(self) -> None:
        """Open the pool if not open yet (idempotent)."""
        async with self._open_lock:
            if self._free_receive is not None:
                return
            if self._closed:
                raise RuntimeError("storage is closed")
            if _virtual_time():
                await trio.lowlevel.checkpoint()
                connections = self._open_sync()
            else:
                connections = await trio.to_thread.run_sync(self._open_sync)
            send, receive = trio.open_memory_channel[sqlite3.Connection](len(connections))
            for conn in connections:
                send.send_nowait(conn)
            self._connections = connections
            self._free_send, self._free_receive = send, receive

    def _open_sync(self) -> list[sqlite3.Connection]:
        if self._path is None:
            self._temp_dir = tempfile.mkdtemp(prefix="qdb-node-")
            self._path = os.path.join(self._temp_dir, "qdb.sqlite3")
        connections: list[sqlite3.Connection] = []
        try:
            for _ in range(self._pool_size):
                conn = sqlite3.connect(
                    self._path,
                    check_same_thread=False,
                    isolation_level=None,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                )
                connections.append(conn)
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _initialise(connections[0])
        except BaseException:
            for conn in connections:
                conn.close()
            raise
        logger.debug("storage opened %s with %d connections", self._path, len(connections))
        return connections

    def close(self) -> None:
        """Close every connection and delete a temporary database (idempotent)."""
        self._closed = True
        for conn in self._connections:
            try:
                conn.close()
            except sqlite3.Error:  # pragma: no cover - best effort
                logger.debug("closing a sqlite connection failed", exc_info=True)
        self._connections = []
        self._free_send = self._free_receive = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # --------------------------------------------------------------- requests

    async def execute(self, sql: str, params: Params, *, deadline: float) -> dict[str, Any]:
        """Run one statement; ``{"rows_affected", "last_insert_id"}`` (plus
        ``"columns"`` and ``"rows"`` when it produces rows, e.g. RETURNING)."""
        return await self._run(lambda conn: execute_one(conn, sql, params), deadline)

    async def query(self, sql: str, params: Params, *, deadline: float) -> dict[str, Any]:
        """Run one read-only statement and fetch its rows; ``{"columns", "rows"}``.

        A statement that writes is READ_ONLY, refused before it executes.
        """
        return await self._run(lambda conn: query_one(conn, sql, params), deadline)

    async def batch(self, statements: Sequence[Statement], *, deadline: float) -> dict[str, Any]:
        """Run statements in one transaction: all apply or none; ``{"results": [...]}``.

        A failure names the statement in ``details["statement_index"]``.
        """
        return await self._run(lambda conn: run_batch(conn, statements), deadline)

    async def execute_keyed(
        self, sql: str, params: Params, key: IdempotencyKey, *, deadline: float
    ) -> KeyedResult:
        """:meth:`execute` at most once for ``key`` (see :func:`run_keyed`)."""
        return await self._run_keyed(key, lambda conn: execute_one(conn, sql, params), deadline)

    async def batch_keyed(
        self, statements: Sequence[Statement], key: IdempotencyKey, *, deadline: float
    ) -> KeyedResult:
        """:meth:`batch` at most once for ``key`` (see :func:`run_keyed`)."""
        return await self._run_keyed(key, lambda conn: run_statements(conn, statements), deadline)

    async def _run_keyed(
        self, key: IdempotencyKey, work: Callable[[sqlite3.Connection], Any], deadline: float
    ) -> KeyedResult:
        clock, ttl = self.clock, self.idempotency_ttl
        return await self._run(
            lambda conn: run_keyed(conn, key, work, clock=clock, ttl=ttl), deadline
        )

    async def _run(self, fn: Callable[[sqlite3.Connection], T], deadline: float) -> T:
        await self.open()
        assert self._free_receive is not None and self._free_send is not None
        free_send = self._free_send
        conn: sqlite3.Connection | None = None
        with trio.move_on_at(deadline):
            conn = await self._free_receive.receive()
        if conn is None:
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                "no database connection became free before the request deadline",
                details={"executed": False},
            )
        try:
            budget = deadline - trio.current_time()
            if budget <= 0:
                raise RequestFailed(
                    ErrorCode.TIMEOUT,
                    "request deadline passed before the statement started",
                    details={"executed": False},
                )
            return await self._run_on(conn, fn, budget)
        finally:
            free_send.send_nowait(conn)

    async def _run_on(
        self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T], budget: float
    ) -> T:
        job = _Job(conn, fn, budget)
        finished = False

        async def interrupt_if_cancelled() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not finished:
                    job.cancelled = True
                    conn.interrupt()

        def capture() -> tuple[bool, Any]:
            try:
                return True, job.run()
            except Exception as exc:
                return False, exc

        if _virtual_time():
            await trio.lowlevel.checkpoint()
            ok, value = capture()
            return self._result(job, ok, value)
        # Raise only after the nursery closed, so callers never see an ExceptionGroup.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(interrupt_if_cancelled)
            try:
                ok, value = await trio.to_thread.run_sync(capture, abandon_on_cancel=False)
            finally:
                finished = True
                nursery.cancel_scope.cancel()
        return self._result(job, ok, value)

    @staticmethod
    def _result(job: _Job, ok: bool, value: Any) -> Any:
        if ok:
            return value
        if isinstance(value, RequestFailed):  # decided by the statement code (READ_ONLY)
            raise value
        if isinstance(value, BatchFailure):
            failure = _translate(value.error, job, value.index)
            if failure is None:
                raise value.error
            raise failure from value.error
        failure = _translate(value, job)
        if failure is None:
            raise value
        raise failure from value


def _initialise(conn: sqlite3.Connection, *, patience: float = 10.0) -> None:
    """Switch the file to WAL and create the schema, retrying while locked.

    Nodes of a cluster start together on one new file; switching the journal
    mode needs the file to itself and SQLite may answer "database is locked"
    at once instead of waiting, so the first nodes retry for a while.
    """
    give_up = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            for statement in SCHEMA:
                conn.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.02)
