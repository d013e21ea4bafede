"""The JSON-lines control protocol of the fault proxy, and its client :class:`ProxyControl`.

TCP, one JSON object per line (UTF-8, at most :data:`MAX_LINE` bytes) each
way, one reply per request, in order (the requests are listed in
:mod:`qdb_client.testing.proxy_cli`, which serves them). :class:`Lines`
reads such lines, refusing longer ones (:class:`LineTooLong`), and
:func:`send_message` writes one.

:class:`ProxyControl` makes one request at a time on one connection and
pairs each reply with its request by order. So a call that fails or is
cancelled once its request may have gone out closes the connection: the
late reply would otherwise be read as the next call's. The next call
reconnects.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import ConnectError, ConnectionLost, ConnectTimeout, QdbError, RequestTimeout
from .proxy import split_address

__all__ = [
    "MAX_LINE",
    "LineTooLong",
    "Lines",
    "ProxyControl",
    "ProxyControlError",
    "open_proxy_control",
    "send_message",
]

#: Longest request or reply line, in bytes.
MAX_LINE = 65536
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class ProxyControlError(QdbError):
    """The proxy's control port refused a request (the message says why)."""


class LineTooLong(Exception):
    """A line over :data:`MAX_LINE` bytes arrived (the stream is no longer usable)."""


class Lines:
    """Newline-delimited reading from a stream, each line bounded by :data:`MAX_LINE`."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> bytes | None:
        """The next line without its newline; None at EOF. LineTooLong past :data:`MAX_LINE`."""
        while True:
            end = self._buffer.find(b"\n")
            if end > MAX_LINE or (end < 0 and len(self._buffer) > MAX_LINE):
                raise LineTooLong
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            data = await self._stream.receive_some(MAX_LINE)
            if not data:
                return None
            self._buffer += data


async def send_message(stream: trio.abc.SendStream, message: Mapping[str, Any]) -> None:
    """Write ``message`` as one JSON line (values JSON can't hold are written as text)."""
    line = json.dumps(message, separators=(",", ":"), default=str)
    await stream.send_all(line.encode() + b"\n")


# ------------------------------------------------------------------ the client


class ProxyControl:
    """A client of a proxy control port: one connection, one request at a time.

    Reconnects on the next call if the connection was lost. Failures are
    :class:`ProxyControlError` (a refused request), ``ConnectError``,
    ``ConnectionLost`` and ``RequestTimeout`` (past ``call_timeout``).
    """

    def __init__(self, address: str, *, call_timeout: float | None = 10.0) -> None:
        self._host, self._port = split_address(address)
        #: ``host:port`` of the control port.
        self.address = address
        #: Seconds each call may take, connecting included (None: unbounded).
        self.call_timeout = call_timeout
        self._stream: trio.SocketStream | None = None
        self._lines: Lines | None = None
        self._lock = trio.Lock()

    async def call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request; return the reply (``ok`` true) or raise ProxyControlError."""
        async with self._lock:
            limit = self.call_timeout if self.call_timeout is not None else float("inf")
            try:
                with trio.fail_after(limit):
                    reply = await self._call(request)
            except trio.TooSlowError:
                await self.aclose()
                raise RequestTimeout(
                    f"proxy control {self.address} took longer than {self.call_timeout} s",
                    timeout=limit,
                ) from None
        if not reply.get("ok"):
            raise ProxyControlError(str(reply.get("error", reply)))
        return reply

    async def _call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        if self._stream is None:
            await self.connect()
        assert self._stream is not None and self._lines is not None
        try:
            await send_message(self._stream, request)
            line = await self._lines.next()
        except (*_TRANSPORT_ERRORS, LineTooLong) as exc:
            await self._discard()
            raise ConnectionLost(
                f"lost the proxy control connection {self.address}: {exc!r}", node=self.address
            ) from exc
        except BaseException:
            # Cancelled (the caller gave up, or call_timeout) once the request may have
            # gone out: its reply would be taken for the next call's. Start afresh.
            await self._discard()
            raise
        if line is None:
            await self.aclose()
            raise ConnectionLost(f"proxy control {self.address} closed the connection")
        try:
            reply = json.loads(line)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            await self.aclose()
            raise ProxyControlError(f"proxy control {self.address} answered {line[:200]!r}")
        return reply

    async def connect(self) -> None:
        """Open the connection now (calls do it on demand)."""
        try:
            self._stream = await trio.open_tcp_stream(self._host, self._port)
        except OSError as exc:
            raise ConnectError(
                f"cannot connect to proxy control {self.address}: {exc}", node=self.address
            ) from exc
        self._lines = Lines(self._stream)

    async def aclose(self) -> None:
        """Close the connection (the object reconnects on demand)."""
        stream, self._stream, self._lines = self._stream, None, None
        if stream is not None:
            await trio.aclose_forcefully(stream)

    async def _discard(self) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    async def add_toxic(
        self,
        kind: str,
        *,
        proxy: str | None = None,
        direction: str = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
        **attributes: Any,
    ) -> str:
        """Add a toxic to ``proxy`` (its listen or upstream address); return its id."""
        request: dict[str, Any] = {"op": "add", "kind": kind, "direction": direction}
        request.update(toxicity=toxicity, attributes=attributes)
        if proxy is not None:
            request["proxy"] = proxy
        if name is not None:
            request["name"] = name
        return (await self.call(request))["id"]

    async def remove_toxic(self, toxic_id: str, *, proxy: str | None = None) -> None:
        """Remove the toxic ``toxic_id`` (ProxyControlError if there is none)."""
        await self.call(_maybe_proxy({"op": "remove", "id": toxic_id}, proxy))

    async def clear(self, proxy: str | None = None) -> int:
        """Remove every toxic of ``proxy`` (None: of every proxy); return how many."""
        return (await self.call(_maybe_proxy({"op": "clear"}, proxy)))["removed"]

    async def list_toxics(self, proxy: str | None = None) -> dict[str, Any]:
        """``{proxy address: {"upstream": ..., "toxics": [toxic dicts]}}``."""
        return (await self.call(_maybe_proxy({"op": "list"}, proxy)))["proxies"]

    async def stats(self, proxy: str | None = None) -> dict[str, Any]:
        """``{proxy address: statistics dict}`` (see ``FaultProxy.statistics``)."""
        return (await self.call(_maybe_proxy({"op": "stats"}, proxy)))["stats"]


def _maybe_proxy(request: dict[str, Any], proxy: str | None) -> dict[str, Any]:
    return request if proxy is None else {**request, "proxy": proxy}


@asynccontextmanager
async def open_proxy_control(
    address: str, *, call_timeout: float | None = 10.0
) -> AsyncIterator[ProxyControl]:
    """A connected :class:`ProxyControl`, closed when the block exits.

    ConnectError if the port can't be reached, ConnectTimeout past ``call_timeout``.
    """
    control = ProxyControl(address, call_timeout=call_timeout)
    try:
        with trio.move_on_after(call_timeout if call_timeout is not None else math.inf) as scope:
            await control.connect()
        if scope.cancelled_caught:
            raise ConnectTimeout(
                f"connecting to proxy control {address} took too long", node=address
            )
        yield control
    finally:
        await control.aclose()
