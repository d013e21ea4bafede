"""SQLite storage of a test node: a small pool of connections used from worker threads.

All nodes of a cluster open the same database file (WAL mode, busy timeout
5 s, ``synchronous = NORMAL``: a commit survives a killed node process, not a
power cut), so a write through one node is visible through every other. Each
statement runs in a worker thread on one pooled connection at a time.

Deadlines: waiting for a pooled connection is bounded by the request
deadline in trio time. Running a statement is real work that a virtual
clock cannot speed up, so it gets the remaining budget in *real* time: a
SQLite progress handler aborts the statement once the budget is spent.
SQLite stops with SQLITE_INTERRUPT and rolls the statement (or batch
transaction) back, reported as TIMEOUT with ``details={"executed": False}``.

Cancellation (CANCEL, dropped connection, shutdown) never abandons the
worker thread: it raises the job's ``cancelled`` flag and calls
``connection.interrupt()``, then keeps waiting for the thread. A statement
SQLite is executing stops; a transaction that was waiting for the write
lock, or ran statements too short for the interrupt to land, stops at its
next checkpoint (once it holds the lock, right before COMMIT) and rolls
back. Either way the job fails as interrupted, which the connection
answers CANCELLED. A job that finished anyway (its COMMIT was done) keeps
its result: the caller answers it as if the CANCEL had crossed the reply.

A request that changed its pooled connection (a pragma setting a value, a
TEMP object: see :mod:`.authorizers`) gets the connection replaced by a
fresh one once it is over, so the next request, maybe another client's,
finds the connection as every other one. ``foreign_keys`` is applied to
every pooled connection when it opens.

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

Transactions (``begin``, docs/protocol.md section 10.2) each hold a SQLite
connection of their own for their whole life, outside the pool:
:meth:`Storage.open_connection` opens one, :meth:`Storage.run_on` runs a
request's work on it (the transaction stays open), and
:meth:`Storage.close_connection` closes it. The storage's
:class:`~.decltypes.StatementProbe` describes statements (declared types,
parameters) for typed results and ``prepare``.

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

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .changelog import SCHEMA as CHANGE_LOG_SCHEMA
from .decltypes import Description, ProbeError, StatementProbe, scan_parameters
from .idempotency import DEFAULT_TTL, SCHEMA, IdempotencyKey, KeyedResult
from .jobs import BUSY_TIMEOUT_MS, Job, result_of, virtual_time, wait_for_thread
from .sessions import SCHEMA as SESSION_SCHEMA
from .statements import Control, Params, Statement, execute_one, query_one, run_execute
from .writes import (
    PURGE_LIMIT,
    run_batch,
    run_executemany,
    run_keyed,
    run_rows,
    run_statements,
)

__all__ = ["BUSY_TIMEOUT_MS", "PURGE_LIMIT", "Params", "Statement", "Storage", "run_keyed"]

logger = logging.getLogger("qdb_client.testing")

T = TypeVar("T")


# ---------------------------------------------------------------------- storage


class Storage:
    """A pool of ``pool_size`` SQLite connections to one database file.

    ``path=None`` creates a private temporary database, deleted by
    :meth:`close`. Connections are opened on first use (or by
    :meth:`open`), in a worker thread. Opening creates the
    ``qdb_idempotency`` table if missing. ``foreign_keys`` switches foreign
    key enforcement on for every pooled connection; ``max_value_size`` is
    SQLite's length limit on every connection (``SQLITE_LIMIT_LENGTH``: no
    statement builds or stores a longer string or blob).

    ``idempotency_ttl`` is how long (seconds) a keyed write's outcome is
    kept; ``clock`` gives the time stored with it and compared against it.
    It defaults to ``time.time``: wall-clock time, because the nodes sharing
    the file may be separate processes. Tests may assign :attr:`clock` to
    move time without sleeping.

    The data methods take ``result_limit``: the client's maximum frame in
    bytes, which a result (and, for a query, any one value) may not exceed
    (FRAME_TOO_LARGE, a write rolled back).
    """

    def __init__(
        self,
        path: str | None,
        *,
        pool_size: int = 4,
        idempotency_ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
        foreign_keys: bool = False,
        max_value_size: int | None = None,
    ) -> None:
        self._path = path
        self._pool_size = pool_size
        #: SQLite's length limit on every connection: no longer string or blob is built.
        self.max_value_size = max_value_size
        #: Seconds a keyed write's outcome is kept.
        self.idempotency_ttl = idempotency_ttl
        #: Wall-clock source (seconds) for idempotency entries; called in worker threads.
        self.clock = clock
        #: Whether every pooled connection enforces foreign keys.
        self.foreign_keys = foreign_keys
        self._temp_dir: str | None = None
        self._connections: list[sqlite3.Connection] = []
        self._free_send: trio.MemorySendChannel[sqlite3.Connection] | None = None
        self._free_receive: trio.MemoryReceiveChannel[sqlite3.Connection] | None = None
        self._open_lock = trio.Lock()
        self._closed = False
        #: Describes statements (declared types, parameters); set when the storage opens.
        self.probe: StatementProbe | None = None
        self._dedicated: set[sqlite3.Connection] = set()

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
            if virtual_time():
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
                connections.append(self._connect())
            _initialise(connections[0])
        except BaseException:
            for conn in connections:
                conn.close()
            raise
        self.probe = StatementProbe(self._path)
        logger.debug("storage opened %s with %d connections", self._path, len(connections))
        return connections

    def _connect(self) -> sqlite3.Connection:
        """One pooled connection, set up as every one is (any thread)."""
        assert self._path is not None
        conn = sqlite3.connect(
            self._path,
            check_same_thread=False,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if self.max_value_size is not None:
                conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.max_value_size)
            if self.foreign_keys:
                conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close every connection and delete a temporary database (idempotent)."""
        self._closed = True
        for conn in [*self._connections, *self._dedicated]:
            try:
                conn.close()
            except sqlite3.Error:  # pragma: no cover - best effort
                logger.debug("closing a sqlite connection failed", exc_info=True)
        self._connections = []
        self._dedicated.clear()
        if self.probe is not None:
            self.probe.close()
        self._free_send = self._free_receive = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # --------------------------------------------------------------- requests

    def control(self, result_limit: int | None = None, *, writes: bool = False) -> Control:
        """A :class:`~.statements.Control` for one request on this storage."""
        return Control(result_limit, writes=writes, probe=self.probe)

    async def execute(
        self,
        sql: str,
        params: Params,
        *,
        deadline: float,
        result_limit: int | None = None,
        expect_rows: int | None = None,
    ) -> dict[str, Any]:
        """Run one statement; ``{"rows_affected", "last_insert_id"}`` (plus
        ``"columns"``, ``"rows"`` and ``"types"`` when it produces rows, e.g. RETURNING).
        ``expect_rows``: another row count is CONFLICT, rolled back."""
        control = self.control(result_limit, writes=True)
        return await self._run(
            lambda c: run_execute(c, sql, params, control, expect_rows=expect_rows),
            deadline,
            control,
        )

    async def query(
        self, sql: str, params: Params, *, deadline: float, result_limit: int | None = None
    ) -> dict[str, Any]:
        """Run one read-only statement and fetch its rows; ``{"columns", "rows", "types"}``.

        A statement that writes is READ_ONLY, refused before it executes.
        """
        control = self.control(result_limit)
        return await self._run(lambda c: query_one(c, sql, params, control), deadline, control)

    async def batch(
        self,
        statements: Sequence[Statement],
        *,
        deadline: float,
        result_limit: int | None = None,
        expects: Sequence[int | None] | None = None,
    ) -> dict[str, Any]:
        """Run statements in one transaction: all apply or none; ``{"results": [...]}``.

        A failure names the statement in ``details["statement_index"]``.
        """
        control = self.control(result_limit, writes=True)
        return await self._run(
            lambda c: run_batch(c, statements, control, expects), deadline, control
        )

    async def executemany(
        self, sql: str, rows: Sequence[Params], *, deadline: float
    ) -> dict[str, Any]:
        """Run ``sql`` once per parameter row in one transaction: ``{"rows_affected"}``.

        A failure names the row in ``details["row_index"]``; nothing applies.
        """
        control = self.control(writes=True)
        return await self._run(lambda c: run_executemany(c, sql, rows, control), deadline, control)

    async def execute_keyed(
        self,
        sql: str,
        params: Params,
        key: IdempotencyKey,
        *,
        deadline: float,
        result_limit: int | None = None,
        expect_rows: int | None = None,
    ) -> KeyedResult:
        """:meth:`execute` at most once for ``key`` (see :func:`run_keyed`)."""
        control = self.control(result_limit, writes=True)
        work = lambda c: execute_one(c, sql, params, control, expect_rows=expect_rows)  # noqa: E731
        return await self._run_keyed(key, work, deadline, control)

    async def batch_keyed(
        self,
        statements: Sequence[Statement],
        key: IdempotencyKey,
        *,
        deadline: float,
        result_limit: int | None = None,
        expects: Sequence[int | None] | None = None,
    ) -> KeyedResult:
        """:meth:`batch` at most once for ``key`` (see :func:`run_keyed`)."""
        control = self.control(result_limit, writes=True)
        work = lambda c: run_statements(c, statements, control, expects)  # noqa: E731
        return await self._run_keyed(key, work, deadline, control)

    async def executemany_keyed(
        self, sql: str, rows: Sequence[Params], key: IdempotencyKey, *, deadline: float
    ) -> KeyedResult:
        """:meth:`executemany` at most once for ``key`` (see :func:`run_keyed`)."""
        control = self.control(writes=True)
        work = lambda c: run_rows(c, sql, rows, control)  # noqa: E731
        return await self._run_keyed(key, work, deadline, control)

    async def store_outcome(
        self, key: IdempotencyKey, outcome: Any, *, deadline: float
    ) -> KeyedResult:
        """Store ``outcome`` under ``key`` unless a live one is stored already
        (a keyed transaction that executes nothing: the commit fence)."""
        control = self.control(writes=True)
        return await self._run_keyed(key, lambda c: outcome, deadline, control)

    async def describe(self, sql: str) -> Description:
        """What SQLite makes of ``sql`` without running it (see :mod:`.decltypes`).

        SQL_ERROR if it can't be prepared. Without a probe, only the
        parameters are found (by scanning the text) and there are no columns.
        """
        await self.open()
        probe = self.probe
        if probe is None or not probe.available:
            await trio.lowlevel.checkpoint()
            count, names = scan_parameters(sql)
            return Description((), (), count, names)
        try:
            if virtual_time():
                await trio.lowlevel.checkpoint()
                return probe.describe(sql)
            return await trio.to_thread.run_sync(probe.describe, sql)
        except ProbeError as exc:
            raise RequestFailed(ErrorCode.SQL_ERROR, str(exc), details={"executed": False}) from exc

    # ---------------------------------------------------- dedicated connections

    async def open_connection(self) -> sqlite3.Connection:
        """A new connection outside the pool (for a transaction); close it with
        :meth:`close_connection`."""
        await self.open()
        if virtual_time():
            await trio.lowlevel.checkpoint()
            conn = self._connect()
        else:
            conn = await trio.to_thread.run_sync(self._connect)
        self._dedicated.add(conn)
        return conn

    def close_connection(self, conn: sqlite3.Connection) -> None:
        """Close a connection of :meth:`open_connection` (whatever it holds is rolled back)."""
        self._dedicated.discard(conn)
        try:
            conn.close()
        except sqlite3.Error:  # pragma: no cover - best effort
            logger.debug("closing a sqlite connection failed", exc_info=True)

    async def run_on(
        self,
        conn: sqlite3.Connection,
        fn: Callable[[sqlite3.Connection], T],
        deadline: float,
        control: Control,
    ) -> T:
        """Run ``fn`` on a connection of :meth:`open_connection`, leaving its
        transaction open (see :class:`~.jobs.Job` ``keep_transaction``)."""
        budget = deadline - trio.current_time()
        if budget <= 0:
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                "request deadline passed before the statement started",
                details={"executed": False},
            )
        job = Job(conn, fn, budget, control=control, keep_transaction=True)
        if virtual_time():
            await trio.lowlevel.checkpoint()
            ok, value = job.capture()
        else:
            ok, value = await wait_for_thread(job)
        return result_of(job, ok, value)

    async def _run_keyed(
        self,
        key: IdempotencyKey,
        work: Callable[[sqlite3.Connection], Any],
        deadline: float,
        control: Control,
    ) -> KeyedResult:
        clock, ttl = self.clock, self.idempotency_ttl
        return await self._run(
            lambda c: run_keyed(c, key, work, clock=clock, ttl=ttl, control=control),
            deadline,
            control,
        )

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], deadline: float, control: Control
    ) -> T:
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
        job: Job | None = None
        try:
            budget = deadline - trio.current_time()
            if budget <= 0:
                raise RequestFailed(
                    ErrorCode.TIMEOUT,
                    "request deadline passed before the statement started",
                    details={"executed": False},
                )
            job = Job(conn, fn, budget, control=control, reopen=self._connect)
            if virtual_time():
                await trio.lowlevel.checkpoint()
                ok, value = job.capture()
            else:
                ok, value = await wait_for_thread(job)
            return result_of(job, ok, value)
        finally:
            if job is not None and job.conn is not conn:  # replaced: it had been changed
                self._connections = [job.conn if c is conn else c for c in self._connections]
                conn = job.conn
            free_send.send_nowait(conn)


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
            # Every table of the node's, made before any client's SQL runs: none can
            # then take one's name (by a rename, which the authorizer does not see).
            for statement in (*SCHEMA, *CHANGE_LOG_SCHEMA, *SESSION_SCHEMA):
                conn.execute(statement)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
            time.sleep(0.02)
