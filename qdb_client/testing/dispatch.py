"""How a test node's connection serves a REQUEST: admit it, run it, decide its reply.

:class:`RequestRunner` is the request side of
:class:`~.session.ServerConnection` (which inherits it and sets its state).
A REQUEST is refused at once (request id 0, a ``control.*`` call that is not
the control tool's, a connection that sent GOAWAY, no slot free in the
:class:`~.ledger.RequestLedger`), or accepted and run in its own task within
its deadline: a result stream or a subscription by :mod:`.feeds`, any other
method by :func:`~.methods.run_method`. Its reply is a RESPONSE, the ERROR it
failed with, CANCELLED when a CANCEL stopped it, or nothing at all under the
faults that lose it on purpose (``stop_pings``, ``drop_after_commit``); its
slot is freed before the reply is written.

It is apart from the connection's reading and handshake because it is the
node's per-request policy (admission, deadlines, what a cancelled or failed
request answers), while the reader only turns frames into calls of it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio

from ..protocol import Error, ErrorCode, Request, Response, error_message
from ._failure import RequestFailed
from .context import SessionState
from .feeds import FEED_METHODS, ConnectionFeeds
from .ledger import RequestLedger, Slot
from .methods import DATA_METHODS, MethodContext, Outcome, is_control_method, run_method
from .sending import ConnectionSender

__all__ = ["RequestRunner"]

logger = logging.getLogger("qdb_client.testing")

#: Method names counted under their own name in ``requests_by_method``.
_KNOWN_METHODS = frozenset({*DATA_METHODS, *FEED_METHODS})
#: What the control tool may call without a user, on a node that requires credentials.
_USERLESS_METHODS = frozenset({"ping"})


class RequestRunner(ConnectionSender):
    """The requests of :class:`~.session.ServerConnection` (its state is set there)."""

    user: str | None
    last_request_id: int
    state: SessionState
    feeds: ConnectionFeeds
    _requests: RequestLedger
    _idle_scope: trio.CancelScope
    _nursery: trio.Nursery | None
    _draining: bool
    _client_goaway: bool
    #: Closes once the last reply is out (:meth:`~.session.ServerConnection._close_gracefully`).
    _close_gracefully: Callable[[], None]
    #: What the method handlers see (:meth:`~.session.ServerConnection._method_context`).
    _method_context: Callable[[], MethodContext]

    # ------------------------------------------------------------- requests

    def _not_allowed(self, method: str, control: bool) -> tuple[ErrorCode, str] | None:
        """PERMISSION_DENIED for a ``control.*`` call that is not the control tool's (in
        test mode; elsewhere there are none), and for data methods of the control tool
        that logged in without a user on a node that requires credentials."""
        if control:
            if self.config.test_mode and not self.is_control_client:
                self.node.stats.control_refused += 1
                return (
                    ErrorCode.PERMISSION_DENIED,
                    f"{method} is for the control tool: its HELLO must carry the node's"
                    " control token (auth control_token; see docs/testing.md)",
                )
            return None
        if (
            self.is_control_client
            and self.user is None
            and self.config.credentials is not None
            and method not in _USERLESS_METHODS
        ):
            return (
                ErrorCode.PERMISSION_DENIED,
                f"the control tool logged in without a user; {method} needs credentials",
            )
        return None

    async def _on_request(self, request: Request) -> None:
        control = is_control_method(request.method)
        count = not (control or self.is_control_client)
        if count:
            self.node.stats.count_request(request.method, known=request.method in _KNOWN_METHODS)
        rid = request.request_id
        rejection: tuple[ErrorCode, str] | None = None
        if rid == 0:
            rejection = ErrorCode.INVALID_REQUEST, "request id 0 is reserved for the connection"
        elif (denied := self._not_allowed(request.method, control)) is not None:
            rejection = denied
        elif self._draining:
            rejection = ErrorCode.SHUTTING_DOWN, "the connection is closing (GOAWAY sent)"
        else:
            rejection = self._requests.refusal(rid)
        if rejection is not None:
            await self._send(error_message(rid, *rejection), count=count)
            return
        now = trio.current_time()
        budget = self.config.request_timeout
        if request.deadline_ms is not None:
            budget = min(budget, request.deadline_ms / 1000)
        self.last_request_id = max(self.last_request_id, rid)
        slot = self._requests.accept(rid)
        self.state.arrived(request.method, request.args, rid)  # a transaction's order
        self._idle_scope.deadline = math.inf
        assert self._nursery is not None
        if request.method in FEED_METHODS:  # a result stream or a subscription (.feeds)
            self._nursery.start_soon(self._run_feed, request, slot, now + budget)
            return
        self._nursery.start_soon(self._run_request, request, slot, now + budget, count)

    async def _run_feed(self, request: Request, slot: Slot, deadline: float) -> None:
        """A stream or subscription: it writes its own frames; its slot is freed at
        its end (a subscription's once its RESPONSE is out), the request answered then."""
        rid = request.request_id
        try:
            await self.feeds.serve(request, slot, deadline, lambda: self._requests.free(rid, slot))
        finally:
            self._requests.free(rid, slot)
            if self._requests.answered():
                self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout
                if self._client_goaway:
                    self._close_gracefully()

    async def _run_request(
        self, request: Request, slot: Slot, deadline: float, count: bool
    ) -> None:
        rid = request.request_id
        try:
            reply, outcome = await self._decide(request, slot, deadline)
            # The transaction's next request may run (or the transaction ends).
            self.state.finished(rid, reply.name if isinstance(reply, Error) else None)
            self._requests.free(rid, slot)  # before the write (see .ledger)
            if reply is None:
                return
            if isinstance(reply, Error) and reply.name == ErrorCode.CANCELLED.value and count:
                self.node.stats.requests_cancelled += 1
            applied = outcome is not None and outcome.applied
            sent = await self._send_reply(reply, count=count, applied=applied)
            if applied:
                self.feeds.node.committed()  # subscriptions look at the change log now
            if sent and outcome is not None and outcome.after_reply is not None:
                outcome.after_reply()
        finally:
            self.state.finished(rid)
            self._requests.free(rid, slot)
            if self._requests.answered():
                self._idle_scope.deadline = trio.current_time() + self.config.client_idle_timeout
                if self._client_goaway:
                    self._close_gracefully()

    async def _decide(
        self, request: Request, slot: Slot, deadline: float
    ) -> tuple[Response | Error | None, Outcome | None]:
        """Run the request; its reply (None: send nothing) and its outcome if it succeeded.

        A request that completed keeps its reply even if a CANCEL came too
        late to stop it; one stopped by CANCEL (an interrupted statement
        included) is CANCELLED: nothing of it was applied or stored.
        """
        rid = request.request_id
        outcome: Outcome | None = None
        reply: Error | None = None
        hung = False
        with slot.scope:
            try:
                outcome = await run_method(self._method_context(), request, deadline)
                if outcome is None:  # pings stopped: hold the slot, never answer
                    hung = True
                    await trio.sleep_until(deadline)
            except RequestFailed as exc:
                reply = exc.to_message(rid)
            except Exception as exc:
                logger.exception("%s: method %r failed", self.node.node_id, request.method)
                reply = error_message(
                    rid, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
                )
        if hung:
            return None, None
        if outcome is not None:
            if outcome.drop_connection:  # drop_after_commit: the reply is lost
                logger.info(
                    "%s: dropping the connection from %s after %s (request %d) committed",
                    self.node.node_id,
                    self.peer,
                    request.method,
                    rid,
                )
                self.abort()
                return None, None
            return Response(rid, outcome.result, replayed=outcome.replayed), outcome
        if slot.cancel_requested:
            logger.debug("%s: request %d from %s cancelled", self.node.node_id, rid, self.peer)
            text = f"request {rid} was cancelled by the client and stopped; nothing was applied"
            return error_message(rid, ErrorCode.CANCELLED, text, details={"executed": False}), None
        assert reply is not None
        return reply, None
