"""A result stream inside a transaction: ``async with tx.stream(sql) as rows``.

The stream runs on the transaction's connection, in its turn, so it reads
the transaction's snapshot and its own uncommitted writes; the node spools
the result before page 0, so the transaction is free again for other
statements once the block is entered (the stream's pages come from the
spool, not from the transaction).

Unlike a stream of its own, it can't resume elsewhere: the transaction
lives on that connection of that node. Anything that breaks the stream
(the connection lost, the node silent, a node's ERROR that is not a refusal
of the query itself) breaks the transaction: it is rolled back, the block
raises :class:`~qdb_client.errors.TransactionAborted` (retryable: the whole
transaction may run again), and so do the transaction's later statements.
A query the node refuses (``SqlError``, ``ReadOnlyViolation``) raises as
itself and the transaction goes on. Leaving the block early CANCELs only
the stream.
"""

from __future__ import annotations

from typing import Any

import trio

from .._policies import Outcome, RetryRule
from ..errors import (
    InvalidArgument,
    QdbError,
    RequestTimeout,
    ServerError,
    TransactionAborted,
)
from . import attempt as attempts
from .stream import ResultStream

__all__ = ["TransactionStream"]


class TransactionStream(ResultStream):
    """``tx.stream(...)``: see the module docstring. ``tx`` is the open Transaction."""

    def __init__(self, tx: Any, sql: str, params: Any = None, **options: Any) -> None:
        super().__init__(tx._client, sql, params, **options)
        self._tx = tx
        self._args["tx"] = tx.id

    async def __aenter__(self) -> TransactionStream:
        tx = self._tx
        await trio.lowlevel.checkpoint_if_cancelled()
        if tx._done:
            raise InvalidArgument("the transaction is over (its block has exited)")
        if tx._broken is not None:
            raise tx._broken
        await super().__aenter__()
        return self

    async def _next_attempt(self) -> None:
        failure, self._failure = self._failure, None
        old, self._attempt = self._attempt, None
        if old is not None:
            old.stop(cancel=False)
        if failure is not None:
            raise self._broken_by(*failure)
        config = self._host.config
        until = min(self._deadline, trio.current_time() + config.request_timeout)
        args = dict(self._args)
        args["credit"] = self._ledger.start_attempt(len(self._buffer))
        try:
            with trio.fail_at(until):
                self._attempt = await attempts.start_on(
                    self,
                    self._tx._connection,
                    "query_stream",
                    args,
                    attempts.ms_until(self._deadline, config.request_timeout),
                )
        except trio.TooSlowError as exc:
            error = RequestTimeout("the stream could not be sent in time", timeout=0.0)
            error.__cause__ = exc
            raise self._broken_by(error, None) from exc
        except QdbError as exc:
            raise self._broken_by(exc, None) from exc

    def _broken_by(self, error: QdbError, outcome: Outcome | None) -> QdbError:
        """The query's refusal as is (the transaction goes on); anything else breaks
        the transaction (rolled back by the node) and is TransactionAborted."""
        tx = self._tx
        refused = (
            isinstance(error, ServerError)
            and not isinstance(error, TransactionAborted)
            and (outcome is None or outcome.retry is RetryRule.NEVER)
            and self._ledger.token is None
        )
        if refused:
            return error
        if isinstance(error, TransactionAborted):
            tx._broken = error
            return error
        tx._break(f"the stream in it failed: {error}", error, sent=True)
        broken = tx._broken
        return broken if broken is not None else error
