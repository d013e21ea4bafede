"""The test node: a trio TCP server speaking protocol v1 over SQLite.

::

    async with open_node(ServerConfig(test_mode=True)) as node:
        print(node.address)          # "127.0.0.1:41234"
        node.faults.fail_next(1, code=503)

or, with an explicit nursery, ``node = QdbNode(config)`` then
``await nursery.start(node.serve)``. Unit tests can skip TCP entirely and run
``await node.serve_connection(stream)`` over ``trio.testing.memory_stream_pair()``
(all time comes from ``trio.current_time()``, so a ``MockClock`` drives it).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..protocol import Error, ErrorCode, Hello, Member
from . import control_token, sessions
from ._nursery import owned_nursery
from .config import ServerConfig, format_address, parse_address, peer_node_id
from .faults import Faults
from .handshake import HelloAnswer, answer_hello
from .listener import Admission, NodeListener
from .session import ServerConnection
from .stats import NodeStatistics
from .storage import Storage
from .tls import server_context
from .transactions import NodeTransactions

__all__ = ["QdbNode", "open_node"]

logger = logging.getLogger("qdb_client.testing")

#: Seconds ``open_node`` waits for its node to close when the block exits.
_EXIT_TIMEOUT = 5.0


class QdbNode(NodeListener):
    """One test node: listener, client connections, storage, faults and counters.

    Build it from a :class:`ServerConfig` (or keyword overrides of one).
    ``serve`` binds and runs it; ``shutdown`` stops it gracefully; cancelling
    ``serve`` kills it (connections are closed without GOAWAY).
    """

    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = ServerConfig(**overrides)
        elif overrides:
            config = config.evolve(**overrides)
        #: The node's configuration.
        self.config = config
        #: Traffic counters (see :meth:`statistics`).
        self.stats = NodeStatistics()
        #: Fault injection controls, all synchronous.
        self.faults = Faults(
            refuse=self._set_refusing,
            drop=self.drop_connections,
            stats=self.statistics,
            reset_counters=self.stats.reset,
        )
        #: SQLite storage shared with every node using the same database file.
        self.storage = Storage(
            config.database,
            pool_size=config.sqlite_pool_size,
            idempotency_ttl=config.idempotency_ttl,
            foreign_keys=config.foreign_keys,
            max_value_size=config.max_result_size,
        )
        #: ``begin`` transactions of every session: their limit, ids and count.
        self.transactions = NodeTransactions(config.max_transactions, self.stats)
        #: Server-issued sessions (a node with credentials), in the same database.
        self.sessions = sessions.SessionStore(self.storage)
        #: What the handshakes did: logins by password or token, refusals, sessions.
        self.auth_stats = sessions.AuthCounters()
        #: The TLS context (None: plain TCP); a bad certificate is a ConfigError here.
        self._tls_context = server_context(config)
        #: The secret a HELLO's ``auth`` must carry to be the control tool (test mode):
        #: fresh for every node (see :mod:`.control_token`). Never logged.
        self.control_token = control_token.new_token()
        #: Connections in their handshake, oldest first (evicted first at the cap).
        self._handshaking: dict[Admission, None] = {}
        self._per_address: Counter[str] = Counter()
        self._registered: str | None = None
        self._port = config.port
        self._listen_sock: trio.socket.SocketType | None = None
        self._listen_changed = trio.Event()
        self._connections: set[ServerConnection] = set()
        self._nursery: trio.Nursery | None = None
        self._serving = False
        self._shutdown_started = False
        self._stopped = trio.Event()

    # ------------------------------------------------------------ identity

    @property
    def port(self) -> int:
        """The bound port (the configured one until ``serve`` has bound it)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` clients connect to, e.g. ``"127.0.0.1:41234"``."""
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return format_address(host, self._port)

    @property
    def node_id(self) -> str:
        """The configured node id, else ``node-<port>``."""
        return self.config.node_id or f"node-{self._port}"

    def members(self) -> tuple[Member, ...]:
        """The cluster as announced in WELCOME: this node first, then its peers."""
        members = [Member(self.node_id, self.address)]
        seen = {self.address}
        for peer in (*self.config.peers, *self._peers_from_file()):
            if peer not in seen:
                seen.add(peer)
                members.append(Member(peer_node_id(peer), peer))
        return tuple(members)

    def _peers_from_file(self) -> list[str]:
        path = self.config.peers_file
        if path is None:
            return []
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except OSError as exc:
            logger.debug("%s: cannot read peers file %s: %s", self.node_id, path, exc)
            return []
        peers = []
        for line in lines:
            if line and not line.startswith("#"):
                try:
                    parse_address(line)
                except ValueError:
                    logger.warning("%s: ignoring bad peer %r in %s", self.node_id, line, path)
                else:
                    peers.append(line)
        return peers

    # ---------------------------------------------------------- statistics

    def statistics(self) -> dict[str, Any]:
        """Counters and gauges as a plain dict (see :class:`NodeStatistics`).

        Adds ``node_id``, ``in_flight`` (requests being processed),
        ``faults`` (the active faults), ``tls`` (whether the node speaks TLS)
        and ``auth`` (what its handshakes did: ``password_hellos``,
        ``password_refused``, ``token_hellos``, ``token_refused``,
        ``sessions_created``, ``sessions_resumed``, ``tokens_issued``,
        ``store_errors``) to the counters, and ``transactions_open`` (``begin``
        transactions open now).
        """
        clients = [c for c in self._connections if not c.is_control_client]
        return self.stats.snapshot(
            connections_open=len(clients),
            node_id=self.node_id,
            in_flight=sum(c.in_flight for c in clients),
            transactions_open=self.transactions.open,
            faults=self.faults.describe(),
            tls=self.config.tls,
            auth=self.auth_stats.snapshot(),
            pending_handshakes=len(self._handshaking),
            queued_reply_bytes=sum(c.queued_reply_bytes for c in clients),
        )

    async def answer_hello(self, hello: Hello) -> HelloAnswer:
        """The node's answer to a HELLO (the connection calls it; docs/protocol.md 7)."""
        if self.config.credentials is None:
            await trio.lowlevel.checkpoint()
            answer = answer_hello(
                hello,
                self.config,
                node_id=self.node_id,
                members=self.members,
                control_token=self.control_token,
            )
        else:
            answer = await sessions.answer(
                hello,
                self.config,
                self.sessions,
                self.auth_stats,
                node_id=self.node_id,
                members=self.members,
                control_token=self.control_token,
            )
        reply = answer.reply
        if isinstance(reply, Error) and reply.details.get("reason") == "control_token":
            self.stats.control_refused += 1
            logger.warning("%s: HELLO with a wrong control token", self.node_id)
        return answer

    def mark_control_client(self, conn: ServerConnection) -> None:
        """``conn`` proved to be the control tool (its HELLO carried the control token):
        stop counting it."""
        if not conn.is_control_client:
            conn.is_control_client = True
            self.stats.connections_accepted -= 1

    def count_connections(self, *, exclude: ServerConnection | None = None) -> int:
        """Open connections, not counting ``exclude``."""
        return sum(1 for c in self._connections if c is not exclude)

    def drop_connections(self, *, keep: ServerConnection | None = None) -> int:
        """Abruptly close every connection except ``keep``; return how many were closed."""
        dropped = [c for c in self._connections if c is not keep]
        for conn in dropped:
            conn.abort()
        logger.info("%s: dropped %d connections", self.node_id, len(dropped))
        return len(dropped)

    # ----------------------------------------------------------- admission

    def _admit(self, host: str, peer: str) -> Admission | tuple[ErrorCode, str]:
        """Places for a new connection from ``host``, or why it is turned away.

        At ``max_pending_handshakes`` the oldest connection still in its
        handshake is closed to make room: sockets that never send HELLO can
        delay a real client by no more than its own handshake, where refusing
        newcomers would let them keep every client out until they time out.
        """
        config = self.config
        if self._shutdown_started:
            return ErrorCode.SHUTTING_DOWN, "the node is shutting down"
        per_address = config.max_connections_per_address
        if per_address is not None and self._per_address[host] >= per_address:
            self.stats.address_limit_refused += 1
            self.stats.errors_sent[ErrorCode.CAPACITY_EXCEEDED.value] += 1
            logger.warning("%s: refusing %s: connection limit per address", self.node_id, peer)
            return (
                ErrorCode.CAPACITY_EXCEEDED,
                f"{per_address} connections from this address are open, the maximum",
            )
        if len(self._handshaking) >= config.max_pending_handshakes:
            oldest = next(iter(self._handshaking))
            self.stats.handshakes_evicted += 1
            logger.warning(
                "%s: closing a connection from %s that has not finished its handshake,"
                " to make room for %s (max_pending_handshakes)",
                self.node_id,
                oldest.host,
                peer,
            )
            oldest.evict()
        return Admission(self, host)

    # --------------------------------------------------------------- serving

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Open storage, bind, then serve until :meth:`shutdown` finishes.

        Use with ``await nursery.start(node.serve)``: it returns (to the
        starter) once the node accepts connections, with the node as value.
        Cancelling it closes everything abruptly, like a killed process.
        """
        if self._serving:
            raise RuntimeError("this node is already serving")
        self._serving = True
        try:
            await self.storage.open()
            self._open_listener()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_loop, nursery)
                task_status.started(self)
                await self._stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._close_listener()
            if self._registered is not None:
                control_token.unregister(self._registered, self.control_token)
                self._registered = None
            self.sessions.close()
            self.storage.close()
            self._stopped.set()

    async def serve_connection(self, stream: trio.abc.Stream, *, peer: str = "memory") -> None:
        """Serve one already-connected stream until it closes.

        Applies the limits an accepted TCP connection meets (``max_connections``,
        ``max_pending_handshakes``, ``max_connections_per_address`` with
        ``peer`` as the address, ``handshake_timeout``). Never raises for
        anything the client does.
        """
        deadline = trio.current_time() + self.config.handshake_timeout
        admission = self._admit(peer, peer)
        if not isinstance(admission, Admission):
            await self._turn_away(stream, *admission)
            return
        try:
            with admission.scope:
                await self._serve(stream, peer, deadline, admission)
        finally:
            if admission.scope.cancelled_caught:
                await trio.aclose_forcefully(stream)
            admission.release()

    async def _serve(
        self, stream: trio.abc.Stream, peer: str, deadline: float, admission: Admission
    ) -> None:
        if self._shutdown_started:
            await self._turn_away(stream, ErrorCode.SHUTTING_DOWN, "the node is shutting down")
            return
        if len(self._connections) >= self.config.max_connections:
            self.stats.connections_refused += 1
            self.stats.errors_sent[ErrorCode.CAPACITY_EXCEEDED.value] += 1
            logger.warning("%s: refusing %s: connection limit reached", self.node_id, peer)
            await self._turn_away(
                stream,
                ErrorCode.CAPACITY_EXCEEDED,
                f"{len(self._connections)} connections open, the maximum for this node",
            )
            return
        conn = ServerConnection(
            self,
            stream,
            peer,
            handshake_deadline=deadline,
            on_handshake=admission.handshake_done,
        )
        self._connections.add(conn)
        self.stats.connections_accepted += 1
        logger.debug("%s: connection from %s", self.node_id, peer)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    # -------------------------------------------------------------- shutdown

    async def shutdown(self, grace: float = 5.0) -> None:
        """Stop gracefully: stop listening, GOAWAY ``shutdown`` to every connection,
        let in-flight requests finish for up to ``grace`` seconds, then close.

        Returns when every connection is closed (and ``serve`` returns).
        Calling it again just waits for the first call to finish.
        """
        if self._shutdown_started:
            await self._stopped.wait()
            return
        self._shutdown_started = True
        logger.info("%s: shutting down (grace %.3g s)", self.node_id, grace)
        self._close_listener()
        deadline = trio.current_time() + max(grace, 0.0)
        text = f"node {self.node_id} is shutting down"
        try:
            async with trio.open_nursery() as nursery:
                for conn in list(self._connections):
                    nursery.start_soon(conn.drain, "shutdown", text, deadline)
        finally:
            self._stopped.set()

    async def aclose(self) -> None:
        """Shut down without grace and release the storage.

        For nodes used only through :meth:`serve_connection` (``serve`` does
        this itself when it ends).
        """
        await self.shutdown(grace=0.0)
        self.sessions.close()
        self.storage.close()

    def start_shutdown(self, grace: float) -> None:
        """Begin :meth:`shutdown` in the background (used by ``control.shutdown``)."""
        if self._nursery is not None:
            self._nursery.start_soon(self.shutdown, grace)
        else:  # serving only memory streams: no nursery of our own
            trio.lowlevel.spawn_system_task(self._guarded_shutdown, grace)

    async def _guarded_shutdown(self, grace: float) -> None:
        try:
            await self.shutdown(grace)
        except Exception:  # a system task must never raise
            logger.exception("%s: shutdown failed", self.node_id)

    @property
    def stopped(self) -> bool:
        """Whether the node has stopped (shutdown completed, or ``serve`` ended)."""
        return self._stopped.is_set()

    async def wait_stopped(self) -> None:
        """Wait until the node has stopped."""
        await self._stopped.wait()


@asynccontextmanager
async def open_node(config: ServerConfig | None = None, **overrides: Any) -> AsyncIterator[QdbNode]:
    """Run a node for the duration of the block; shut it down (no grace) on exit.

    ``overrides`` are :class:`ServerConfig` fields, e.g.
    ``open_node(test_mode=True, client_idle_timeout=0.5)``.
    """
    node = QdbNode(config, **overrides)
    async with owned_nursery() as nursery:
        await nursery.start(node.serve)
        try:
            yield node
        finally:
            with trio.move_on_after(_EXIT_TIMEOUT, shield=True):
                await node.shutdown(grace=0.0)
