"""The public client: ``open_client`` and :class:`Client`.

The client's public API turns calls into wire requests (arguments, results)
and hands each to :meth:`~._client_core.ClientCore._call` (the bulkhead,
idempotency keys, then the request pipeline). The machinery under it, and
the background tasks that run in the nursery of ``open_client`` (the
cluster's pools and health monitors, the session's renewal), are in
``_client_core.py``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from ._arguments import (
    Params,
    Statement,
    batch_args,
    checkpointed,
    chunks,
    executemany_args,
    statement_args,
)
from ._arguments import expect_rows as check_expect_rows
from ._client_core import ClientCore
from ._nursery import owned_nursery
from ._prepared import PreparedStatement, from_prepare_reply
from ._request import PipelineCounters
from ._streams import ResultStream, Subscription
from ._transaction import (
    Transaction,
    rows_affected,
    run_in_transaction,
    transaction,
)
from .config import ClientConfig
from .errors import RequestTimeout
from .results import ExecuteResult, QueryResult

__all__ = ["Client", "Params", "Statement", "open_client"]

T = TypeVar("T")


@asynccontextmanager
async def open_client(
    hosts: str | Iterable[str] | None = None, **options: Any
) -> AsyncIterator[Client]:
    """Connect to a QDB cluster; yield a :class:`Client`; close everything on exit.

    ``hosts`` is one ``"host:port"`` or several: a list, or one string
    separated by commas (``"h1:7000,h2:7001"``); or a URI
    ``"qdb://user:password@h1,h2:7001/?request_timeout=2"`` (port 7000 by
    default, options as text); or None (the default): then ``QDB_URL``, else
    ``QDB_HOSTS`` and ``QDB_<OPTION>`` variables name them (see
    :meth:`~qdb_client.config.ClientConfig.from_environment`). More nodes
    are learnt from the cluster's member list. ``options`` are the fields of
    :class:`~qdb_client.config.ClientConfig` (``request_timeout=2.0``...);
    they override a URI's options and the environment's.
    At least one node must accept a connection within ``connect_timeout``,
    else NoAvailableNode. Leaving the block closes every connection and
    stops every background task; an exception from the block comes out
    unchanged.
    """
    config = ClientConfig.from_options(hosts, **options)
    client = Client(config)
    async with owned_nursery(client.aclose) as nursery:
        await client._start(nursery)
        yield client


_checkpointed = checkpointed


class Client(ClientCore):
    """A connection to a QDB cluster. Create it with :func:`open_client`."""

    # ------------------------------------------------------------ public API

    @_checkpointed
    async def execute(
        self,
        sql: str,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | bool = True,
        expect_rows: int | None = None,
    ) -> ExecuteResult:
        """Run one statement that may write; return its counts (and the rows of
        ``INSERT/UPDATE/DELETE ... RETURNING`` in ``result.rows``).

        By default the write carries a fresh idempotency key, so it can be
        retried safely and is applied exactly once. Pass a string to choose
        the key (e.g. to deduplicate across your own restarts), or False to
        send none: then a lost reply raises OutcomeUnknown instead of being
        retried. Any error says whether the write may have been applied
        (``error.maybe_applied``) and carries the key used
        (``error.idempotency_key``): calling again with that key applies it at
        most once.

        ``expect_rows``: the number of rows the statement must affect; any
        other count rolls it back on the node and raises
        :class:`~qdb_client.errors.Conflict` (not retried), whose ``details``
        hold ``expected`` and ``rows_affected``. With a version column this is
        compare-and-set: ``UPDATE t SET v = ?, version = version + 1 WHERE id = ?
        AND version = ?`` with ``expect_rows=1``.
        """
        args = statement_args(sql, params)
        if expect_rows is not None:
            args["expect_rows"] = check_expect_rows(expect_rows)
        return await self._call(
            "execute", args, timeout, idempotency_key=idempotency_key, parse=ExecuteResult.from_wire
        )

    @_checkpointed
    async def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> QueryResult:
        """Run a read-only statement; return all its rows (``result.columns``, ``result.rows``).

        The node runs it read-only: a statement that writes is refused with
        :class:`~qdb_client.errors.ReadOnlyViolation` and nothing changes (use
        :meth:`execute`, which returns the rows of ``... RETURNING``). So
        queries are retried freely on failure, on another node when possible.
        """
        return await self._call(
            "query",
            statement_args(sql, params),
            timeout,
            read_only=True,
            parse=QueryResult.from_wire,
        )

    @_checkpointed
    async def batch(
        self,
        statements: Iterable[Statement],
        *,
        timeout: float | None = None,
        idempotency_key: str | bool = True,
    ) -> list[ExecuteResult]:
        """Run several statements atomically: all are applied or none is.

        ``idempotency_key`` as for :meth:`execute`.
        """
        args = batch_args(statements)
        return await self._call(
            "batch",
            args,
            timeout,
            idempotency_key=idempotency_key,
            parse=ExecuteResult.batch_from_wire,
        )

    @_checkpointed
    async def executemany(
        self,
        sql: str,
        rows: Iterable[Params],
        *,
        timeout: float | None = None,
        idempotency_key: str | bool = True,
    ) -> int:
        """Run one statement once per parameter row, all applied or none; return
        the total of rows affected.

        The rows travel in one request (keyed like :meth:`execute`, so a lost
        reply is retried and applied once). Rows too many for one frame go in
        several requests inside one transaction, committed once.
        """
        args = executemany_args(sql, rows)
        key = self._key(idempotency_key)  # checked here, whichever path follows
        if self._fits(args):
            affected: int = await self._call(
                "executemany", args, timeout, idempotency_key=key or False, parse=rows_affected
            )
            return affected

        async def in_chunks(tx: Transaction) -> int:
            total = 0
            for chunk in chunks(args, self._fits):
                total += await tx._executemany_wire({"sql": sql, "rows": chunk}, timeout)
            return total

        return await run_in_transaction(self, in_chunks, retries=0, timeout=timeout, commit_key=key)

    @_checkpointed
    async def prepare(self, sql: str, *, timeout: float | None = None) -> PreparedStatement:
        """Prepare ``sql`` on the cluster; run it with ``stmt.query(params)`` /
        ``stmt.execute(params)``.

        The node parses it once per session and the driver sends its id
        afterwards, preparing again by itself on another node or connection
        (see :mod:`qdb_client._prepared`). Wrong parameters fail before sending.
        """
        args = statement_args(sql, None)
        statement: PreparedStatement = await self._call(
            "prepare",
            args,
            timeout,
            read_only=True,
            parse=functools.partial(from_prepare_reply, self, sql),
        )
        return statement

    def transaction(
        self, *, read_only: bool = False, timeout: float | None = None
    ) -> AbstractAsyncContextManager[Transaction]:
        """``async with client.transaction() as tx:`` a transaction on one node.

        ``tx.execute/query/batch/executemany`` run in it. Leaving the block
        commits (with an idempotency key: a lost commit reply is asked again,
        on any node, and answered from its stored outcome); an exception or a
        cancellation rolls back. A lost connection, an idle timeout on the node
        or a write conflict raise :class:`~qdb_client.errors.TransactionAborted`
        (nothing applied; ``retryable`` when running it again may succeed).
        ``read_only`` refuses writes; ``timeout`` bounds ``begin`` and is the
        node's idle limit between statements (default ``request_timeout``).
        Transactions don't nest. See :mod:`qdb_client._transaction`.
        """
        return transaction(self, read_only=read_only, timeout=timeout)

    async def run_in_transaction(
        self,
        fn: Callable[[Transaction], Awaitable[T]],
        *,
        retries: int = 3,
        read_only: bool = False,
        timeout: float | None = None,
    ) -> T:
        """Run ``await fn(tx)`` in a transaction and commit; on a transient failure
        (a write conflict, a connection lost before the commit) run it again,
        up to ``retries`` more times, all within one ``timeout`` (default
        ``request_timeout``), as MongoDB's ``with_transaction`` does.

        ``fn`` may run more than once: keep its effects inside the transaction.
        """
        return await run_in_transaction(
            self, fn, retries=retries, read_only=read_only, timeout=timeout
        )

    def stream(
        self,
        sql: str,
        params: Params = None,
        *,
        page_rows: int | None = None,
        page_bytes: int | None = None,
        timeout: float | None = None,
    ) -> ResultStream:
        """``async with client.stream(sql) as rows: async for row in rows`` (or
        ``async for page in rows.pages()``): a read-only result of any size, in pages.

        The node spools the result in the cluster's store before the first page;
        at most ``stream_credit`` pages are buffered or on their way, so memory is
        bounded whatever the size. A connection or node lost mid-stream is
        resumed on any node from the last page received: no row missing or
        repeated (checked by the row count and SHA-256 digest at the end:
        :class:`~qdb_client.errors.StreamCorrupted` otherwise); when it can't be,
        :class:`~qdb_client.errors.StreamResumeFailed` says what was delivered.
        ``page_rows``/``page_bytes`` (defaults ``stream_page_rows``,
        ``stream_page_bytes``) shape the pages; ``timeout`` bounds the whole
        stream (default: none, each page waited for ``stream_page_timeout``).
        See :mod:`qdb_client._streams.stream`.
        """
        return ResultStream(
            self, sql, params, page_rows=page_rows, page_bytes=page_bytes, timeout=timeout
        )

    def subscribe(
        self,
        table: str,
        *,
        where: str | None = None,
        from_event: int | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """``async with client.subscribe("t") as events: async for event in events``:
        every change committed to ``table`` from now on (or from event id
        ``from_event``), by any client on any node, as
        :class:`~qdb_client.ChangeEvent` objects in commit order.

        ``where`` (an SQL expression over the table's columns) filters them. A
        lost connection or node is resumed elsewhere after the last event
        received, each event delivered once; a gap the log no longer holds
        raises :class:`~qdb_client.errors.SubscriptionGap`. ``timeout``
        (default ``request_timeout``) bounds entering the block, until the node
        answered: :class:`~qdb_client.errors.RequestTimeout` after it. See
        :mod:`qdb_client._streams.subscription`.
        """
        return Subscription(self, table, where=where, from_event=from_event, timeout=timeout)

    @_checkpointed
    async def ping(self, *, timeout: float | None = None) -> float:
        """PING the next node the balancer picks; return the round trip in seconds."""
        budget = self._budget(timeout)
        try:
            with trio.fail_after(budget):
                node = await self._require_cluster().select()
                connection = await node.pool.connection_for_ping()
                return await connection.ping()
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"ping did not complete within {budget:g} s", timeout=budget
            ) from exc

    def mark_node_unhealthy(self, node: str) -> None:
        """Take a node (address or node id) out of rotation until marked healthy."""
        self._require_cluster().mark(node, healthy=False)

    def mark_node_healthy(self, node: str) -> None:
        """Return a node (address or node id) to rotation now."""
        self._require_cluster().mark(node, healthy=True)

    def statistics(self) -> dict[str, Any]:
        """A snapshot: every node's state, connections and counters, and totals.

        Totals: ``calls``, ``attempts``, ``retries``, ``requeues`` (attempts
        sent again at once after a GOAWAY), ``attempt_timeouts``, ``failures``
        (calls that raised), ``outcome_unknown``, ``retry_budget_exhausted``,
        ``circuit_rejections``, ``bulkhead_rejections``, ``in_progress``,
        ``members_skipped``, ``members_forgotten``. Per node: ``address``,
        ``node_id``, ``state`` (UP/SUSPECT/DOWN), ``reason``, ``configured``,
        ``connections`` (open/idle/leased/opening/retiring), ``in_flight``
        (orphans included), ``orphaned`` (cancelled requests the node has not
        confirmed), ``waiting``, ``requests_sent``, ``failures``,
        ``consecutive_failures``, ``last_ping_rtt``, ``latency_ewma``,
        ``reply_time``, ``reply_time_quantile``, ``next_reconnect_in`` and
        ``breaker`` (seed 003's metrics plus ``transitions`` and ``opened_by``).
        ``latency``: reply-time histograms ``{method: {node: {buckets, count,
        sum, p50, p99}}}`` of successful attempts. ``call_timeouts`` counts
        calls that ended at their deadline, ``idempotent_replays`` keyed
        writes a node answered from its stored outcome, ``hedges`` second
        copies of reads sent after ``hedge_delay`` and ``hedge_wins`` reads a
        hedge answered first, ``hedge_budget_exhausted`` hedges the hedge
        budget refused. ``reliability``: seed
        003's summary (timeouts, retries, breaker opens, bulkhead rejections,
        idempotency hits, saga compensations; each with its rate over the last
        60 s) and the ratios its alert rules use (:mod:`qdb_client.metrics`).
        ``tls``: whether connections use TLS; ``session``: the client's session
        (user, id, seconds its token stays valid, logins by password and by
        token; never a password or a token); ``members_untrusted`` and
        ``untrusted_members``: announced members not trusted with the
        credentials; per node ``auth_failed``: it refused them (docs/security.md).
        """
        counters = self._pipeline.counters if self._pipeline else PipelineCounters()
        members = {} if self._cluster is None else self._cluster.statistics_totals()
        latency = {} if self._pipeline is None else self._pipeline.latencies.snapshot()
        reliability = self._reliability.summary(
            trio.current_time(), self._reliability_totals(), latency
        )
        return {
            "closed": self._closed,
            "in_progress": self._active,
            **attrs.asdict(counters),
            **members,
            "bulkhead_rejections": self._bulkhead_rejections,
            "load_balancing": self.config.load_balancing,
            "nodes": [] if self._cluster is None else self._cluster.statistics(),
            "latency": latency,
            "reliability": reliability,
            "transactions": self._transactions.snapshot(),
            "tls": self._tls is not None,
            "session": self._auth.snapshot(trio.current_time()),
        }
