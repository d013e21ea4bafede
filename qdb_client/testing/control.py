"""Remote fault controls: drive a test node's ``control.*`` methods over TCP.

::

    async with open_node_control("127.0.0.1:7001") as ctl:
        await ctl.fail_next(2, code=503)
        await ctl.add_latency("query", 0.2)
        stats = await ctl.stats()

One connection, one request at a time, reconnecting on the next call if the
node closed it (idle timeout, restart). Its HELLO carries the node's control
token (``auth`` ``control_token``, found by
:func:`~.control_token.find_token` unless given): without it a node in test
mode refuses ``control.*`` (PERMISSION_DENIED). Every failure is a
:mod:`qdb_client.errors` type: :class:`~qdb_client.errors.ConnectError` /
:class:`~qdb_client.errors.ConnectTimeout` when the node can't be reached,
:class:`~qdb_client.errors.ConnectionLost` when it went away mid-call,
:class:`~qdb_client.errors.RequestTimeout` past ``call_timeout``, and the
:class:`~qdb_client.errors.ServerError` subclass of any ERROR it answers.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import (
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    HandshakeError,
    ProtocolError,
    QdbError,
    RequestTimeout,
    ServerError,
    TlsError,
    VersionMismatch,
)
from ..protocol import (
    PROTOCOL_VERSIONS,
    BadMessage,
    Error,
    ErrorCode,
    GoAway,
    Hello,
    Message,
    ProtocolConnection,
    Request,
    Response,
    Role,
    State,
    Welcome,
    error_from_message,
    receive_event,
)
from .config import parse_address
from .control_token import find_token
from .stats import CONTROL_CLIENT_NAME

__all__ = ["NodeControl", "open_node_control", "wait_for_nodes"]

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _versions(value: Any) -> list[int]:
    """The protocol versions a VERSION_MISMATCH lists (anything else: none)."""
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool) and 0 < v < 256]


def _to_error(error: Error, node: str) -> ServerError:
    return error_from_message(error, node=node)


class NodeControl:
    """A control connection to one test node (which must run in test mode).

    Prefer :func:`open_node_control`, which closes it. ``call_timeout``
    bounds each call, connecting included (None: unbounded). ``tls``: an
    ``ssl.SSLContext`` for a TLS node (``tls_server_hostname``: the name its
    certificate must have, default the address's host). ``control_token``:
    the node's control token (default: :func:`~.control_token.find_token`
    when connecting: a node of this process, ``$QDB_CLUSTER_DIR``,
    ``$QDB_CONTROL_TOKEN``); ``credentials`` log in as a user as well (a node
    that requires credentials lets the control tool in with the token alone,
    for ``control.*`` and ``ping``).
    """

    def __init__(
        self,
        address: str,
        *,
        call_timeout: float | None = 10.0,
        credentials: Mapping[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        tls_server_hostname: str | None = None,
        control_token: str | None = None,
    ) -> None:
        self._host, self._port = parse_address(address)
        #: The node's ``host:port``.
        self.address = address
        #: Seconds each call may take (None: unbounded).
        self.call_timeout = call_timeout
        self._credentials = dict(credentials) if credentials is not None else None
        self._tls = tls
        self._tls_server_hostname = tls_server_hostname
        self._control_token = control_token
        self._stream: trio.abc.Stream | None = None
        self._proto: ProtocolConnection | None = None
        self._next_id = 1
        self._lock = trio.Lock()
        #: The WELCOME of the current connection (None when not connected).
        self.welcome: Welcome | None = None

    # ---------------------------------------------------------- plumbing

    async def call(self, method: str, args: Mapping[str, Any] | None = None) -> Any:
        """Send one REQUEST and return its result (or raise its ServerError)."""
        async with self._lock:
            try:
                limit = self.call_timeout if self.call_timeout is not None else float("inf")
                with trio.fail_after(limit):
                    return await self._call(method, dict(args or {}))
            except trio.TooSlowError:
                await self._discard()
                raise RequestTimeout(
                    f"{method} on {self.address} took longer than {self.call_timeout} s",
                    timeout=self.call_timeout or 0.0,
                ) from None

    async def _call(self, method: str, args: dict[str, Any]) -> Any:
        if self._stream is None or self._proto is None or self._proto.received_goaway is not None:
            await self._discard()
            await self._connect()
        assert self._stream is not None and self._proto is not None
        request_id = self._next_id
        self._next_id += 1
        try:
            await self._stream.send_all(self._proto.send(Request(request_id, method, args)))
        except _TRANSPORT_ERRORS as exc:
            await self._discard()
            raise ConnectionLost(
                f"lost the connection to {self.address}: {exc}", node=self.address
            ) from exc
        while True:
            message = await self._receive(request_sent=True)
            if isinstance(message, Response) and message.request_id == request_id:
                return message.result
            if isinstance(message, Error) and message.request_id in (request_id, 0):
                if message.request_id == 0:
                    await self._discard()
                raise _to_error(message, self.address)
            # GOAWAY, PONG, EVENT, stale replies: keep reading for ours.

    async def _connect(self) -> None:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to {self.address}: {exc}", node=self.address
            ) from exc
        if self._tls is not None:
            tls = trio.SSLStream(
                stream, self._tls, server_hostname=self._tls_server_hostname or self._host
            )
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, OSError) as exc:
                await trio.aclose_forcefully(tls)
                raise TlsError(
                    f"TLS handshake with {self.address} failed: {exc.__cause__ or exc!r}",
                    node=self.address,
                ) from exc
            except BaseException:
                await trio.aclose_forcefully(tls)
                raise
            stream = tls
        self._stream = stream
        self._proto = ProtocolConnection(Role.CLIENT)
        auth = dict(self._credentials or {})
        token = self._control_token or find_token(self.address)
        if token is not None:
            auth["control_token"] = token
        hello = Hello(
            versions=PROTOCOL_VERSIONS,
            client_name=CONTROL_CLIENT_NAME,
            credentials=auth or None,
        )
        try:
            await stream.send_all(self._proto.send(hello))
            reply = await self._receive(request_sent=False)
        except ConnectionLost as exc:
            await self._discard()
            raise ConnectError(str(exc), node=self.address) from exc
        except _TRANSPORT_ERRORS as exc:
            await self._discard()
            raise ConnectError(
                f"handshake with {self.address} failed: {exc}", node=self.address
            ) from exc
        if isinstance(reply, Welcome):
            self.welcome = reply
            return
        await self._discard()
        if isinstance(reply, Error):
            if reply.name == ErrorCode.VERSION_MISMATCH.value:
                raise VersionMismatch(
                    reply.message,
                    supported_versions=_versions(reply.details.get("supported_versions")),
                    node=self.address,
                )
            raise _to_error(reply, self.address)
        raise HandshakeError(f"{self.address} answered HELLO with {reply!r}", node=self.address)

    async def _receive(self, *, request_sent: bool) -> Message:
        assert self._stream is not None and self._proto is not None
        proto = self._proto
        while True:
            try:
                event = await receive_event(proto, self._stream)
            except _TRANSPORT_ERRORS as exc:
                await self._discard()
                raise ConnectionLost(
                    f"lost the connection to {self.address}: {exc}",
                    node=self.address,
                    request_sent=request_sent,
                ) from exc
            except ProtocolError as exc:
                if proto.state is not State.CLOSED:  # not a frame cut short by the close
                    await self._discard()
                    raise ConnectionLost(
                        f"{self.address} broke the protocol: {exc}",
                        node=self.address,
                        request_sent=request_sent,
                    ) from exc
                event = None
            if isinstance(event, BadMessage):
                continue
            if event is not None:
                return event
            goaway = proto.received_goaway
            await self._discard()
            why = f" after GOAWAY {goaway.reason!r}" if isinstance(goaway, GoAway) else ""
            raise ConnectionLost(
                f"{self.address} closed the connection{why}",
                node=self.address,
                request_sent=request_sent,
            )

    async def _discard(self) -> None:
        stream, self._stream = self._stream, None
        self._proto = None
        self.welcome = None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    @property
    def connected(self) -> bool:
        """Whether a connection is open (one is made on demand)."""
        return self._proto is not None and self._proto.state is State.OPEN

    async def aclose(self) -> None:
        """Close the connection (the object stays usable and reconnects on demand)."""
        await self._discard()

    # ------------------------------------------------------------ operations

    async def ping(self) -> str:
        """Call ``ping`` and return the node id.

        The control tool's own requests are exempt from faults, so this
        answers even while ``stop_pings`` or ``fail_next`` are active.
        """
        result = await self.call("ping")
        return result["node_id"]

    async def fail_next(
        self,
        count: int,
        code: str | int = "UNAVAILABLE",
        *,
        message: str | None = None,
        methods: Iterable[str] | None = None,
        retry_after_ms: int | None = None,
    ) -> dict[str, Any]:
        """Make the next ``count`` matching requests fail with ``code``.

        Same meaning as :meth:`Faults.fail_next`: ``code`` is a name or a
        numeric class, ``methods`` limits it to those methods.
        """
        args: dict[str, Any] = {"count": count, "code": code}
        if message is not None:
            args["message"] = message
        if methods is not None:
            args["methods"] = [methods] if isinstance(methods, str) else list(methods)
        if retry_after_ms is not None:
            args["retry_after_ms"] = retry_after_ms
        return await self.call("control.fail_next", args)

    async def drop_after_commit(
        self, count: int, methods: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Lose the reply of the next ``count`` writes that commit: the node closes
        their connection instead of answering (see :meth:`Faults.drop_after_commit`).

        ``methods`` defaults to ``execute`` and ``batch``; ``count=0`` clears it.
        """
        args: dict[str, Any] = {"count": count}
        if methods is not None:
            args["methods"] = [methods] if isinstance(methods, str) else list(methods)
        return await self.call("control.drop_after_commit", args)

    async def add_latency(self, method: str, seconds: float) -> dict[str, Any]:
        """Delay ``method`` (``"*"``: all data methods) by ``seconds``; 0 clears it."""
        return await self.call(
            "control.add_latency", {"method": method, "ms": round(seconds * 1000)}
        )

    async def stop_pings(self, enabled: bool = True) -> dict[str, Any]:
        """Stop (or resume) answering PING frames and the ``ping`` method."""
        return await self.call("control.stop_pings", {"enabled": enabled})

    async def drop_connections(self) -> int:
        """Abruptly close every other connection to the node; return how many."""
        result = await self.call("control.drop_connections")
        return result["dropped"]

    async def refuse_connections(self, enabled: bool = True) -> dict[str, Any]:
        """Stop listening (connects are refused) or listen again on the same port.

        This control connection stays open meanwhile, so keep using the same
        object to re-enable.
        """
        return await self.call("control.refuse_connections", {"enabled": enabled})

    async def stats(self) -> dict[str, Any]:
        """The node's statistics (see ``QdbNode.statistics``)."""
        return await self.call("control.stats")

    async def reset(self) -> dict[str, Any]:
        """Clear every fault and zero the counters."""
        return await self.call("control.reset")

    async def shutdown(self, grace: float = 5.0) -> None:
        """Ask the node to shut down gracefully (GOAWAY, in-flight get ``grace`` seconds)."""
        await self.call("control.shutdown", {"grace_ms": round(grace * 1000)})
        await self._discard()


