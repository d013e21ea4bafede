"""Transactions of a test node, on the event loop side (docs/protocol.md section 10.2).

A ``begin`` transaction lives in the session of one connection
(:class:`SessionTransactions`, at most one open at a time) and holds a SQLite
connection of its own, outside the storage's pool, from ``begin`` to its end
(:class:`NodeTransaction`). The node bounds how many are open at once
(:class:`NodeTransactions`, ``ServerConfig.max_transactions``): a ``begin``
beyond it is CAPACITY_EXCEEDED (retryable, nothing opened).

- **Order.** The requests of a transaction run one at a time, in the order
  they arrived: the connection's reader notes each one as it arrives
  (:meth:`SessionTransactions.arrived`) and a request waits for its turn
  (:meth:`NodeTransaction.turn`), up to its deadline.
- **Ending.** A transaction ends by ``commit``, ``rollback``, or because it
  can't be trusted any more: a write conflict, a request past its deadline or
  cancelled (its outcome would be unknown to the client), SQLite rolling it
  back after an error, the idle timeout, or its connection closing. Ending
  closes its SQLite connection, which rolls back whatever was not committed,
  once the request running in it (if any) is over. Later requests naming it
  are TX_ABORTED with ``details.reason``.
- **Idle timeout.** Between requests a transaction may stay idle for its
  ``timeout_ms`` (at most ``ServerConfig.transaction_idle_timeout``); a task
  in the connection's nursery rolls it back when that passes, so an
  abandoned transaction does not keep the write lock.

The SQL itself is in :mod:`.txsql`; the methods (``begin``, ``commit``...)
in :mod:`.handlers`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .stats import NodeStatistics

__all__ = [
    "DEFAULT_MAX_TRANSACTIONS",
    "ENDING_ERRORS",
    "TX_METHODS",
    "NodeTransaction",
    "NodeTransactions",
    "SessionTransactions",
    "aborted",
]

logger = logging.getLogger("qdb_client.testing")

T = TypeVar("T")

#: Transactions a node keeps open at once unless configured otherwise.
DEFAULT_MAX_TRANSACTIONS = 64
#: Methods whose ``tx`` argument names a transaction of the session.
TX_METHODS = frozenset({"execute", "query", "batch", "executemany", "commit", "rollback"})
#: Errors of a request that end its transaction (the reason recorded).
ENDING_ERRORS = {
    ErrorCode.WRITE_CONFLICT: "write conflict",
    ErrorCode.TIMEOUT: "a request passed its deadline",
    ErrorCode.CANCELLED: "a request was cancelled",
}
_ENDING_NAMES = frozenset({ErrorCode.TIMEOUT.value, ErrorCode.CANCELLED.value})
#: Ended transactions a session remembers the reason of.
_REMEMBERED = 32


def aborted(tx_id: str, reason: str, message: str | None = None) -> RequestFailed:
    """TX_ABORTED for ``tx_id``: nothing of it applied."""
    text = message or f"transaction {tx_id!r} is not open in this session ({reason})"
    return RequestFailed(ErrorCode.TX_ABORTED, text, details={"executed": False, "reason": reason})


class NodeTransactions:
    """What the node's sessions share: the limit on open transactions, ids, counters."""

    def __init__(
        self,
        limit: int = DEFAULT_MAX_TRANSACTIONS,
        stats: NodeStatistics | None = None,
    ) -> None:
        self.limit = limit
        self.stats = stats if stats is not None else NodeStatistics()
        #: Transactions open on the node now.
        self.open = 0
        self._ids = itertools.count(1)
        self._salt = secrets.token_hex(6)

    def new_id(self) -> str:
        """A transaction id no node of the cluster issues twice (a random salt per node)."""
        return f"tx-{self._salt}-{next(self._ids)}"

    def reserve(self) -> None:
        """Count one more open transaction; CAPACITY_EXCEEDED at the limit."""
        if self.open >= self.limit:
            raise RequestFailed(
                ErrorCode.CAPACITY_EXCEEDED,
                f"{self.open} transactions are open on this node, its maximum; nothing was begun",
                details={"executed": False},
            )
        self.open += 1

    def release(self) -> None:
        """One transaction fewer."""
        self.open -= 1


