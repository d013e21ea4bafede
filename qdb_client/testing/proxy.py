"""A network fault proxy in front of a test node, in the manner of Toxiproxy.

::

    async with open_fault_proxy(upstream=node.address) as proxy:
        async with qdb_client.open_client(proxy.address) as client:
            slow = proxy.add_toxic("latency", latency=100)       # node -> client, +100 ms
            proxy.add_toxic("limit_data", direction="upstream", bytes=10)
            ...
            slow.remove()

Each accepted connection gets its own upstream connection and one
:func:`~qdb_client.testing.pumps.pump` per direction, applying the toxics
(:mod:`qdb_client.testing.toxics`) chunk by chunk; the pump works over any
trio stream pair in virtual time. :class:`ToxicHandle` is what ``add_toxic``
returns. Socket errors never escape; leaving the block closes the listener
and every connection.
"""

from __future__ import annotations

import functools
import logging
import random
import socket as stdlib_socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import ConfigError
from ._nursery import owned_nursery
from .config import format_address, parse_address
from .pumps import READ_AHEAD_BYTES, READ_AHEAD_CHUNKS, RECEIVE_SIZE, ConnectionToxics, pump
from .toxics import PumpEnd, Toxic, ToxicSet

__all__ = [
    "READ_AHEAD_BYTES",
    "READ_AHEAD_CHUNKS",
    "RECEIVE_SIZE",
    "STATISTICS_KEYS",
    "ConnectionToxics",
    "FaultProxy",
    "ToxicHandle",
    "bind_listener",
    "open_fault_proxy",
    "pump",
    "split_address",
]

logger = logging.getLogger("qdb_client.testing")

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_BACKLOG = 128


