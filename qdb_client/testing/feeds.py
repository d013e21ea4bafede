"""Streams and subscriptions of a test node: what a connection and a node keep of them.

The requests answered by more than one frame (``query_stream``,
``resume_stream``, ``subscribe``: :data:`FEED_METHODS`) don't go through the
method table: the connection hands each to :meth:`ConnectionFeeds.serve`,
which runs a :class:`~.streams.ServedStream` or a
:class:`~.subscriptions.ServedSubscription` and writes every frame it sends.
The connection routes STREAM_CREDIT to :meth:`ConnectionFeeds.credit`, a
CANCEL it has no running request for to :meth:`ConnectionFeeds.cancel` (a
finished stream's spool is released, an established subscription ended),
and tells :meth:`ConnectionFeeds.drain` when it drains (every stream and
subscription ends with SHUTTING_DOWN, so its client resumes elsewhere).

:class:`NodeFeeds` (one per node, :func:`node_feeds`) holds what the
connections of a node share: retention times, the clock the spools and the
log use (wall clock: nodes may be separate processes; tests may replace
it), the wake-up of subscriptions when this node commits a write, the
counters, and a fault for tests: :meth:`NodeFeeds.fail_pages` ends the next
running streams with an error, as a node unable to go on would.
"""

from __future__ import annotations

import collections
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..protocol import ErrorCode, Message, Request, StreamCredit
from ._failure import RequestFailed
from .faults import resolve_error_code
from .ledger import Slot
from .spool import delete_spool, open_spool_connection, spool_path
from .streams import ServedStream, in_thread
from .subscriptions import FILTER_SECONDS, ServedSubscription

if TYPE_CHECKING:
    from .server import QdbNode
    from .session import ServerConnection

__all__ = ["FEED_METHODS", "ConnectionFeeds", "NodeFeeds", "node_feeds"]

logger = logging.getLogger("qdb_client.testing")

#: Methods served as streams or subscriptions rather than by the method table.
FEED_METHODS = frozenset({"query_stream", "resume_stream", "subscribe"})
#: Finished streams a connection remembers, so that a CANCEL releases the spool.
_FINISHED_KEPT = 64
_STATS = (
    "streams_opened",
    "streams_resumed",
    "stream_pages_sent",
    "stream_bytes_sent",
    "spools_released",
    "subscriptions",
    "events_sent",
)