class NodeTransaction:
    """One open transaction: its SQLite connection, its queue of requests, its idle timer."""

    def __init__(
        self,
        tx_id: str,
        conn: sqlite3.Connection,
        *,
        read_only: bool,
        idle_timeout: float,
        close: Callable[[sqlite3.Connection], None],
    ) -> None:
        self.id = tx_id
        self.conn = conn
        self.read_only = read_only
        self.idle_timeout = idle_timeout
        #: Whether a write request ran in it (its commit then stores the key in it).
        self.wrote = False
        #: Why it ended (None while open).
        self.ended: str | None = None
        self._close = close
        self._closed = False
        self._queue: collections.deque[int] = collections.deque()
        self._turns = trio.lowlevel.ParkingLot()
        self._running = False
        self._expired = False
        self.idle_deadline = trio.current_time() + idle_timeout
        self._idle_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<NodeTransaction {self.id} {'open' if self.ended is None else self.ended}>"

    def arrived(self, rid: int) -> None:
        """Request ``rid`` of the transaction arrived (the reader, in arrival order)."""
        if self.ended is None and not self._queue and trio.current_time() >= self.idle_deadline:
            self._expired = True  # idle too long, whether the watchdog ran yet or not
        self._queue.append(rid)
        self._set_idle(math.inf)

    @property
    def expired(self) -> bool:
        """Whether it was idle past its timeout when a request arrived."""
        return self._expired

    def _set_idle(self, deadline: float) -> None:
        self.idle_deadline = deadline
        if self._idle_scope is not None:
            self._idle_scope.deadline = deadline

    @asynccontextmanager
    async def turn(self, rid: int, deadline: float) -> AsyncIterator[None]:
        """Wait until the requests that arrived before ``rid`` are over, then hold the
        transaction. TIMEOUT if ``deadline`` passes first."""
        if rid not in self._queue:
            self.arrived(rid)
        try:
            with trio.move_on_at(deadline) as waited:
                while self._queue[0] != rid:
                    await self._turns.park()
                await trio.lowlevel.checkpoint()
            if waited.cancelled_caught:
                raise RequestFailed(
                    ErrorCode.TIMEOUT,
                    "the deadline passed while earlier requests of the transaction ran;"
                    " it was rolled back",
                    details={"executed": False},
                )
            self._running = True
            try:
                yield
            finally:
                self._running = False
        finally:
            self.forget(rid)
            if self.ended is not None:
                self._close_now()

    def forget(self, rid: int) -> None:
        """Request ``rid`` is over (whether it took its turn or failed before): let
        the next one go (idempotent)."""
        try:
            self._queue.remove(rid)
        except ValueError:
            return
        self._turns.unpark_all()
        if self.ended is None and not self._queue:
            self._set_idle(trio.current_time() + self.idle_timeout)

    def end(self, reason: str) -> bool:
        """End it (idempotent; False if it had ended already): its connection is
        closed, so rolled back, now or once the running request is over."""
        if self.ended is not None:
            return False
        self.ended = reason
        if self._idle_scope is not None:
            self._idle_scope.cancel()
        if not self._running:
            self._close_now()
        return True

    def _close_now(self) -> None:
        if not self._closed:
            self._closed = True
            self._close(self.conn)

    async def watch_idle(self, on_idle: Callable[[], None]) -> None:
        """Run in the connection's nursery: call ``on_idle`` (which ends the
        transaction) once it was idle past its timeout."""
        while self.ended is None:
            with trio.CancelScope(deadline=self.idle_deadline) as scope:
                self._idle_scope = scope
                await trio.sleep_forever()
            self._idle_scope = None
            if self.ended is not None:
                return
            if self._queue or trio.current_time() < self.idle_deadline:
                continue
            logger.info("transaction %s idle for %.3g s: rolled back", self.id, self.idle_timeout)
            on_idle()
            return


