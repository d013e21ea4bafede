"""The public client: ``open_client`` and the request pipeline.

Pipeline of one call: one deadline for the whole call -> pick a node (the
balancer, over healthy nodes) -> reserve a slot on one of its pooled
connections -> REQUEST carrying the remaining budget -> reply or typed
error. A transport failure moves the call to another node when that is
safe: the request never reached the node, or it only reads.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._cluster import Cluster, ClusterSettings, HealthSettings, Node, make_balancer
from ._nursery import owned_nursery
from ._policies import Backoff
from ._pool import PoolLimits
from ._transport import Connection, PendingRequest
from ._transport.establish import establish
from ._version import __version__
from .config import ClientConfig
from .errors import (
    ClientClosed,
    ConfigError,
    InvalidArgument,
    PoolError,
    ProtocolError,
    QdbError,
    RequestTimeout,
    TransportError,
)
from .protocol import PROTOCOL_VERSIONS, Hello
from .results import ExecuteResult, QueryResult

__all__ = ["Client", "Params", "Statement", "open_client"]

#: Statement parameters: positional (sequence) or named (mapping), or None.
Params = Sequence[Any] | Mapping[str, Any] | None
#: A batch entry: SQL text, ``(sql, params)`` or ``{"sql": ..., "params": ...}``.
Statement = str | tuple[str, Params] | Mapping[str, Any]


@asynccontextmanager
async def open_client(hosts: str | Iterable[str], **options: Any) -> AsyncIterator[Client]:
    """Connect to a QDB cluster; yield a :class:`Client`; close everything on exit.

    ``hosts`` is one ``"host:port"`` or several; more nodes are learnt from
    the cluster's member list. ``options`` are the fields of
    :class:`~qdb_client.config.ClientConfig` (``request_timeout=2.0``...).
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


#: Attempts of one call across nodes when a transport failure makes it safe
#: to try elsewhere (the full retry policy builds on this).
MAX_ATTEMPTS = 3


