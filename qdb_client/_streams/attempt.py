"""One request of a stream or subscription, on one connection of one node.

A result stream is one ``query_stream`` request, then one ``resume_stream``
per interruption; a subscription is one ``subscribe`` per connection it
lives on. Each is an :class:`Attempt`: the connection's :class:`Feed` for
that request id, forwarding frames to its owner (the stream or subscription)
as long as it is the owner's current attempt. A stale attempt's late frames
are dropped, so two requests can never interleave their pages.

:func:`start` opens one: a node from the cluster (avoiding the ones this
stream already failed on, when another is left), a request slot from its
pool, the REQUEST written, the feed attached before any checkpoint (a reply
cannot overtake it). Whatever fails on the way is a typed error saying
whether the request was sent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..errors import ClientClosed, ConnectionLost, QdbError
from ..protocol import BadMessage, Cancel, Message, StreamCredit

if TYPE_CHECKING:
    from .._cluster import Cluster, Node
    from .._transport import Connection, PendingRequest

__all__ = ["Attempt", "Owner", "connection_error", "ms_until", "start", "start_on"]

logger = logging.getLogger("qdb_client.streams")


class Owner(Protocol):
    """What an attempt reports to (a stream or a subscription)."""

    def _on_frame(self, attempt: Attempt, message: Message | BadMessage) -> bool: ...

    def _on_failed(self, attempt: Attempt, error: QdbError) -> None: ...


class Attempt:
    """One request on one connection, and the feed of its frames."""

    __slots__ = ("_owner", "connection", "node", "pending", "pinned", "stalled", "stopped")

    def __init__(
        self, owner: Owner, node: Node | None, connection: Connection, pending: PendingRequest
    ) -> None:
        self._owner = owner
        #: The node it runs on (None for a transaction's pinned connection).
        self.node = node
        self.connection = connection
        self.pending = pending
        #: The owner gave up on it (ended, cancelled, failed): its frames are dropped.
        self.stopped = False
        #: It was abandoned because its node stayed silent.
        self.stalled = False
        #: An established subscription pins its connection (no request slot) while it lives.
        self.pinned = False

    @property
    def request_id(self) -> int:
        return self.pending.request_id

    @property
    def address(self) -> str:
        return self.connection.address

    # ------------------------------------------------------------- the feed

    def frame(self, message: Message | BadMessage) -> bool:
        """Connection side (see :class:`~qdb_client._transport.feeds.Feed`)."""
        if self.stopped:
            # Dropped; a RESPONSE/ERROR/STREAM_END still ends the request in the
            # ledger, an ERROR after the request's own reply has no one to go to.
            return self.pending.done and not isinstance(message, BadMessage)
        return self._owner._on_frame(self, message)

    def failed(self, error: QdbError) -> None:
        """Connection side: it can no longer carry this request."""
        if not self.stopped:
            self._owner._on_failed(self, error)

    # ------------------------------------------------------------ actions

    def pin(self) -> None:
        """Keep the connection from being closed as idle while this attempt lives,
        without a request slot (an established subscription); once at most."""
        if not self.pinned and not self.stopped:
            self.pinned = True
            self.connection.pin()

    def grant(self, pages: int) -> None:
        """Send STREAM_CREDIT for ``pages`` more pages (or events)."""
        if pages > 0 and not self.stopped:
            self.connection.send_control(StreamCredit(self.request_id, pages))

    def stop(self, *, cancel: bool, release: bool = False) -> None:
        """Stop listening; ``cancel``: CANCEL the request on the node (a stream's
        spool is deleted); ``release``: CANCEL a stream that ended (frees its spool,
        no reply comes). Synchronous: safe in any cleanup."""
        if self.stopped:
            return
        self.stopped = True
        connection = self.connection
        connection.detach_feed(self.request_id)
        if self.pinned:
            self.pinned = False
            connection.unpin()
        if not self.pending.done:
            if cancel:
                # Orphaned until the node confirms (its CANCELLED), however long
                # the stream ran: never forgotten before a fresh grace period.
                self.pending.expires = max(self.pending.expires, trio.current_time() + 5.0)
                connection.abandon(self.pending)
        elif cancel or release:
            connection.send_control(Cancel(self.request_id))

    def abort_connection(self, why: str) -> None:
        """Close the whole connection (the only way to stop a stream's request on
        the node without deleting its spool); every request on it fails."""
        self.stalled = True
        logger.debug("aborting %s: %s", self.address, why)
        self.connection.abort(why)


async def start(
    owner: Owner,
    cluster: Cluster,
    method: str,
    args: dict[str, Any],
    *,
    exclude: Sequence[Node] = (),
    deadline_ms: int | None,
) -> Attempt:
    """Open one attempt on a node of ``cluster`` (one that has not failed this
    stream, when another is left); typed errors only."""
    node = await cluster.select(exclude=exclude)
    connection = await node.pool.acquire_slot()
    # No checkpoint from here to attach_feed: no frame can arrive in between.
    pending = connection.send_reserved(method, args, deadline_ms=deadline_ms)
    attempt = Attempt(owner, node, connection, pending)
    connection.attach_feed(pending.request_id, attempt)
    logger.debug("%s sent to %s as request %d", method, node.address, pending.request_id)
    return attempt


async def start_on(
    owner: Owner, connection: Connection, method: str, args: dict[str, Any], deadline_ms: int
) -> Attempt:
    """Open one attempt on a given connection (a transaction's), waiting for a slot."""
    pending = await connection.send_request(method, args, deadline_ms=deadline_ms)
    attempt = Attempt(owner, None, connection, pending)
    connection.attach_feed(pending.request_id, attempt)
    return attempt


def ms_until(deadline: float, cap: float) -> int:
    """``deadline_ms`` for a request: the time left, at most ``cap`` seconds."""
    budget = min(deadline - trio.current_time(), cap)
    return max(1, math.ceil(budget * 1000)) if math.isfinite(budget) else math.ceil(cap * 1000)


def connection_error(error: QdbError, *, client_closed: bool) -> QdbError:
    """A connection closed by its pool (retired, expired) while the client is open is
    a lost connection to whatever ran on it, not the client's own close."""
    if isinstance(error, ClientClosed) and not client_closed:
        lost = ConnectionLost(f"the connection was closed: {error}", request_sent=True)
        lost.__cause__ = error
        return lost
    return error
