"""Transactions: one leased connection, the node's transaction id, commit or rollback.

``async with client.transaction() as tx:`` picks a node, leases one of its
connections for the block alone, and sends ``begin``; the node issues the
transaction id. Statements go on that connection with the id. Leaving the
block normally commits; an exception or a cancellation rolls back (shielded
and bounded by ``close_timeout``). docs/protocol.md section 10.2 is the
contract.

What can go wrong, and what the block raises:

- a statement fails (``SqlError``, ``ConstraintViolation``...): raised as is;
  the transaction goes on, the application decides;
- the connection is lost, the node times the transaction out, or a write
  conflicts with another transaction: :class:`TransactionAborted` (or its
  :class:`WriteConflict`), with ``retryable`` set when running the whole
  transaction again may succeed; nothing was applied;
- the commit's reply is lost: the commit carries an idempotency key, so it is
  asked again (on any node) and answered from its stored outcome: committed,
  or ``TransactionAborted`` (not applied). Only if no node can answer within
  the deadline is the outcome unknown: :class:`OutcomeUnknown`, with
  ``maybe_applied`` and the ``idempotency_key`` to ask again.

Nothing inside a transaction is applied before its commit, so every error of
a statement says ``maybe_applied=False``.
"""

from __future__ import annotations

import contextvars
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from ._arguments import (
    Params,
    Statement,
    batch_args,
    executemany_args,
    statement_args,
)
from ._arguments import expect_rows as check_expect_rows
from ._request import RequestPipeline
from .config import ClientConfig
from .errors import (
    ConnectionLost,
    InvalidArgument,
    OutcomeUnknown,
    ProtocolError,
    QdbError,
    RequestTimeout,
    TransactionAborted,
    TransportError,
)
from .results import ExecuteResult, QueryResult

if TYPE_CHECKING:
    from ._cluster import Cluster, Node
    from ._transport import Connection

__all__ = ["Transaction", "run_in_transaction", "transaction"]

T = TypeVar("T")


class Host(Protocol):
    """What a transaction needs of its client (the public Client provides it)."""

    config: ClientConfig
    _pipeline: RequestPipeline | None
    _rng: random.Random

    def _budget(self, timeout: float | None) -> float: ...

    def _key(self, choice: str | bool) -> str | None: ...

    def _fresh_key(self) -> str: ...

    def _require_cluster(self) -> Cluster: ...


#: The transaction open in this task (transactions don't nest).
_CURRENT: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar(
    "qdb_transaction", default=None
)


def _aborted(message: str, *, node: str | None, cause: BaseException | None) -> TransactionAborted:
    """A TransactionAborted raised on the driver's side, as the node would say it
    (the node rolls back every transaction of a connection that closes)."""
    error = TransactionAborted(
        message,
        code=409,
        name="TX_ABORTED",
        retryable=True,
        details={"executed": False, "reason": message},
        node=node,
    )
    error.__cause__ = cause
    return error