class _Attempt:
    """The request of the current attempt, to tell whether it was sent."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: PendingRequest | None = None

    @property
    def sent(self) -> bool:
        return self.pending is not None and self.pending.sent


class Client:
    """A connection to a QDB cluster. Create it with :func:`open_client`."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._rng = random.Random(config.random_seed)
        self._hello = Hello(
            versions=PROTOCOL_VERSIONS,
            client_name=config.client_name,
            client_version=__version__,
            credentials=_credentials(config),
            max_frame_size=config.max_frame_size,
        )
        self._nursery: trio.Nursery | None = None
        self._cluster: Cluster | None = None
        self._closed = False
        self._requests = 0
        self._failures = 0
        self._failovers = 0

    # ------------------------------------------------------------ public API

    async def execute(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> ExecuteResult:
        """Run one statement that returns no rows; return its counts."""
        result = await self._call("execute", _statement_args(sql, params), timeout, read_only=False)
        return ExecuteResult.from_wire(result)

    async def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> QueryResult:
        """Run a query; return all its rows (``result.columns``, ``result.rows``)."""
        result = await self._call("query", _statement_args(sql, params), timeout, read_only=True)
        return QueryResult.from_wire(result)

    async def batch(
        self, statements: Iterable[Statement], *, timeout: float | None = None
    ) -> list[ExecuteResult]:
        """Run several statements atomically: all are applied or none is."""
        args = {"statements": [_batch_entry(item) for item in statements]}
        result = await self._call("batch", args, timeout, read_only=False)
        if not isinstance(result, dict) or not isinstance(result.get("results"), list):
            raise ProtocolError(f"malformed batch result from node: {result!r:.200}")
        return [ExecuteResult.from_wire(item) for item in result["results"]]

    async def ping(self, *, timeout: float | None = None) -> float:
        """PING the next node the balancer picks; return the round trip in seconds."""
        budget = self._budget(timeout)
        try:
            with trio.fail_after(budget):
                node = await self._require_cluster().select()
                async with node.pool.reserve() as connection:
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

        Per node: ``address``, ``node_id``, ``state`` (UP/SUSPECT/DOWN),
        ``reason``, ``connections`` (open/idle/leased/opening/retiring),
        ``in_flight``, ``waiting``, ``requests_sent``, ``failures``,
        ``consecutive_failures``, ``last_ping_rtt``, ``latency_ewma``,
        ``next_reconnect_in``.
        """
        return {
            "closed": self._closed,
            "requests": self._requests,
            "failures": self._failures,
            "failovers": self._failovers,
            "load_balancing": self.config.load_balancing,
            "nodes": [] if self._cluster is None else self._cluster.statistics(),
        }

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
        )
        balancer = make_balancer(config.load_balancing, self._rng, slow_start=config.slow_start)
        self._cluster = Cluster(
            settings, connect=self._connect, nursery=nursery, balancer=balancer, rng=self._rng
        )
        await self._cluster.start(config.hosts)

    async def _connect(
        self, address: str, on_unusable: Callable[[Connection], None] | None
    ) -> Connection:
        assert self._nursery is not None
        return await establish(
            address,
            nursery=self._nursery,
            hello=self._hello,
            connect_timeout=self.config.connect_timeout,
            max_frame_size=self.config.max_frame_size,
            max_in_flight=self.config.max_in_flight,
            on_unusable=on_unusable,
        )

    def _require_cluster(self) -> Cluster:
        if self._closed or self._cluster is None:
            raise ClientClosed("the client is closed")
        return self._cluster

    def _budget(self, timeout: float | None) -> float:
        if timeout is None:
            return self.config.request_timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (timeout > 0 and math.isfinite(timeout))
        ):
            raise ConfigError(
                f"timeout must be a positive finite number of seconds, not {timeout!r}"
            )
        return float(timeout)

    async def _call(
        self, method: str, args: dict[str, Any], timeout: float | None, *, read_only: bool
    ) -> Any:
        budget = self._budget(timeout)
        cluster = self._require_cluster()
        deadline = trio.current_time() + budget
        attempt = _Attempt()
        tried: list[Node] = []
        self._requests += 1
        try:
            with trio.fail_at(deadline):
                while True:
                    node = await cluster.select(exclude=tried)
                    try:
                        return await self._send(node, method, args, deadline, attempt)
                    except (TransportError, PoolError) as exc:
                        # Safe elsewhere: the node never saw it, or it only reads.
                        safe = read_only or not getattr(exc, "request_sent", False)
                        if not safe or len(tried) + 1 >= MAX_ATTEMPTS:
                            raise
                        tried.append(node)
                        self._failovers += 1
        except trio.TooSlowError as exc:
            self._failures += 1
            sent = attempt.sent
            raise RequestTimeout(
                f"{method} did not complete within {budget:g} s"
                + (" (sent; outcome unknown)" if sent else " (never sent)"),
                timeout=budget,
                request_sent=sent,
            ) from exc
        except QdbError:
            self._failures += 1
            raise

    async def _send(
        self, node: Node, method: str, args: dict[str, Any], deadline: float, attempt: _Attempt
    ) -> Any:
        node.requests_sent += 1
        started = trio.current_time()
        attempt.pending = None
        try:
            async with node.pool.reserve() as connection:
                remaining_ms = max(1, math.ceil((deadline - trio.current_time()) * 1000))
                attempt.pending = await connection.send_request(
                    method, args, deadline_ms=remaining_ms
                )
                result = await attempt.pending.wait()
        except (TransportError, PoolError):
            node.failures += 1
            raise
        node.record_latency(trio.current_time() - started)
        return result


def _credentials(config: ClientConfig) -> dict[str, str] | None:
    creds = config.credentials
    return None if creds is None else {"user": creds.user, "password": creds.password}


def _statement_args(sql: str, params: Params) -> dict[str, Any]:
    if not isinstance(sql, str):
        raise InvalidArgument(f"sql must be a string, not {type(sql).__name__}")
    args: dict[str, Any] = {"sql": sql}
    if params is not None:
        if isinstance(params, Mapping):
            args["params"] = dict(params)
        elif isinstance(params, Sequence) and not isinstance(params, (str, bytes, bytearray)):
            args["params"] = list(params)
        else:
            raise InvalidArgument(
                f"params must be a sequence or a mapping, not {type(params).__name__}"
            )
    return args


def _batch_entry(item: Statement) -> dict[str, Any]:
    if isinstance(item, str):
        return _statement_args(item, None)
    if isinstance(item, tuple) and len(item) == 2:
        return _statement_args(item[0], item[1])
    if isinstance(item, Mapping) and "sql" in item:
        return _statement_args(item["sql"], item.get("params"))
    raise InvalidArgument(
        f"batch entries are SQL text, (sql, params) or {{'sql', 'params'}}, not {item!r:.80}"
    )