def split_address(address: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) -> ``(host, port)``; ConfigError if malformed.

    ``allow_port_zero`` admits port 0 (bind any free port) for listen addresses.
    """
    if allow_port_zero and isinstance(address, str) and address.endswith(":0"):
        try:
            return parse_address(address[:-1] + "1")[0], 0
        except ConfigError:
            raise ConfigError(f"address {address!r} is not of the form 'host:port'") from None
    return parse_address(address)


#: The counters of :meth:`FaultProxy.statistics`.
STATISTICS_KEYS = (
    "connections_accepted",  # client connections accepted
    "connections_open",  # open now
    "connections_closed",  # closed, for any reason
    "connections_refused",  # closed at once by a ``down`` toxic (mode refuse)
    "connections_blackholed",  # accepted into a ``down`` black hole
    "connections_reset",  # reset by ``reset_peer``
    "upstream_connect_failures",  # the node could not be reached: client side closed
    "bytes_upstream",  # bytes delivered client -> node
    "bytes_downstream",  # bytes delivered node -> client
)


# --------------------------------------------------------------------- handle


class ToxicHandle:
    """One toxic added to a proxy (``FaultProxy.add_toxic``); ``remove()`` takes it away.

    ``id``, ``kind``, ``direction``, ``toxicity`` and ``attributes`` are those of
    :attr:`toxic`, the validated :class:`Toxic`.
    """

    def __init__(self, toxics: ToxicSet, toxic: Toxic) -> None:
        self._toxics = toxics
        #: The validated :class:`Toxic`.
        self.toxic = toxic
        #: The toxic's name on its proxy, e.g. ``"latency-1"``.
        self.id = toxic.id
        #: The toxic kind, e.g. ``"latency"``.
        self.kind = toxic.kind
        #: ``"upstream"``, ``"downstream"`` or ``"both"``.
        self.direction = toxic.direction
        #: Probability that it applies to a given connection.
        self.toxicity = toxic.toxicity
        #: The kind's attributes, defaults included (a copy).
        self.attributes = dict(toxic.attributes)

    @property
    def active(self) -> bool:
        """Whether the toxic is still on the proxy."""
        return self.toxic in self._toxics

    def remove(self) -> bool:
        """Remove it (from open connections' next chunk on); False if already gone."""
        return self._toxics.remove(self.toxic)

    def describe(self) -> dict[str, Any]:
        """A plain dict: ``id``, ``kind``, ``direction``, ``toxicity``, ``attributes``."""
        return self.toxic.describe()

    def __repr__(self) -> str:
        return f"<ToxicHandle {self.id} {self.direction} {self.attributes}>"


# ---------------------------------------------------------------------- proxy


class FaultProxy:
    """A TCP proxy from ``listen`` to ``upstream`` whose traffic toxics degrade.

    Run it with ``await nursery.start(proxy.serve)`` or use
    :func:`open_fault_proxy`. ``seed`` makes toxicity, jitter and slice sizes
    reproducible. ``connect_timeout`` bounds each upstream connect.
    """

    def __init__(
        self,
        upstream: str,
        listen: str = "127.0.0.1:0",
        *,
        seed: int | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self._upstream = split_address(upstream)
        self._host, self._port = split_address(listen, allow_port_zero=True)
        if isinstance(connect_timeout, bool) or not (
            isinstance(connect_timeout, (int, float)) and connect_timeout > 0
        ):
            raise ConfigError(f"connect_timeout must be a positive number, not {connect_timeout!r}")
        self._connect_timeout = float(connect_timeout)
        self._rng = random.Random(seed)
        self._toxics = ToxicSet()
        self._serving = False
        self._counts = dict.fromkeys(STATISTICS_KEYS, 0)

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (the bound port once serving)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        return format_address(host, self._port)

    @property
    def upstream(self) -> str:
        """``host:port`` of the node behind the proxy."""
        return format_address(*self._upstream)

    def add_toxic(
        self,
        kind: str,
        *,
        direction: str = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
        **attributes: Any,
    ) -> ToxicHandle:
        """Add a toxic (see :mod:`qdb_client.testing.toxics`), acting on open
        connections from their next chunk and on every new one. A bad kind,
        direction, toxicity or attribute is a ConfigError (a ValueError) and
        changes nothing.
        """
        toxic = self._toxics.add(
            kind, direction=direction, toxicity=toxicity, name=name, **attributes
        )
        logger.info("proxy %s: added toxic %s", self.address, toxic.describe())
        return ToxicHandle(self._toxics, toxic)

    def remove_toxic(self, toxic: str | ToxicHandle) -> bool:
        """Remove a toxic by name or handle; False if there was none."""
        logger.info("proxy %s: removing toxic %s", self.address, getattr(toxic, "id", toxic))
        return self._toxics.remove(toxic.toxic if isinstance(toxic, ToxicHandle) else toxic)

    def clear(self) -> int:
        """Remove every toxic; return how many there were."""
        return self._toxics.clear()

    def toxics(self) -> list[ToxicHandle]:
        """Handles on the present toxics, in the order chunks pass them."""
        return [ToxicHandle(self._toxics, t) for t in self._toxics.toxics()]

    def statistics(self) -> dict[str, Any]:
        """A plain dict: ``address``, ``upstream``, the :data:`STATISTICS_KEYS`
        counters and ``toxics`` (``{name: {..., "connections", "skipped"}}``).
        """
        return {
            "address": self.address,
            "upstream": self.upstream,
            **self._counts,
            "toxics": self._toxics.statistics(),
        }

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind and proxy until cancelled, which closes the listener and every
        connection (``nursery.start`` returns once listening)."""
        if self._serving:
            raise RuntimeError("this proxy is already serving")
        self._serving = True
        listener = bind_listener(self._host, self._port)
        self._port = listener.socket.getsockname()[1]
        logger.info("proxy %s: forwarding to %s", self.address, self.upstream)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:  # fd exhaustion and the like: keep serving
                        logger.warning("proxy %s: accept failed: %r", self.address, exc)
                        await trio.sleep(0.05)
                        continue
                    nursery.start_soon(self._serve_client, stream)
        finally:
            listener.socket.close()
            self._serving = False
            logger.info("proxy %s: stopped", self.address)

    async def _serve_client(self, client: trio.SocketStream) -> None:
        counts = self._counts
        counts["connections_accepted"] += 1
        counts["connections_open"] += 1
        view = ConnectionToxics(self._toxics, self._rng)
        upstream: trio.SocketStream | None = None
        end: PumpEnd | None = None
        try:
            mode = view.down_mode()
            if mode == "refuse":
                counts["connections_refused"] += 1
                return
            if mode == "blackhole":
                counts["connections_blackholed"] += 1
                await _swallow(client)
                return
            try:
                with trio.fail_after(self._connect_timeout):
                    upstream = await trio.open_tcp_stream(*self._upstream)
            except (OSError, trio.TooSlowError) as exc:
                counts["upstream_connect_failures"] += 1
                logger.info("proxy %s: cannot connect to %s: %r", self.address, self.upstream, exc)
                return
            end = await self._pump_both(client, upstream, view)
        except Exception:  # a bug: never let it take the proxy down
            logger.exception("proxy %s: connection handler failed", self.address)
        finally:
            counts["connections_open"] -= 1
            counts["connections_closed"] += 1
            if end is PumpEnd.RESET:
                counts["connections_reset"] += 1
                _arm_reset(client)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(client)  # closes at once; the await is a checkpoint
                if upstream is not None:
                    await trio.aclose_forcefully(upstream)

    async def _pump_both(
        self, client: trio.SocketStream, upstream: trio.SocketStream, view: ConnectionToxics
    ) -> PumpEnd:
        """Run both directions; the first one to end other than by EOF ends both."""
        ends: list[PumpEnd] = []

        async def run(direction: str, source: trio.SocketStream, sink: trio.SocketStream) -> None:
            count = functools.partial(self._count, f"bytes_{direction}")
            end = await pump(source, sink, view, direction=direction, on_bytes=count)
            ends.append(end)
            if end is not PumpEnd.EOF:
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "upstream", client, upstream)
            nursery.start_soon(run, "downstream", upstream, client)
        return PumpEnd.RESET if PumpEnd.RESET in ends else ends[0] if ends else PumpEnd.CLOSED

    def _count(self, key: str, n: int) -> None:
        self._counts[key] += n


def bind_listener(host: str, port: int) -> trio.SocketListener:
    """A TCP listener on ``host:port`` (SO_REUSEADDR; port 0 picks a free one)."""
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    sock = stdlib_socket.socket(family, stdlib_socket.SOCK_STREAM)
    try:
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def _arm_reset(stream: trio.SocketStream) -> None:
    """Make the next close of ``stream`` send RST (SO_LINGER on, zero timeout)."""
    try:
        stream.setsockopt(
            stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
    except OSError:
        pass


async def _swallow(stream: trio.abc.ReceiveStream) -> None:
    """Read and discard until EOF or failure (a black hole)."""
    try:
        while await stream.receive_some(RECEIVE_SIZE):
            pass
    except _TRANSPORT_ERRORS:
        pass


@asynccontextmanager
async def open_fault_proxy(
    upstream: str,
    listen: str = "127.0.0.1:0",
    *,
    seed: int | None = None,
    connect_timeout: float = 5.0,
) -> AsyncIterator[FaultProxy]:
    """Run a :class:`FaultProxy` from ``listen`` to ``upstream`` for the block.

    ``proxy.address`` is where clients connect. Leaving the block closes the
    listener and every connection; an exception in the block comes out as itself.
    """
    proxy = FaultProxy(upstream, listen, seed=seed, connect_timeout=connect_timeout)
    async with owned_nursery() as nursery:
        await nursery.start(proxy.serve)
        yield proxy