class SessionTransactions:
    """The transactions of one session (connection): at most one open at a time.

    ``spawn(fn)`` starts a background task in the connection's nursery (the
    idle timer); without it, an idle transaction is only found out when its
    next request arrives. ``close`` closes a transaction's SQLite connection.
    """

    def __init__(
        self,
        node: NodeTransactions,
        *,
        close: Callable[[sqlite3.Connection], None],
        spawn: Callable[[Callable[[], Any]], None] | None = None,
    ) -> None:
        self.node = node
        self._close = close
        self._spawn = spawn
        self._open: dict[str, NodeTransaction] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._tickets: dict[int, NodeTransaction] = {}

    @property
    def current(self) -> NodeTransaction | None:
        """The open transaction, if any."""
        return next(iter(self._open.values()), None)

    def arrived(self, method: str, args: Any, rid: int) -> None:
        """A request arrived (the reader calls this first, in arrival order)."""
        if method in TX_METHODS and isinstance(args, dict):
            key = args.get("tx")
            tx = self._open.get(key) if isinstance(key, str) else None
            if tx is not None:
                tx.arrived(rid)
                self._tickets[rid] = tx

    def finished(self, rid: int, error: str | None = None) -> None:
        """Request ``rid`` is over: if it was noted for a transaction, drop its place
        in the queue, whether or not it ever took its turn (a refused argument, an
        injected fault). ``error``: the name of the ERROR it was answered with; a
        request of the transaction cancelled or past its deadline anywhere (even
        before it reached the transaction, in injected latency) ends it."""
        tx = self._tickets.pop(rid, None)
        if tx is None:
            return
        tx.forget(rid)
        reason = ENDING_ERRORS.get(ErrorCode(error)) if error in _ENDING_NAMES else None
        if reason is not None and self._open.get(tx.id) is tx:
            self.end(tx, reason)

    def get(self, tx_id: str) -> NodeTransaction | None:
        """The open transaction ``tx_id`` of this session."""
        return self._open.get(tx_id)

    def why_not(self, tx_id: str) -> str:
        """Why ``tx_id`` is not open here (the reason it ended, or that it is unknown)."""
        return self._ended.get(tx_id, "unknown transaction")

    def opened(self, tx: NodeTransaction) -> None:
        """Register a transaction ``begin`` opened (the node slot is reserved already)."""
        self._open[tx.id] = tx
        self.node.stats.transactions_begun += 1
        if self._spawn is not None:
            self._spawn(lambda: tx.watch_idle(lambda: self.end(tx, "idle timeout")))

    async def run(
        self,
        tx: NodeTransaction,
        rid: int,
        deadline: float,
        work: Callable[[], Awaitable[T]],
    ) -> T:
        """Run request ``rid``'s ``work`` in its turn; end the transaction when the
        request's failure means it can't be trusted (see :data:`ENDING_ERRORS`)."""
        try:
            async with tx.turn(rid, deadline):
                if tx.ended is not None:
                    raise aborted(tx.id, tx.ended)
                if tx.expired:
                    self.end(tx, "idle timeout")
                    raise aborted(tx.id, "idle timeout")
                return await work()
        except RequestFailed as exc:
            reason = ENDING_ERRORS.get(exc.code)
            if tx.ended is None and reason is not None:
                self.end(tx, reason)
            elif tx.ended is None and not tx.conn.in_transaction:
                self.end(tx, f"rolled back by SQLite after {exc.code.value}")
            raise
        except trio.Cancelled:
            self.end(tx, ENDING_ERRORS[ErrorCode.CANCELLED])
            raise

    def end(self, tx: NodeTransaction, reason: str, *, outcome: str = "aborted") -> None:
        """End ``tx`` (see :meth:`NodeTransaction.end`) and count how: ``outcome`` is
        ``committed``, ``rolled_back`` or ``aborted``."""
        if self._open.pop(tx.id, None) is None:
            tx.end(reason)
            return
        tx.end(reason)
        self.node.release()
        self._ended[tx.id] = tx.ended or reason
        while len(self._ended) > _REMEMBERED:
            self._ended.popitem(last=False)
        stats = self.node.stats
        if outcome == "committed":
            stats.transactions_committed += 1
        elif outcome == "rolled_back":
            stats.transactions_rolled_back += 1
        else:
            stats.transactions_aborted += 1
            logger.debug("transaction %s aborted: %s", tx.id, reason)

    def close_all(self, reason: str = "connection closed") -> None:
        """The connection closed: end every open transaction (after its running request)."""
        for tx in list(self._open.values()):
            self.end(tx, reason)
