"""The public client: ``open_client`` and the request pipeline.

Pipeline of one call: one deadline for the whole call -> a connection to a
node (reused, or opened under the connect timeout) -> REQUEST carrying the
remaining budget -> reply or typed error. Requests go to the first node
that accepts a connection; when that connection dies the next call
connects again, trying the configured nodes in order.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._nursery import owned_nursery
from ._transport import Connection, PendingRequest, open_tcp
from ._version import __version__
from .config import ClientConfig
from .errors import (
    ClientClosed,
    ConfigError,
    ConnectTimeout,
    InvalidArgument,
    NoAvailableNode,
    QdbError,
    RequestTimeout,
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

    ``hosts`` is one ``"host:port"`` or several. ``options`` are the fields of
    :class:`~qdb_client.config.ClientConfig` (``request_timeout=2.0``...).
    At least one node must accept a connection, else NoAvailableNode.
    Leaving the block closes every connection and stops every background
    task; an exception from the block comes out unchanged.
    """
    config = ClientConfig.from_options(hosts, **options)
    client = Client(config)
    async with owned_nursery(client.aclose) as nursery:
        client._nursery = nursery
        await client._connection()
        yield client


class Client:
    """A connection to a QDB cluster. Create it with :func:`open_client`."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._nursery: trio.Nursery | None = None
        self._current: Connection | None = None
        self._connect_lock = trio.Lock()
        self._closed = False
        self._requests = 0
        self._failures = 0

    # ------------------------------------------------------------ public API

    async def execute(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> ExecuteResult:
        """Run one statement that returns no rows; return its counts."""
        result = await self._call("execute", _statement_args(sql, params), timeout)
        return ExecuteResult.from_wire(result)

    async def query(
        self, sql: str, params: Params = None, *, timeout: float | None = None
    ) -> QueryResult:
        """Run a query; return all its rows (``result.columns``, ``result.rows``)."""
        result = await self._call("query", _statement_args(sql, params), timeout)
        return QueryResult.from_wire(result)

    async def batch(
        self, statements: Iterable[Statement], *, timeout: float | None = None
    ) -> list[ExecuteResult]:
        """Run several statements atomically: all are applied or none is."""
        args = {"statements": [_batch_entry(item) for item in statements]}
        result = await self._call("batch", args, timeout)
        if not isinstance(result, dict) or not isinstance(result.get("results"), list):
            raise QdbError(f"malformed batch result from node: {result!r:.200}")
        return [ExecuteResult.from_wire(item) for item in result["results"]]

    async def ping(self, *, timeout: float | None = None) -> float:
        """Send a PING to the current node; return the round trip in seconds."""
        budget = self._budget(timeout)
        try:
            with trio.fail_after(budget):
                connection = await self._connection()
                return await connection.ping()
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"ping did not complete within {budget:g} s", timeout=budget
            ) from exc

    def statistics(self) -> dict[str, Any]:
        """A snapshot of the client's state: connection, in-flight and counters."""
        conn = self._current
        return {
            "closed": self._closed,
            "requests": self._requests,
            "failures": self._failures,
            "connection": None
            if conn is None
            else {
                "address": conn.address,
                "node_id": conn.node_id,
                "usable": conn.usable,
                "in_flight": conn.in_flight,
                "requests_sent": conn.requests_sent,
                "late_replies_dropped": conn.late_replies_dropped,
            },
        }

    async def aclose(self) -> None:
        """Close every connection and wait for background tasks to stop."""
        self._closed = True
        conn, self._current = self._current, None
        if conn is not None:
            with trio.move_on_after(self.config.close_timeout, shield=True):
                await conn.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -------------------------------------------------------------- pipeline

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

    async def _call(self, method: str, args: dict[str, Any], timeout: float | None) -> Any:
        budget = self._budget(timeout)
        deadline = trio.current_time() + budget
        pending: PendingRequest | None = None
        self._requests += 1
        try:
            with trio.fail_at(deadline):
                connection = await self._connection()
                remaining_ms = max(1, math.ceil((deadline - trio.current_time()) * 1000))
                pending = await connection.send_request(method, args, deadline_ms=remaining_ms)
                return await pending.wait()
        except trio.TooSlowError as exc:
            self._failures += 1
            sent = pending is not None and pending.sent
            raise RequestTimeout(
                f"{method} did not complete within {budget:g} s"
                + (" (sent; outcome unknown)" if sent else " (never sent)"),
                timeout=budget,
                request_sent=sent,
            ) from exc
        except QdbError:
            self._failures += 1
            raise

    async def _connection(self) -> Connection:
        """The current connection, or a new one to the first node that answers."""
        conn = self._current
        if conn is not None and conn.usable:
            await trio.lowlevel.checkpoint()
            return conn
        async with self._connect_lock:
            if self._closed:
                raise ClientClosed("the client is closed")
            conn = self._current
            if conn is not None and conn.usable:
                return conn
            errors: dict[str, BaseException] = {}
            for address in self.config.hosts:
                try:
                    self._current = await self._open(address)
                    return self._current
                except QdbError as exc:
                    errors[address] = exc
            reasons = {node: f"{type(exc).__name__}: {exc}" for node, exc in errors.items()}
            raise NoAvailableNode(reasons, errors)

    async def _open(self, address: str) -> Connection:
        assert self._nursery is not None
        timeout = self.config.connect_timeout
        hello = Hello(
            versions=PROTOCOL_VERSIONS,
            client_name=self.config.client_name,
            client_version=__version__,
            credentials=_credentials(self.config),
            max_frame_size=self.config.max_frame_size,
        )
        try:
            with trio.fail_after(timeout):
                stream = await open_tcp(address)
                connection = Connection(
                    stream,
                    address=address,
                    max_frame_size=self.config.max_frame_size,
                    max_in_flight=self.config.max_in_flight,
                )
                await self._nursery.start(connection.run, hello)
        except trio.TooSlowError as exc:
            raise ConnectTimeout(
                f"connecting to {address} took longer than {timeout:g} s", node=address
            ) from exc
        return connection


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
