"""One unit of SQL work on one pooled connection: a :class:`Job`, and what it ends with.

The storage (:mod:`.storage`) takes a connection from its pool and runs a
:class:`Job` on it: in a worker thread (:func:`wait_for_thread`), or inline
under a ``trio.testing.MockClock``. The job sets the connection up for the
request (busy timeout within the budget, a progress handler for the
deadline), runs the SQL of :mod:`.statements`, rolls back whatever is left
open, and replaces the connection with a fresh one if the SQL changed it.
:func:`result_of` turns what it ended with into the value or the
structured error (:class:`~._failure.RequestFailed`) of the request.

Cancellation never abandons the thread: :func:`wait_for_thread` stops the
job (:meth:`Job.cancel`: the flag its checkpoints read, and
``connection.interrupt()``) and keeps waiting, so a job that completed
anyway still delivers its result, and no connection is ever used by two
threads at once.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio
import trio.testing

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .statements import Control, Stopped
from .writes import BatchFailure

__all__ = [
    "BUSY_TIMEOUT_MS",
    "Job",
    "ThreadJob",
    "result_of",
    "virtual_time",
    "wait_for_thread",
]

logger = logging.getLogger("qdb_client.testing")

#: SQLite busy timeout (waiting for another writer's lock), in milliseconds.
BUSY_TIMEOUT_MS = 5000
#: VM instructions between two deadline checks of the progress handler.
_PROGRESS_STEPS = 1000


class Job:
    """One unit of work on one connection, run in a worker thread.

    ``control`` is shared with the SQL (:class:`~.statements.Control`);
    ``reopen`` opens a fresh connection, which replaces :attr:`conn` when
    the work changed the connection's settings.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        fn: Callable[[sqlite3.Connection], Any],
        budget: float,
        *,
        control: Control | None = None,
        reopen: Callable[[], sqlite3.Connection] | None = None,
        keep_transaction: bool = False,
    ) -> None:
        self.conn = conn
        self.fn = fn
        self.budget = budget
        self.control = control if control is not None else Control()
        self.real_deadline = 0.0
        self.timed_out = False
        self._reopen = reopen
        #: The work runs inside a transaction that outlives it (a ``begin``
        #: transaction's): nothing is rolled back at the end, and a lock that
        #: can't be had is a write conflict.
        self.keep_transaction = keep_transaction

    @property
    def cancelled(self) -> bool:
        """Whether the job was told to stop."""
        return self.control.cancelled

    def cancel(self) -> None:
        """Stop the work (event loop side): raise the flag, interrupt SQLite."""
        self.control.cancelled = True
        try:
            self.conn.interrupt()
        except sqlite3.Error:  # the connection is being replaced: nothing runs on it
            pass

    def capture(self) -> tuple[bool, Any]:
        """:meth:`run`, with an exception returned instead of raised."""
        try:
            return True, self.run()
        except Exception as exc:
            return False, exc

    def run(self) -> Any:
        """Run the work on the connection (thread side); whatever it raises propagates."""
        self.control.checkpoint()  # cancelled before the thread started: nothing runs
        conn = self.conn
        self.real_deadline = time.monotonic() + self.budget
        busy_ms = max(1, min(BUSY_TIMEOUT_MS, int(self.budget * 1000)))
        try:
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            # WAL with synchronous NORMAL: a commit survives the node's process dying
            # (kill -9), not the machine losing power, and needs no fsync. Set here,
            # not when the connection opens: this pragma loads the schema, which a
            # connection opened at start would then hold stale. (A transaction's
            # connection got it before its BEGIN: it can't change inside one.)
            if not conn.in_transaction:
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.set_progress_handler(self._progress, _PROGRESS_STEPS)
            return self.fn(conn)
        finally:
            conn.set_progress_handler(None, 0)
            if conn.in_transaction and not self.keep_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.OperationalError:
                    # A cancel's interrupt() raced with the end of the work and hit
                    # the ROLLBACK; it never outlives that statement, so once more.
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            if self.control.connection_changed and self._reopen is not None:
                self._replace()

    def _replace(self) -> None:
        assert self._reopen is not None
        try:
            fresh = self._reopen()
        except Exception:  # keep the old one: better a changed connection than none
            logger.exception("cannot open a fresh connection to replace a changed one")
            return
        old, self.conn = self.conn, fresh
        old.close()

    def _progress(self) -> int:
        if self.control.cancelled:
            return 1
        if time.monotonic() >= self.real_deadline:
            self.timed_out = True
            return 1
        return 0

    def past_deadline(self) -> bool:
        """Whether the job's real-time budget is spent."""
        return self.timed_out or time.monotonic() >= self.real_deadline