@asynccontextmanager
async def open_node_control(
    address: str,
    *,
    call_timeout: float | None = 10.0,
    credentials: Mapping[str, str] | None = None,
    connect: bool = True,
    tls: ssl.SSLContext | None = None,
    tls_server_hostname: str | None = None,
    control_token: str | None = None,
) -> AsyncIterator[NodeControl]:
    """A :class:`NodeControl` for ``address``, closed when the block exits.

    With ``connect`` (the default) the connection is opened up front, so an
    unreachable node fails here with ConnectError. ``tls``,
    ``tls_server_hostname`` and ``control_token`` as for :class:`NodeControl`.
    """
    control = NodeControl(
        address,
        call_timeout=call_timeout,
        credentials=credentials,
        tls=tls,
        tls_server_hostname=tls_server_hostname,
        control_token=control_token,
    )
    try:
        if connect:
            try:
                limit = call_timeout if call_timeout is not None else float("inf")
                with trio.fail_after(limit):
                    await control._connect()
            except trio.TooSlowError:
                await control.aclose()
                raise ConnectTimeout(
                    f"connecting to {address} took longer than {call_timeout} s", node=address
                ) from None
        yield control
    finally:
        await control.aclose()


#: Pause between two attempts on one node.
RETRY_INTERVAL = 0.05


async def wait_for_nodes(
    addresses: Sequence[str],
    *,
    last_errors: dict[str, QdbError] | None = None,
    **control_options: Any,
) -> None:
    """Return once every node at ``addresses`` has answered ``ping``.

    Retries forever: bound it with ``trio.fail_after``. ``last_errors``, if
    given, receives each still-failing node's latest error (and loses the
    entry once the node answers). ``control_options`` are keyword arguments
    of :func:`open_node_control` (``tls=``, ``credentials=``, ...).
    """
    errors = {} if last_errors is None else last_errors

    async def wait_one(address: str) -> None:
        while True:
            try:
                async with open_node_control(
                    address, **{"call_timeout": 2.0, **control_options}
                ) as ctl:
                    await ctl.ping()
            except QdbError as exc:
                errors[address] = exc
            else:
                errors.pop(address, None)
                return
            await trio.sleep(RETRY_INTERVAL)

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(wait_one, address)