class NodeFeeds:
    """What a node's streams and subscriptions share (see the module docstring)."""

    def __init__(self, node: QdbNode) -> None:
        self._node = weakref.ref(node)
        config = node.config
        #: Seconds a spool is kept after its last page or resume.
        self.stream_retention: float = getattr(config, "stream_retention", 300.0)
        #: Seconds a change is kept in the log.
        self.change_retention: float = getattr(config, "change_retention", 3600.0)
        #: Seconds of SQLite work a subscription's ``where`` filter may take on one row
        #: (at subscribe, on a row of NULLs, within the request's deadline too).
        self.filter_seconds: float = FILTER_SECONDS
        #: Wall-clock time (seconds) of spools and the change log.
        self.clock: Callable[[], float] = time.time
        #: Subscriptions of this node wait here; a local commit wakes them.
        self.commits = trio.lowlevel.ParkingLot()
        self.stats: collections.Counter[str] = collections.Counter(dict.fromkeys(_STATS, 0))
        self._page_failures: collections.deque[RequestFailed] = collections.deque()

    def committed(self) -> None:
        """A write committed through this node: subscriptions look at the log now."""
        self.commits.unpark_all()

    def fail_pages(
        self,
        count: int = 1,
        code: str | int | ErrorCode = ErrorCode.UNAVAILABLE,
        *,
        message: str = "the node can't go on with the stream now",
        retry_after_ms: int | None = None,
    ) -> None:
        """End the next ``count`` running streams with ERROR ``code`` (each at its
        next page), their spools kept: a node that can't go on, for now."""
        resolved = resolve_error_code(code)
        for _ in range(count):
            self._page_failures.append(
                RequestFailed(
                    resolved,
                    message,
                    details={"injected": True, "executed": False},
                    retry_after_ms=retry_after_ms,
                )
            )

    def take_page_failure(self) -> RequestFailed | None:
        """The next page failure to inject, if any."""
        return self._page_failures.popleft() if self._page_failures else None

    def statistics(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dict(self.stats)


_NODES: weakref.WeakKeyDictionary[Any, NodeFeeds] = weakref.WeakKeyDictionary()


def node_feeds(node: QdbNode) -> NodeFeeds:
    """The :class:`NodeFeeds` of ``node`` (made on first use)."""
    feeds = _NODES.get(node)
    if feeds is None:
        feeds = _NODES[node] = NodeFeeds(node)
    return feeds


class ConnectionFeeds:
    """The streams and subscriptions of one connection (see the module docstring)."""

    def __init__(self, connection: ServerConnection) -> None:
        self._connection = connection
        self._streams: dict[int, ServedStream] = {}
        self._subscriptions: dict[int, ServedSubscription] = {}
        self._finished: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    @property
    def node(self) -> NodeFeeds:
        return node_feeds(self._connection.node)

    # ------------------------------------------------------ what serving needs

    def node_id(self) -> str:
        return self._connection.node.node_id

    def scope(self) -> str:
        """The user the connection authenticated as ("" without credentials)."""
        return self._connection.user or ""

    def max_frame(self) -> int:
        """The largest frame the client accepts, at most the node's ``max_result_size``."""
        return self._connection.reply_limit

    def session_state(self) -> Any:
        """The connection's session state (its transactions), if the node keeps one."""
        return getattr(self._connection, "state", None)

    def database_path(self) -> str:
        """The cluster's database file."""
        path = self._connection.node.storage.path
        if path is None:
            raise RequestFailed(ErrorCode.UNAVAILABLE, "the node's storage is not open")
        return path

    def spool_path(self) -> str:
        """The cluster's spool file (.spool)."""
        return spool_path(self.database_path())

    def column_types(self, conn: Any, sql: str, count: int) -> tuple[Any, Any]:
        """Declared type names and value conversions of a result's columns (the
        storage's typed values; unknown types and no conversion without them)."""
        make = getattr(self._connection.node.storage, "control", None)
        if make is None:
            return [None] * count, None
        return make().column_types(conn, sql, count)

    async def send(self, frame: Message | bytes) -> bool:
        """Write a message or an encoded frame; False if the connection is gone."""
        return await self._connection.send_frame(frame)

    async def apply_faults(self, request: Request) -> None:
        """The node's faults for ``request`` (as for every data method): latency,
        then an injected failure."""
        connection = self._connection
        if connection.is_control_client:
            await trio.lowlevel.checkpoint()
            return
        faults = connection.node.faults
        failure = faults.take_failure(request.method)
        delay = faults.latency_for(request.method)
        if delay:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        if failure is not None:
            raise failure

    def finished(self, request_id: int, stream_id: bytes) -> None:
        """Stream ``request_id`` sent its STREAM_END: a CANCEL of it releases the spool."""
        self._finished[request_id] = stream_id
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)

    # ------------------------------------------------------- from the connection

    async def serve(
        self, request: Request, slot: Slot, deadline: float, free_slot: Callable[[], None]
    ) -> None:
        """Serve one request of :data:`FEED_METHODS` to its end."""
        rid = request.request_id
        if request.method == "subscribe":
            subscription = ServedSubscription(self, request, slot, deadline, free_slot)
            self._subscriptions[rid] = subscription
            try:
                await subscription.run()
            finally:
                self._subscriptions.pop(rid, None)
            return
        stream = ServedStream(self, request, slot, deadline)
        self._streams[rid] = stream
        try:
            await stream.run()
        finally:
            self._streams.pop(rid, None)

    def credit(self, message: StreamCredit) -> None:
        """STREAM_CREDIT: more pages for a stream, events for a subscription (an
        unknown id is ignored: its stream may have just ended)."""
        target = self._streams.get(message.request_id) or self._subscriptions.get(
            message.request_id
        )
        if target is not None:
            target.add_credit(message.pages)

    async def cancel(self, request_id: int) -> bool:
        """CANCEL of a finished stream (its spool is released, nothing is sent) or of
        an established subscription; False if it is neither (checkpoints either way)."""
        stream_id = self._finished.pop(request_id, None)
        if stream_id is not None:
            self.node.stats["spools_released"] += 1
            await self._release(stream_id)
            return True
        await trio.lowlevel.checkpoint()
        subscription = self._subscriptions.get(request_id)
        if subscription is not None and subscription.answered:
            subscription.cancel()
            return True
        return False

    async def _release(self, stream_id: bytes) -> None:
        try:
            db = await in_thread(open_spool_connection, self.spool_path())
            try:
                await in_thread(delete_spool, db, stream_id)
            finally:
                db.close()
        except Exception:  # the spool expires anyway
            logger.debug("%s: releasing a spool failed", self.node_id(), exc_info=True)

    def drain(self, reason: str) -> None:
        """The connection drains: every stream and subscription ends, retryable."""
        error = RequestFailed(
            ErrorCode.SHUTTING_DOWN, f"the node is draining ({reason}); resume elsewhere"
        )
        targets: list[ServedStream | ServedSubscription] = [
            *self._streams.values(),
            *self._subscriptions.values(),
        ]
        for target in targets:
            target.stop(error)
