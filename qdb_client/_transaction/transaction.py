"""Transactions: one leased connection, the node's transaction id, commit or rollback.

``async with client.transaction() as tx:`` picks a node, leases one of its
connections for the block alone, and sends ``begin``; the node issues the
transaction id. Statements go on that connection with the id, one at a
time. Leaving the block normally commits; an exception or a cancellation
rolls back (shielded and bounded by ``close_timeout``). docs/protocol.md
section 10.2 is the contract.

What can go wrong, and what the block raises:

- a statement fails (``SqlError``, ``ConstraintViolation``...): raised as is;
  the transaction goes on, the application decides;
- the connection is lost, the node times the transaction out, a write
  conflicts with another transaction, or a statement's outcome is unknown (it
  timed out, was cancelled after it was sent, or its reply was corrupted):
  the transaction can't be trusted and is rolled back; the statement raises
  its error and the block's exit raises :class:`TransactionAborted` (or its
  :class:`WriteConflict`), ``retryable`` when running the whole transaction
  again may succeed; nothing was applied;
- the commit's reply is lost: the commit carries an idempotency key, so it is
  asked again (on any node) and answered from its stored outcome: committed,
  or ``TransactionAborted`` (the node fences the key, so a commit still on
  its way is refused rather than applied behind the answer). Only if no node
  can answer before the deadline is the outcome unknown:
  :class:`OutcomeUnknown`, with ``maybe_applied`` and the ``idempotency_key``
  to ask again.

Nothing inside a transaction is applied before its commit, so every error of
a statement says ``maybe_applied=False``; every error says whether its
request was sent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from .._arguments import (
    Params,
    Statement,
    batch_args,
    checkpointed,
    executemany_args,
    statement_args,
)
from .._arguments import expect_rows as check_expect_rows
from .._policies import classify
from .._request import parsed_reply
from .._streams import TransactionStream
from ..errors import (
    ClientClosed,
    ConnectionDraining,
    InvalidArgument,
    OutcomeUnknown,
    QdbError,
    RequestTimeout,
    ServerError,
    TransactionAborted,
    TransportError,
)
from ..events import RequestFailed, RequestStarted, RequestSucceeded
from ..results import ExecuteResult, QueryResult
from .common import (
    Host,
    aborted_error,
    check_committed,
    copy_aborted,
    describe,
    ms_until,
    rows_affected,
    with_facts,
)

if TYPE_CHECKING:
    from .._cluster import Node
    from .._transport import Connection, PendingRequest

__all__ = ["Transaction"]


class Transaction:
    """An open transaction; use it only inside its ``async with`` block, from one
    task at a time.

    ``id`` is the node's transaction id, ``node`` the address it runs on.
    Requests made through the client (``client.execute``...) inside the block
    run outside the transaction, on other connections.
    """

    def __init__(
        self, client: Host, node: Node, connection: Connection, tx_id: str, read_only: bool
    ) -> None:
        self._client = client
        self._connection = connection
        self.node = node.address
        self.id = tx_id
        self.read_only = read_only
        self._broken: TransactionAborted | None = None
        self._done = False
        self._busy = False

    def __repr__(self) -> str:
        state = "over" if self._done else "broken" if self._broken else "open"
        return f"<Transaction {self.id} on {self.node} ({state})>"

    # ---------------------------------------------------------------- calls

    @checkpointed
    async def execute(
        self,
        sql: str,
        params: Params = None,
        *,
        timeout: float | None = None,
        expect_rows: int | None = None,
    ) -> ExecuteResult:
        """Run one statement in the transaction (see :meth:`Client.execute`)."""
        args = statement_args(sql, params)
        if expect_rows is not None:
            args["expect_rows"] = check_expect_rows(expect_rows)
        return await self._call("execute", args, timeout, ExecuteResult.from_wire)

    @checkpointed
    async def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> QueryResult:
        """Run one read in the transaction (see :meth:`Client.query`)."""
        return await self._call(
            "query", statement_args(sql, params), timeout, QueryResult.from_wire
        )

    @checkpointed
    async def batch(
        self, statements: Iterable[Statement], *, timeout: float | None = None
    ) -> list[ExecuteResult]:
        """Run several statements in the transaction, all or none (see :meth:`Client.batch`)."""
        return await self._call(
            "batch", batch_args(statements), timeout, ExecuteResult.batch_from_wire
        )

    @checkpointed
    async def executemany(
        self, sql: str, rows: Iterable[Params], *, timeout: float | None = None
    ) -> int:
        """Run one statement for each parameter row, all or none; the rows affected."""
        return await self._executemany_wire(executemany_args(sql, rows), timeout)

    def stream(
        self,
        sql: str,
        params: Params = None,
        *,
        page_rows: int | None = None,
        page_bytes: int | None = None,
        timeout: float | None = None,
    ) -> TransactionStream:
        """``async with tx.stream(sql) as rows``: a result stream in the transaction
        (see :meth:`Client.stream`). It can't resume on another node: a failure
        breaks the transaction (TransactionAborted). See :mod:`qdb_client._streams.tx_stream`.
        """
        return TransactionStream(
            self, sql, params, page_rows=page_rows, page_bytes=page_bytes, timeout=timeout
        )

    async def _executemany_wire(self, args: dict[str, Any], timeout: float | None) -> int:
        """executemany with rows already in wire form (the client's chunks)."""
        result: int = await self._call("executemany", dict(args), timeout, rows_affected)
        return result

    async def _call(
        self, method: str, args: dict[str, Any], timeout: float | None, parse: Callable
    ) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._done:
            raise InvalidArgument("the transaction is over (its block has exited)")
        if self._busy:
            raise InvalidArgument(
                "another operation is in progress on this transaction (use it from one task)"
            )
        if self._broken is not None:
            raise with_facts(copy_aborted(self._broken), sent=False)
        args["tx"] = self.id
        budget = self._client._budget(timeout)
        pending: PendingRequest | None = None
        await self._client._admit()  # statements count in the client's bulkhead
        self._busy = True
        events = self._client.events
        # Read only for the events (RequestFailed is the one a logger at INFO wants).
        started = trio.current_time() if events.wants(RequestFailed) else 0.0
        try:
            with trio.fail_after(budget):
                pending = await self._connection.send_request(
                    method, args, deadline_ms=max(1, math.ceil(budget * 1000))
                )
                if events.wants(RequestStarted):
                    events.emit(
                        RequestStarted(
                            started,
                            method,
                            self.node,
                            1,
                            pending.request_id,
                            self._connection.serial,
                        )
                    )
                result = await pending.wait()
            parsed = parsed_reply(parse, result)  # a parser's slip: a malformed reply
            if events.wants(RequestSucceeded):
                now = trio.current_time()
                events.emit(
                    RequestSucceeded(now, method, self.node, 1, pending.request_id, now - started)
                )
            return parsed
        except TransactionAborted as exc:
            self._broken = exc
            self._report_failure(method, pending, started, exc)
            raise with_facts(exc, sent=True) from None
        except ServerError as exc:
            # The statement failed; the transaction goes on.
            self._report_failure(method, pending, started, exc)
            raise with_facts(exc, sent=True) from None
        except trio.TooSlowError as exc:
            sent = pending is not None and pending.sent
            self._break(f"{method} outlasted its {budget:g} s timeout", exc, sent=sent)
            timed_out = RequestTimeout(
                f"{method} in transaction {self.id} did not complete within {budget:g} s;"
                " the transaction is rolled back",
                timeout=budget,
                request_sent=sent,
            )
            self._report_failure(method, pending, started, timed_out, deadline_passed=True)
            raise timed_out from exc
        except (TransportError, ClientClosed) as exc:
            sent = pending is not None and pending.sent
            self._break(f"the connection to {self.node} was lost: {exc}", exc, sent=True)
            assert self._broken is not None
            self._report_failure(method, pending, started, exc)
            raise with_facts(copy_aborted(self._broken), sent=sent) from exc
        except QdbError as exc:
            # A corrupted or malformed reply: the statement ran, its result is lost.
            sent = pending is not None and pending.sent
            self._break(f"the reply to {method} was unusable: {exc}", exc, sent=sent)
            self._report_failure(method, pending, started, exc)
            raise with_facts(exc, sent=sent) from None
        except BaseException as exc:
            # The caller's cancellation: a statement already sent may still run.
            self._break(
                f"{method} was cancelled after it was sent",
                exc,
                sent=pending is not None and pending.sent,
                retryable=False,
            )
            raise
        finally:
            self._busy = False
            self._client._active -= 1

    def _report_failure(
        self,
        method: str,
        pending: PendingRequest | None,
        started: float,
        error: BaseException,
        *,
        deadline_passed: bool = False,
    ) -> None:
        """A RequestFailed for a statement that raised ``error`` (never retried: a
        statement's failure is the application's to handle, or breaks the
        transaction). A cancelled statement reports nothing, as in the pipeline."""
        events = self._client.events
        if not events.wants(RequestFailed):
            return
        sent = pending is not None and pending.sent
        outcome = classify(error, sent=sent, deadline_passed=deadline_passed)
        now = trio.current_time()
        events.emit(
            RequestFailed(
                now,
                method,
                self.node,
                1,
                pending.request_id if sent and pending is not None else 0,
                now - started,
                outcome.kind.value,
                describe(error).splitlines()[0][:300],
                False,
            )
        )

    def _break(
        self, reason: str, cause: BaseException, *, sent: bool, retryable: bool = True
    ) -> None:
        """The transaction can't be trusted any more (a statement that may have run
        without its result being known): it will be rolled back."""
        if sent and self._broken is None:
            self._broken = aborted_error(reason, node=self.node, cause=cause, retryable=retryable)

    # ------------------------------------------------------------ lifecycle

    async def _commit(self, deadline: float, key: str | None) -> None:
        """Commit, or raise what happened instead; bounded by ``deadline``."""
        if self._broken is not None:
            await self._rollback()
            raise with_facts(copy_aborted(self._broken), sent=False)
        if self.read_only:
            await self._commit_read_only(deadline)
            return
        key = key or self._client._fresh_key()
        pending: PendingRequest | None = None
        # Wait for the reply half the time left: the other half asks the
        # cluster, should this node go silent (the node itself gets it all).
        wait_until = trio.current_time() + (deadline - trio.current_time()) / 2
        try:
            with trio.fail_at(wait_until):
                pending = await self._connection.send_request(
                    "commit",
                    {"tx": self.id},
                    deadline_ms=ms_until(deadline),
                    idempotency_key=key,
                )
                reply = await pending.wait()
            check_committed(reply)
            return
        except TransactionAborted as exc:
            raise with_facts(exc, sent=True, key=key) from None
        except ServerError as exc:
            if not classify(exc, sent=True).maybe_applied:
                # The node refused the commit (a deferred constraint, shutting
                # down...): nothing applied; make sure it is rolled back.
                await self._rollback()
                if exc.retryable:
                    raise with_facts(
                        aborted_error(f"the commit was refused: {exc}", node=self.node, cause=exc),
                        sent=True,
                        key=key,
                    ) from exc
                raise with_facts(exc, sent=True, key=key) from None
            lost: BaseException = exc
        except (ConnectionDraining, TransportError, ClientClosed, trio.TooSlowError) as exc:
            sent = pending is not None and (pending.sent or getattr(exc, "request_sent", False))
            if not sent:
                # Never written: the transaction is rolled back with its connection.
                self._connection.abort(f"the commit of transaction {self.id} was not sent")
                raise with_facts(
                    aborted_error(
                        f"the commit could not be sent ({describe(exc)}); rolled back",
                        node=self.node,
                        cause=exc,
                        retryable=not isinstance(exc, ClientClosed),
                    ),
                    sent=False,
                    key=key,
                ) from exc
            if isinstance(exc, ClientClosed):
                raise self._unknown(key, exc, "the client was closed") from exc
            lost = exc
        except QdbError as exc:  # a corrupted or malformed reply
            lost = exc
        # Sent, outcome lost: this connection's session must not linger with it.
        self._connection.abort(f"the commit reply of transaction {self.id} was lost")
        await self._ask_commit(key, lost, deadline)
        self._client._transactions.commits_recovered += 1

    async def _commit_read_only(self, deadline: float) -> None:
        """A read-only transaction applies nothing: ending it is a rollback (no key,
        nothing stored), and a failure to end it only closes its connection."""
        try:
            with trio.fail_at(deadline):
                await self._connection.request(
                    "rollback", {"tx": self.id}, deadline_ms=ms_until(deadline)
                )
        except (QdbError, trio.TooSlowError):
            self._connection.abort(f"read-only transaction {self.id} could not be ended")

    async def _ask_commit(self, key: str, lost: BaseException, deadline: float) -> None:
        """The commit's reply was lost: send it again with its key, to any node,
        which answers from the stored outcome (committed, or rolled back)."""
        pipeline = self._client._pipeline
        remaining = deadline - trio.current_time()
        if pipeline is None or remaining <= 0:
            raise self._unknown(key, lost, "no time was left to ask again")
        try:
            await pipeline.call(
                "commit",
                {"tx": self.id},
                budget_seconds=remaining,
                read_only=False,
                idempotency_key=key,
                parse=check_committed,
            )
        except TransactionAborted as exc:
            # Not committed, and fenced: the commit still on its way can't apply.
            # The whole transaction may run again (with another key).
            aborted = aborted_error(
                f"the commit's reply was lost ({describe(lost)}); asked again,"
                f" {exc.node or 'a node'} says it did not commit: {exc.message}",
                node=self.node,
                cause=exc,
            )
            raise with_facts(aborted, sent=True, key=key) from exc
        except QdbError as exc:
            why = f"no node could say whether it committed ({exc})"
            raise self._unknown(key, lost, why) from exc

    def _unknown(self, key: str, lost: BaseException, why: str) -> OutcomeUnknown:
        self._client._transactions.outcome_unknown += 1
        unknown = OutcomeUnknown(
            f"the commit of transaction {self.id} was sent to {self.node} but its reply was"
            f" lost ({describe(lost)}), and {why}; commit again with idempotency key"
            f" {key!r} (commit {{'tx': {self.id!r}}}) to find out"
        )
        unknown.request_sent = True
        unknown.maybe_applied = True
        unknown.idempotency_key = key
        return unknown

    async def _rollback(self) -> None:
        """Roll back, shielded and bounded; a failure closes the connection
        (the node then rolls back by itself)."""
        if not self._connection.usable:
            return  # closed: the node rolled it back
        with trio.move_on_after(self._client.config.close_timeout, shield=True) as scope:
            try:
                await self._connection.request("rollback", {"tx": self.id})
                return
            except QdbError:
                pass
        if scope.cancelled_caught or self._connection.usable:
            self._connection.abort(f"transaction {self.id} could not be rolled back")
