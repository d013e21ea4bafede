"""How a test node takes connections in: its listening socket, the accept loop,
the TLS handshake, and turning a connection away at the door.

:class:`~.server.QdbNode` (``server.py``) decides what a connection may have
(``_admit``: the per-address and pending-handshake limits) and serves the
ones it keeps (``_serve``); this mixin owns the socket side before that: it
opens, closes and reopens the listener (``refuse_connections`` closes it),
accepts without ever letting an accept error stop the node, runs the TLS
handshake, and sends a refused connection its ERROR. :class:`Admission` is
the places one accepted connection holds until it is over. All state is
``QdbNode``'s, set in its ``__init__``; this mixin only declares what it uses.
"""

from __future__ import annotations

import errno
import logging
import socket as stdlib_socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from ..protocol import ErrorCode, ProtocolConnection, Role, error_message
from . import control_token
from .config import ServerConfig, format_address
from .session import COURTESY_SECONDS, close_stream
from .stats import NodeStatistics
from .tls import accept_tls

if TYPE_CHECKING:
    from .server import QdbNode

__all__ = ["Admission", "NodeListener"]

logger = logging.getLogger("qdb_client.testing")


_BACKLOG = 128
#: accept() errors that mean "out of resources, try again shortly".
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def _is_resource_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS


class Admission:
    """One accepted connection's places: a pending handshake, one of its address's.

    Released once each (:meth:`handshake_done` when the WELCOME went out,
    :meth:`release` when the connection is over). ``scope`` wraps the
    connection's serving, so a connection still in its handshake can be
    evicted to make room for a newer one.
    """

    __slots__ = ("_handshaking", "_node", "host", "scope")

    def __init__(self, node: QdbNode, host: str) -> None:
        self._node = node
        self.host = host
        self._handshaking = True
        self.scope = trio.CancelScope()
        node._handshaking[self] = None
        node._per_address[host] += 1

    def handshake_done(self) -> None:
        if self._handshaking:
            self._handshaking = False
            del self._node._handshaking[self]

    def evict(self) -> None:
        """Close this connection, which has not finished its handshake."""
        self.handshake_done()
        self.scope.cancel()

    def release(self) -> None:
        self.handshake_done()
        node, host = self._node, self.host
        node._per_address[host] -= 1
        if node._per_address[host] <= 0:
            del node._per_address[host]


class NodeListener:
    """The listening socket and the accept path of :class:`~.server.QdbNode` (its
    state is set there)."""

    config: ServerConfig
    stats: NodeStatistics
    control_token: str
    _tls_context: ssl.SSLContext | None
    _registered: str | None
    _port: int
    _listen_sock: trio.socket.SocketType | None
    _listen_changed: trio.Event
    _serving: bool
    _shutdown_started: bool
    #: Places for a new connection, or why it is turned away (``QdbNode._admit``).
    _admit: Callable[[str, str], Admission | tuple[ErrorCode, str]]
    #: Serve an admitted connection until it closes (``QdbNode._serve``).
    _serve: Callable[[trio.abc.Stream, str, float, Admission], Awaitable[None]]

    if TYPE_CHECKING:  # read-only properties of QdbNode

        @property
        def address(self) -> str: ...

        @property
        def node_id(self) -> str: ...

    # ----------------------------------------------------------- listening

    def _open_listener(self) -> None:
        host = self.config.host
        family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
        sock = stdlib_socket.socket(family, stdlib_socket.SOCK_STREAM)
        try:
            sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
            sock.bind((host, self._port))
            sock.listen(_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._listen_sock = trio.socket.from_stdlib_socket(sock)
        if self.config.test_mode and self._registered is None:
            self._registered = self.address
            control_token.register(self.address, self.control_token)
        self._signal_listening_changed()
        logger.info("%s: listening on %s", self.node_id, self.address)

    def _close_listener(self) -> None:
        sock, self._listen_sock = self._listen_sock, None
        if sock is not None:
            sock.close()
            self._signal_listening_changed()
            logger.info("%s: stopped listening on %s", self.node_id, self.address)

    def _signal_listening_changed(self) -> None:
        self._listen_changed.set()
        self._listen_changed = trio.Event()

    def _set_refusing(self, refusing: bool) -> None:
        if refusing:
            self._close_listener()
        elif self._serving and not self._shutdown_started and self._listen_sock is None:
            self._open_listener()

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        while True:
            sock = self._listen_sock
            if sock is None:
                await self._listen_changed.wait()
                continue
            try:
                client, _ = await sock.accept()
            except (trio.ClosedResourceError, OSError) as exc:
                if sock is not self._listen_sock:
                    continue  # closed on purpose (refuse_connections, shutdown)
                # Aborted handshakes, resets, fd exhaustion: never let them stop the node.
                level = logging.WARNING if _is_resource_error(exc) else logging.DEBUG
                logger.log(level, "%s: accept failed: %r", self.node_id, exc)
                await trio.sleep(0.05 if _is_resource_error(exc) else 0.01)
                continue
            nursery.start_soon(self._serve_socket, client)

    async def _serve_socket(self, sock: trio.socket.SocketType) -> None:
        try:
            host, port = sock.getpeername()[:2]
            peer = format_address(host, port)
        except OSError:
            host = peer = "unknown peer"
        deadline = trio.current_time() + self.config.handshake_timeout
        raw = trio.SocketStream(sock)
        admission = self._admit(host, peer)
        if not isinstance(admission, Admission):
            if self._tls_context is None:
                await self._turn_away(raw, *admission)
            else:  # no TLS handshake for a connection that can't stay: just close
                await trio.aclose_forcefully(raw)
            return
        try:
            with admission.scope:
                if self._tls_context is None:
                    await self._serve(raw, peer, deadline, admission)
                    return
                stream = await accept_tls(
                    sock,
                    self._tls_context,
                    within=min(self.config.tls_handshake_timeout, self.config.handshake_timeout),
                    peer=peer,
                    timed_out=self._count_handshake_timeout,
                )
                if stream is not None:
                    await self._serve(stream, peer, deadline, admission)
        finally:
            if admission.scope.cancelled_caught:
                await trio.aclose_forcefully(raw)
            admission.release()

    def _count_handshake_timeout(self) -> None:
        self.stats.handshake_timeouts += 1

    async def _turn_away(self, stream: trio.abc.Stream, code: ErrorCode, text: str) -> None:
        data = ProtocolConnection(Role.SERVER).send(error_message(0, code, text))
        with trio.move_on_after(COURTESY_SECONDS):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await close_stream(stream, linger=True)
