"""The transaction block: ``transaction()`` (begin on a leased connection,
yield the :class:`~.transaction.Transaction`, then commit or roll back) and
``run_in_transaction()`` (the block run again on a transient failure, all
within one timeout). The transaction's own statements and its commit are in
:mod:`.transaction`.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .._arguments import checkpointed
from ..errors import (
    ClientClosed,
    InvalidArgument,
    OutcomeUnknown,
    ProtocolError,
    QdbError,
    RequestTimeout,
    TransactionAborted,
    TransportError,
)
from ..events import TransactionEnded
from .common import Host, aborted_error, with_facts
from .transaction import Transaction

if TYPE_CHECKING:
    from .._cluster import Node
    from .._transport import Connection, PendingRequest

__all__ = ["run_in_transaction", "transaction"]

T = TypeVar("T")

#: The transactions open in this context, by client, with the task that opened
#: each (one per client and task: they don't nest). trio copies the context into
#: every task started while a block is open, so the owner says whose it is.
_CURRENT: contextvars.ContextVar[Mapping[int, tuple[trio.lowlevel.Task, Transaction]] | None] = (
    contextvars.ContextVar("qdb_transactions", default=None)
)


@asynccontextmanager
async def transaction(
    client: Host,
    *,
    read_only: bool = False,
    timeout: float | None = None,
    deadline: float | None = None,
    commit_key: str | None = None,
) -> AsyncIterator[Transaction]:
    """See :meth:`Client.transaction`.

    ``deadline`` (trio time) bounds the commit instead of ``request_timeout``
    from the block's exit; ``commit_key`` is the commit's idempotency key.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    open_here = _CURRENT.get() or {}
    task = trio.lowlevel.current_task()
    owner, open_tx = open_here.get(id(client), (None, None))
    if owner is task and open_tx is not None and not open_tx._done:
        await trio.lowlevel.checkpoint()
        raise InvalidArgument(
            "transactions don't nest: use the open transaction (savepoints are not supported)"
        )
    budget = client._budget(timeout)
    cluster = client._require_cluster()
    async with AsyncExitStack() as stack:
        begin = _BeginRequest()
        try:
            with trio.fail_after(budget):
                node = await cluster.select()
                connection = await stack.enter_async_context(node.pool.lease())
                tx_id = await _begin(node, connection, read_only, budget, begin)
        except trio.TooSlowError as exc:
            if begin.sent:
                connection.abort("begin timed out")  # a transaction may have opened there
                raise RequestTimeout(
                    f"begin on {node.address} did not complete within {budget:g} s",
                    timeout=budget,
                    request_sent=True,
                ) from exc
            raise RequestTimeout(
                f"no connection for a transaction within {budget:g} s (begin not sent)",
                timeout=budget,
                request_sent=False,
            ) from exc
        tx = Transaction(client, node, connection, tx_id, read_only)
        counters = client._transactions
        counters.begun += 1
        started = trio.current_time()
        token = _CURRENT.set({**open_here, id(client): (task, tx)})
        try:
            yield tx
        except BaseException:
            tx._done = True
            counters.rolled_back += 1
            await tx._rollback()
            _ended(client, tx, started, "rolled back")
            raise
        finally:
            _CURRENT.reset(token)
        tx._done = True
        # Bounded by its own deadline, and never cut half-way by an outer scope:
        # a commit interrupted at the wrong moment would leave its outcome unknown.
        with trio.CancelScope(shield=True):
            try:
                commit_by = trio.current_time() + client.config.request_timeout
                await tx._commit(deadline if deadline is not None else commit_by, commit_key)
            except OutcomeUnknown:
                _ended(client, tx, started, "outcome unknown")
                raise
            except QdbError:
                counters.aborted += 1
                _ended(client, tx, started, "aborted")
                raise
        counters.committed += 1
        _ended(client, tx, started, "committed")


class _BeginRequest:
    """A transaction's ``begin`` once queued, so whoever times it out can tell
    whether it reached the node."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: PendingRequest | None = None

    @property
    def sent(self) -> bool:
        """Whether the begin's frame went to the wire."""
        return self.pending is not None and self.pending.sent


async def _begin(
    node: Node, connection: Connection, read_only: bool, budget: float, begin: _BeginRequest
) -> str:
    """Send ``begin`` and return the node's transaction id.

    No deadline of its own: the caller's scope bounds it (one budget for
    select, lease and begin) and reads ``begin`` to say whether it was sent.
    """
    args: dict[str, Any] = {"timeout_ms": max(1, math.ceil(budget * 1000))}
    if read_only:
        args["read_only"] = True
    pending: PendingRequest | None = None
    try:
        pending = begin.pending = await connection.send_request(
            "begin", args, deadline_ms=max(1, math.ceil(budget * 1000))
        )
        reply = await pending.wait()
    except (TransportError, ClientClosed) as exc:
        raise with_facts(
            aborted_error(
                f"could not begin on {node.address}: {exc}",
                node=node.address,
                cause=exc,
                retryable=not isinstance(exc, ClientClosed),
            ),
            sent=pending is not None and pending.sent,
        ) from exc
    except QdbError as exc:
        raise with_facts(exc, sent=pending is not None and pending.sent) from None
    tx_id = reply.get("tx") if isinstance(reply, Mapping) else None
    if not isinstance(tx_id, str) or not tx_id or len(tx_id) > 128:
        connection.abort("malformed begin reply")
        raise with_facts(
            ProtocolError(f"{node.address} answered begin without a transaction id"), sent=True
        )
    return tx_id


def _ended(client: Host, tx: Transaction, started: float, outcome: str) -> None:
    if client.events.wants(TransactionEnded):
        now = trio.current_time()
        client.events.emit(TransactionEnded(now, tx.node, tx.id, outcome, now - started))


@checkpointed
async def run_in_transaction(
    client: Host,
    fn: Callable[[Transaction], Awaitable[T]],
    *,
    retries: int = 3,
    read_only: bool = False,
    timeout: float | None = None,
    commit_key: str | None = None,
) -> T:
    """See :meth:`Client.run_in_transaction`. Begin, the block and the commit
    (with its asking again) all fit in one ``timeout``."""
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgument(f"retries must be a non-negative integer, not {retries!r}")
    budget = client._budget(timeout)
    policy = client._pipeline.policy if client._pipeline is not None else None
    deadline = trio.current_time() + budget
    attempt = 0
    while True:
        remaining = deadline - trio.current_time()
        try:
            with trio.fail_at(deadline):
                async with transaction(
                    client,
                    read_only=read_only,
                    timeout=max(remaining, 0.001),
                    deadline=deadline,
                    # A key the cluster answered "not committed" stays fenced: a
                    # new run needs a new one.
                    commit_key=commit_key if attempt == 0 else None,
                ) as tx:
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