class Transaction:
    """An open transaction; use it only inside its ``async with`` block.

    ``id`` is the node's transaction id, ``node`` the address it runs on.
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

    # ---------------------------------------------------------------- calls

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

    async def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> QueryResult:
        """Run one read in the transaction (see :meth:`Client.query`)."""
        return await self._call(
            "query", statement_args(sql, params), timeout, QueryResult.from_wire
        )

    async def batch(
        self, statements: Iterable[Statement], *, timeout: float | None = None
    ) -> list[ExecuteResult]:
        """Run several statements in the transaction, all or none (see :meth:`Client.batch`)."""
        return await self._call(
            "batch", batch_args(statements), timeout, ExecuteResult.batch_from_wire
        )

    async def executemany(
        self, sql: str, rows: Iterable[Params], *, timeout: float | None = None
    ) -> int:
        """Run one statement for each parameter row, all or none; the rows affected."""
        result: int = await self._call(
            "executemany", executemany_args(sql, rows), timeout, _rows_affected
        )
        return result

    async def _call(
        self, method: str, args: dict[str, Any], timeout: float | None, parse: Callable
    ) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._done:
            raise InvalidArgument("the transaction is over (its block has exited)")
        if self._broken is not None:
            raise _copy(self._broken)
        args["tx"] = self.id
        budget = self._client._budget(timeout)
        try:
            with trio.fail_after(budget):
                result = await self._connection.request(
                    method, args, deadline_ms=max(1, math.ceil(budget * 1000))
                )
        except trio.TooSlowError as exc:
            # The statement may still run: the transaction can't be trusted any more.
            self._broken = _aborted(
                f"a statement outlasted its {budget:g} s timeout", node=self.node, cause=exc
            )
            timed_out = RequestTimeout(
                f"{method} in transaction {self.id} did not complete within {budget:g} s;"
                " the transaction is rolled back",
                timeout=budget,
                request_sent=True,
            )
            raise timed_out from exc
        except TransactionAborted as exc:
            self._broken = exc
            raise
        except TransportError as exc:
            self._broken = _aborted(
                f"the connection to {self.node} was lost: {exc}", node=self.node, cause=exc
            )
            raise _copy(self._broken) from exc
        return parse(result)

    # ------------------------------------------------------------ lifecycle

    async def _commit(self) -> None:
        if self._broken is not None:
            raise _copy(self._broken)
        client = self._client
        key = client._key(True) or client._fresh_key()
        budget = client.config.request_timeout
        try:
            with trio.fail_after(budget):
                await self._connection.request(
                    "commit",
                    {"tx": self.id},
                    deadline_ms=max(1, math.ceil(budget * 1000)),
                    idempotency_key=key,
                )
            return
        except TransactionAborted:
            raise
        except (ConnectionLost, trio.TooSlowError) as exc:
            lost: BaseException = exc  # sent, reply lost: ask the cluster what happened
        await self._ask_commit(key, lost)

    async def _ask_commit(self, key: str, lost: BaseException) -> None:
        """The commit's reply was lost: send it again with its key, to any node,
        which answers from the stored outcome (committed, or rolled back)."""
        pipeline = self._client._pipeline
        assert pipeline is not None
        try:
            await pipeline.call(
                "commit",
                {"tx": self.id},
                budget_seconds=self._client.config.request_timeout,
                read_only=False,
                idempotency_key=key,
            )
        except TransactionAborted:
            raise
        except QdbError as exc:
            unknown = OutcomeUnknown(
                f"the commit of transaction {self.id} was sent to {self.node} but its reply was"
                f" lost ({lost}), and no node could say whether it committed ({exc});"
                f" commit again with idempotency key {key!r} to find out"
            )
            unknown.request_sent = True
            unknown.maybe_applied = True
            unknown.idempotency_key = key
            raise unknown from exc

    async def _rollback(self) -> None:
        """Roll back, shielded and bounded; a failure closes the connection
        (the node then rolls back by itself)."""
        with trio.move_on_after(self._client.config.close_timeout, shield=True) as scope:
            try:
                await self._connection.request("rollback", {"tx": self.id})
                return
            except QdbError:
                pass
        if scope.cancelled_caught or self._connection.usable:
            self._connection.abort(f"transaction {self.id} could not be rolled back")


def _copy(error: TransactionAborted) -> TransactionAborted:
    fresh = _aborted(str(error.message), node=error.node, cause=error.__cause__)
    fresh.retryable = error.retryable  # type: ignore[misc]
    return fresh


def _rows_affected(result: Any) -> int:
    parsed = ExecuteResult.from_wire(result)
    return parsed.rows_affected


@asynccontextmanager
async def transaction(
    client: Host, *, read_only: bool = False, timeout: float | None = None
) -> AsyncIterator[Transaction]:
    """See :meth:`Client.transaction`."""
    if _CURRENT.get() is not None:
        await trio.lowlevel.checkpoint()
        raise InvalidArgument(
            "transactions don't nest: use the open transaction (savepoints are not supported)"
        )
    cluster = client._require_cluster()
    budget = client._budget(timeout)
    node = await cluster.select()
    async with node.pool.lease() as connection:
        args: dict[str, Any] = {"timeout_ms": max(1, math.ceil(budget * 1000))}
        if read_only:
            args["read_only"] = True
        try:
            with trio.fail_after(budget):
                reply = await connection.request(
                    "begin", args, deadline_ms=max(1, math.ceil(budget * 1000))
                )
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"begin on {node.address} did not complete within {budget:g} s",
                timeout=budget,
                request_sent=True,
            ) from exc
        except TransportError as exc:
            raise _aborted(
                f"could not begin on {node.address}: {exc}", node=node.address, cause=exc
            ) from exc
        tx_id = reply.get("tx") if isinstance(reply, dict) else None
        if not isinstance(tx_id, str) or not tx_id or len(tx_id) > 128:
            raise ProtocolError(f"{node.address} answered begin without a transaction id")
        tx = Transaction(client, node, connection, tx_id, read_only)
        token = _CURRENT.set(tx)
        try:
            yield tx
        except BaseException:
            tx._done = True
            await tx._rollback()
            raise
        finally:
            _CURRENT.reset(token)
        tx._done = True
        # Bounded by its own timeouts, and never cut half-way by an outer scope:
        # a commit interrupted at the wrong moment would leave its outcome unknown.
        with trio.CancelScope(shield=True):
            await tx._commit()


async def run_in_transaction(
    client: Host,
    fn: Callable[[Transaction], Awaitable[T]],
    *,
    retries: int = 3,
    read_only: bool = False,
    timeout: float | None = None,
) -> T:
    """See :meth:`Client.run_in_transaction`."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgument(f"retries must be a non-negative integer, not {retries!r}")
    budget = client._budget(timeout)
    policy = client._pipeline.policy if client._pipeline is not None else None
    deadline = trio.current_time() + budget
    attempt = 0
    while True:
        remaining = deadline - trio.current_time()
        try:
            with trio.fail_after(max(remaining, 0.001)):
                async with transaction(client, read_only=read_only, timeout=remaining) as tx:
                    return await fn(tx)
        except TransactionAborted as exc:
            if not exc.retryable or attempt >= retries:
                raise
            delay = policy.backoff.delay(attempt, client._rng) if policy else 0.1
            if trio.current_time() + delay >= deadline:
                raise
            attempt += 1
            await trio.sleep(delay)
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"the transaction did not complete within {budget:g} s", timeout=budget
            ) from exc
