"""Receivers of the frames of a request that gets more than one reply.

A result stream's request is answered by STREAM_PAGEs and one STREAM_END (or
an ERROR); a subscription's by a RESPONSE, then EVENTs until an ERROR ends
it (docs/protocol.md sections 12 and 13). The connection's reader hands the
frames of such a request to its :class:`Feed`, synchronously, in the order
they arrived; the feed buffers them (bounded by the credit it granted) and
wakes its consumer. The request's slot in the connection's ledger is held
as for any request: until STREAM_END or ERROR for a stream, until the
RESPONSE for a subscription. An established subscription then holds no slot
(docs/protocol.md section 13.1) but *pins* the connection
(:meth:`~qdb_client._transport.connection.Connection.pin`), so the pool does
not close it as idle. Feeds don't count as waiting requests for the
latency-aware balancer (``Connection.oldest_started``): a stream open for a
minute says nothing about the node's speed.

The connection tells a feed when it can no longer carry the request: it
failed or closed, or a GOAWAY said the request was not processed.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import QdbError
from ..protocol import BadMessage, Error, Event, Message, Response, StreamEnd, StreamPage

__all__ = ["FEED_KINDS", "Feed"]

#: The messages a connection routes to the feed of their request id. (PING and
#: PONG ids are chosen by whoever sends the PING, so they never go to a feed.)
FEED_KINDS = (StreamPage, StreamEnd, Event, Error, Response, BadMessage)


class Feed(Protocol):
    """What a connection tells the receiver of a stream or a subscription."""

    def frame(self, message: Message | BadMessage) -> bool:
        """A frame of the feed's request arrived (one of :data:`FEED_KINDS`).

        Return True when the feed consumed it entirely (a page, an event);
        False to let the connection go on with its usual handling (a RESPONSE,
        an ERROR or a STREAM_END end the request in its ledger; a BadMessage
        fails it).
        """
        ...

    def failed(self, error: QdbError) -> None:
        """The connection can no longer carry the request (it failed or closed,
        or a GOAWAY said the request was not processed). Called once; the feed
        is detached by then."""
        ...
