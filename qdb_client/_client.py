"""The public client: ``open_client`` and :class:`Client`.

The client turns calls into wire requests (arguments, idempotency keys,
results), applies the client-wide bulkhead, and hands each call to the
request pipeline (``_request/``), which owns deadlines, node selection,
breakers and retries. It owns the background tasks: the cluster's pools and
health monitors run in the nursery of ``open_client``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, ParamSpec, TypeVar

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
from ._arguments import (
    expect_rows as check_expect_rows,
)
from ._cluster import Cluster, ClusterSettings, HealthSettings, make_balancer
from ._nursery import owned_nursery
from ._policies import (
    AttemptTimeouts,
    Backoff,
    BreakerSettings,
    RetryBudget,
    RetryBudgetSettings,
    RetryPolicy,
)
from ._pool import PoolLimits
from ._prepared import PreparedStatement, from_prepare_reply
from ._request import PipelineCounters, RequestPipeline, retry_backoff
from ._streams import ResultStream, Subscription
from ._transaction import (
    Transaction,
    TransactionCounters,
    rows_affected,
    run_in_transaction,
    transaction,
)
from ._transport import Connection, ConnectionListener
from ._transport.auth import Authenticator
from ._transport.establish import TlsSettings, establish
from ._version import __version__
from .config import ClientConfig, Credentials, parse_address
from .errors import (
    AuthenticationFailed,
    BulkheadFull,
    ClientClosed,
    InvalidArgument,
    NoAvailableNode,
    QdbError,
    RequestTimeout,
)
from .events import EventBus
from .metrics import ReliabilityMetrics
from .protocol import PROTOCOL_VERSIONS, Hello, encode_body
from .results import ExecuteResult, QueryResult
from .validation import seconds_or_error

__all__ = ["Client", "Params", "Statement", "open_client"]

P = ParamSpec("P")
T = TypeVar("T")

logger = logging.getLogger("qdb_client.connection")


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


#: Idempotency keys: 1..128 characters of this set (docs/protocol.md).
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")


class Client:
    """A connection to a QDB cluster. Create it with :func:`open_client`."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._rng = random.Random(config.random_seed)
        # Credentials and session tokens are added per handshake by the
        # authenticator (docs/protocol.md 7.3, 7.4); one per client, not per node.
        self._hello = Hello(
            versions=PROTOCOL_VERSIONS,
            client_name=config.client_name,
            client_version=__version__,
            max_frame_size=config.max_frame_size,
        )
        self._auth = Authenticator(config.credentials, keep_password=config.keep_password)
        self._tls = _tls_settings(config)
        self._nursery: trio.Nursery | None = None
        self._cluster: Cluster | None = None
        self._pipeline: RequestPipeline | None = None
        self._closed = False
        self._active = 0
        self._bulkhead_rejections = 0
        #: Where the driver's events go: ``config.listeners`` and the
        #: ``qdb_client`` loggers (see :mod:`qdb_client.events`).
        self.events = EventBus(config.listeners)
        #: Seed 003's reliability counters and rates (``statistics()["reliability"]``).
        self._reliability = ReliabilityMetrics()
        #: How transactions ended (``statistics()["transactions"]``).
        self._transactions = TransactionCounters()

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

    async def reauthenticate(
        self, user: str, password: str, *, timeout: float | None = None
    ) -> None:
        """Log in again with new credentials, after a refusal or a password change.

        The client forgets its session and every AUTH_FAILED mark, then logs in
        with ``user`` and ``password`` on one node now (within ``timeout``,
        default ``request_timeout``) and raises AuthenticationFailed at once if
        that node refuses them. Nodes refused earlier are tried again in the
        background, each once. Connections already open keep working; when
        the user changes they are retired (drained), so that later requests
        run as the new user. A wrong type is a ConfigError; nothing is sent.
        """
        credentials = Credentials(user=user, password=password)
        budget = self._budget(timeout)
        cluster = self._require_cluster()
        previous = self._auth.user
        self._auth.reset(credentials)
        self._update_trust()
        cluster.clear_auth_failures()
        if previous is not None and previous != user:
            for node in cluster.nodes:
                for connection in node.pool.connections():
                    node.pool.retire(connection)
        errors: dict[str, BaseException] = {}
        try:
            with trio.fail_after(budget):
                for node in sorted(cluster.nodes, key=lambda n: n.state.value != "UP"):
                    try:
                        connection = await cluster.connect(node.address)
                    except AuthenticationFailed:
                        raise
                    except QdbError as exc:
                        errors[node.address] = exc
                        continue
                    await connection.aclose()
                    for other in cluster.nodes:
                        other.pool.warm()
                    return
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"reauthenticate did not complete within {budget:g} s", timeout=budget
            ) from exc
        raise NoAvailableNode({a: str(e) for a, e in errors.items()}, errors)

    async def refresh_session(self, *, timeout: float | None = None) -> None:
        """Renew the session token now (the client does it by itself when half of
        its time to live has passed): one handshake with the current token on a
        new connection to a usable node, which is then closed.

        Without credentials, or on nodes that issue no tokens, it only checkpoints.
        """
        if not self._auth.has_credentials:
            await trio.lowlevel.checkpoint()
            return
        budget = self._budget(timeout)
        cluster = self._require_cluster()
        try:
            with trio.fail_after(budget):
                node = await cluster.select()
                connection = await cluster.connect(node.address)
                await connection.aclose()
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"refresh_session did not complete within {budget:g} s", timeout=budget
            ) from exc
        self._auth.refreshes += 1

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
        writes a node answered from its stored outcome. ``reliability``: seed
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

    def _reliability_totals(self) -> dict[str, int]:
        """The counters the reliability summary samples (see :mod:`qdb_client.metrics`)."""
        return self._reliability.totals(
            self._pipeline.counters if self._pipeline else PipelineCounters(),
            bulkhead_rejections=self._bulkhead_rejections,
            breakers=[] if self._cluster is None else [n.breaker for n in self._cluster.nodes],
        )

    async def aclose(self) -> None:
        """Close every connection and stop every background task."""
        self._closed = True
        if self._cluster is not None:
            with trio.move_on_after(self.config.close_timeout, shield=True):
                await self._cluster.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -------------------------------------------------------------- pipeline

    async def _start(self, nursery: trio.Nursery) -> None:
        config = self.config
        self._nursery = nursery
        settings = ClusterSettings(
            pool=PoolLimits(
                min_connections=config.min_connections,
                max_connections=config.max_connections,
                max_connecting=config.max_connecting,
                idle_timeout=config.idle_timeout,
                max_lifetime=config.max_lifetime,
            ),
            health=HealthSettings(
                heartbeat_interval=config.heartbeat_interval,
                suspect_interval=config.suspect_interval,
                ping_timeout=config.ping_timeout,
                failures_to_down=config.failures_to_down,
                reconnect=Backoff(
                    initial=config.reconnect_initial,
                    maximum=config.reconnect_max,
                    multiplier=config.reconnect_multiplier,
                    factor=config.reconnect_jitter,
                ),
            ),
            acquire_timeout=config.pool_acquire_timeout,
            max_waiters=config.max_waiters,
            selection_timeout=config.node_selection_timeout,
            # A margin past connect_timeout, so a hanging connect is reported
            # as its own ConnectTimeout rather than as the wait for it.
            startup_timeout=config.connect_timeout + 1.0,
            discover_members=config.discover_members,
            max_members=config.max_members,
            forget_after=config.forget_members_after,
            trusted_hosts=self._trusted_hosts(),
            breaker=BreakerSettings(
                failure_threshold=config.breaker_failure_threshold,
                success_threshold=config.breaker_success_threshold,
                open_timeout=config.breaker_open_timeout,
                half_open_probes=config.breaker_half_open_probes,
            ),
        )
        balancer = make_balancer(config.load_balancing, self._rng, slow_start=config.slow_start)
        self._cluster = Cluster(
            settings,
            connect=self._connect,
            nursery=nursery,
            balancer=balancer,
            rng=self._rng,
            events=self.events,
        )
        self._pipeline = RequestPipeline(
            self._cluster,
            policy=RetryPolicy(
                max_retries=config.max_retries,
                backoff=retry_backoff(config),
                min_attempt_time=config.min_attempt_time,
            ),
            budget=RetryBudget(
                RetryBudgetSettings(
                    ratio=config.retry_budget_ratio,
                    min_per_second=config.retry_budget_min_per_second,
                    ttl=config.retry_budget_window,
                )
            ),
            rng=self._rng,
            attempt_timeouts=AttemptTimeouts(
                factor=config.attempt_timeout_factor, minimum=config.attempt_timeout_min
            ),
            events=self.events,
        )
        nursery.start_soon(self._pipeline.expiries.run)
        nursery.start_soon(self._reliability.run, self._reliability_totals)
        await self._cluster.start(config.hosts)
        nursery.start_soon(self._refresh_sessions)

    def _trusted_hosts(self) -> frozenset[str] | None:
        """Hosts announced members must be on to get the credentials (None: any)."""
        if self.config.trust_announced_members or not self._auth.has_credentials:
            return None
        return frozenset(parse_address(address)[0].lower() for address in self.config.hosts)

    def _update_trust(self) -> None:
        cluster = self._require_cluster()
        cluster.settings = attrs.evolve(cluster.settings, trusted_hosts=self._trusted_hosts())
        cluster.enforce_member_trust()

    async def _refresh_sessions(self) -> None:
        """Background task: renew the session token at half its time to live, so
        that reconnects never need the password (and work that outlasts a token,
        seed 002's TC10, never meets an expired one)."""
        auth = self._auth
        last = -math.inf
        while True:
            due = auth.refresh_due()
            if due is None or trio.current_time() < max(due, last + 1.0):
                # (At most one renewal a second, whatever a node's time to live.)
                wake = math.inf if due is None else max(due, last + 1.0)
                with trio.move_on_at(wake):
                    await auth.wait_changed()
                continue
            last = trio.current_time()
            try:
                await self.refresh_session()
            except QdbError as exc:
                logger.info("session refresh failed (will try again): %s", exc)
            if auth.refresh_due() == due:  # nothing new came: don't spin
                left = (auth.expires_at or 0.0) - trio.current_time()
                with trio.move_on_after(max(1.0, min(30.0, left / 4))):
                    await auth.wait_changed()

    async def _connect(self, address: str, listener: ConnectionListener | None) -> Connection:
        assert self._nursery is not None
        return await establish(
            address,
            nursery=self._nursery,
            hello=self._hello,
            connect_timeout=self.config.connect_timeout,
            max_frame_size=self.config.max_frame_size,
            max_in_flight=self.config.max_in_flight,
            listener=listener,
            tls=self._tls,
            auth=self._auth,
        )

    def _require_cluster(self) -> Cluster:
        if self._closed or self._cluster is None:
            raise ClientClosed("the client is closed")
        return self._cluster

    def _budget(self, timeout: float | None) -> float:
        if timeout is None:
            return self.config.request_timeout
        return seconds_or_error(timeout, name="timeout", error=InvalidArgument, minimum=0.0)

    async def _call(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        *,
        read_only: bool = False,
        idempotency_key: str | bool = False,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        budget = self._budget(timeout)
        self._require_cluster()
        assert self._pipeline is not None
        key = self._key(idempotency_key) if not read_only else None
        if self._active >= self.config.max_concurrent_requests:
            await self._refuse()
        self._active += 1  # _admit, inline: a place in the bulkhead, given back below
        try:
            return await self._pipeline.call(
                method,
                args,
                budget_seconds=budget,
                read_only=read_only,
                idempotency_key=key,
                parse=parse,
            )
        finally:
            self._active -= 1

    async def _admit(self) -> None:
        """Take a place in the client-wide bulkhead (give it back: ``_active -= 1``),
        or raise BulkheadFull (a checkpoint either way is the caller's)."""
        if self._active >= self.config.max_concurrent_requests:
            await self._refuse()
        self._active += 1

    async def _refuse(self) -> None:
        """Raise BulkheadFull: the client-wide bulkhead is full (after a checkpoint)."""
        self._bulkhead_rejections += 1
        await trio.lowlevel.checkpoint()
        raise BulkheadFull(
            f"{self._active} calls already in progress"
            f" (max_concurrent_requests={self.config.max_concurrent_requests})"
        )

    def _fits(self, args: dict[str, Any]) -> bool:
        """Whether a request with ``args`` fits one frame (with room to spare)."""
        try:
            size = len(encode_body(args))
        except QdbError:
            return True  # let the send say what is wrong with it
        return size + 512 < self._frame_limit()

    def _frame_limit(self) -> int:
        """The largest request frame every connected node accepts (WELCOME's
        ``max_frame``), at most our own limit."""
        limit = self.config.max_frame_size
        for node in [] if self._cluster is None else self._cluster.nodes:
            connection = node.pool.any_connection()
            if connection is not None and connection.welcome is not None:
                limit = min(limit, connection.welcome.max_frame_size or limit)
        return limit

    @staticmethod
    def _fresh_key() -> str:
        """A new idempotency key (commits carry one even with ``idempotency_keys=False``):
        128 random bits, as a UUID4's hex has (less its 6 fixed bits), without
        building the UUID."""
        return f"qdb-{os.urandom(16).hex()}"

    def _key(self, choice: str | bool) -> str | None:
        if choice is True:
            return self._fresh_key() if self.config.idempotency_keys else None
        if choice is False or choice is None:
            return None
        if not isinstance(choice, str) or not _KEY_PATTERN.fullmatch(choice):
            raise InvalidArgument(
                "idempotency_key must be 1..128 characters from A-Z a-z 0-9 _ - : and ."
                f", True (generate one) or False (none), not {choice!r}"
            )
        return choice


def _tls_settings(config: ClientConfig) -> TlsSettings | None:
    """TLS for every connection: ``tls=True`` trusts the system's certificate
    authorities and checks host names (``ssl.create_default_context()``)."""
    if config.tls is False:
        return None
    context = ssl.create_default_context() if config.tls is True else config.tls
    return TlsSettings(context, config.tls_server_hostname)