# ---------------------------------------------------------------- error mapping


def _sqlite_name(exc: BaseException) -> str:
    return getattr(exc, "sqlite_errorname", None) or type(exc).__name__


def _translate(
    exc: BaseException, job: Job, index: int | None = None, field: str = "statement_index"
) -> RequestFailed | None:
    """The structured error for an exception from a statement; None if unexpected."""
    details: dict[str, Any] = {} if index is None else {field: index}
    if isinstance(exc, RequestFailed):  # decided by the statement code (READ_ONLY, ...)
        exc.details.update(details)
        return exc
    name = _sqlite_name(exc)
    text = str(exc)
    if isinstance(exc, sqlite3.Error):
        details["sqlite_error"] = name
    if isinstance(exc, Stopped) or (
        isinstance(exc, sqlite3.OperationalError)
        and (name.startswith("SQLITE_INTERRUPT") or text == "interrupted")
    ):
        # At the deadline; a CANCEL's interrupt is answered CANCELLED by the connection.
        return RequestFailed(
            ErrorCode.TIMEOUT,
            "statement interrupted at the request deadline; it was rolled back",
            details={**details, "executed": False},
        )
    if isinstance(exc, sqlite3.OperationalError) and name.startswith(
        ("SQLITE_BUSY", "SQLITE_LOCKED")
    ):
        if job.keep_transaction:
            why = (
                "another transaction committed since this one read (its snapshot is stale)"
                if name == "SQLITE_BUSY_SNAPSHOT"
                else "another transaction held the write lock until the deadline"
            )
            return RequestFailed(
                ErrorCode.WRITE_CONFLICT,
                f"{why}: {text}; the transaction was rolled back and may run again",
                details={**details, "executed": False, "sqlite_error": name},
            )
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


def virtual_time() -> bool:
    """Whether the current trio run is driven by a MockClock."""
    return isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


class ThreadJob(Protocol):
    """What :func:`wait_for_thread` runs (a :class:`Job`, a stream's spool job)."""

    def capture(self) -> tuple[bool, Any]:
        """Run the job (in the worker thread): ``(ok, value)``, an exception returned."""
        ...

    def cancel(self) -> None:
        """Ask the running job to stop (from the trio thread)."""
        ...


async def wait_for_thread(job: ThreadJob) -> tuple[bool, Any]:
    """Run ``job.capture`` in a worker thread and wait for it, whatever happens.

    Cancellation does not end the wait: it stops the job (:meth:`Job.cancel`)
    and keeps waiting, so a job that completed anyway (its COMMIT done)
    still delivers its result, and nothing of a connection is ever used by
    two threads. The caller's next checkpoint raises the Cancelled.
    """
    await trio.lowlevel.checkpoint_if_cancelled()  # not started: nothing to stop
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: Any) -> None:  # in the worker thread: an outcome.Outcome
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
        job.cancel()
        return trio.lowlevel.Abort.FAILED  # keep waiting for the thread

    trio.lowlevel.start_thread_soon(job.capture, deliver)
    return await trio.lowlevel.wait_task_rescheduled(abort)


def result_of(job: Job, ok: bool, value: Any) -> Any:
    """The job's value if it succeeded; otherwise raise the structured error for it."""
    if ok:
        return value
    if isinstance(value, BatchFailure):
        failure = _translate(value.error, job, value.index, value.field)
        if failure is None:
            raise value.error
        if failure is value.error:
            raise failure
        raise failure from value.error
    failure = _translate(value, job)
    if failure is None:
        raise value
    if failure is value:
        raise failure
    raise failure from value
