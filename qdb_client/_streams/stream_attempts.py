"""The attempts of a result stream: starting and resuming its requests, and
what their connections feed in.

A :class:`~.stream.ResultStream` is one ``query_stream`` request, then one
``resume_stream`` per interruption (each an :class:`~.attempt.Attempt`).
This module holds that producer side: ``_next_attempt`` asks the
:class:`~qdb_client._policies.resume.ResumePolicy` whether and when to go on
after a failure and starts the next request on another node (``_start``),
``_give_up`` makes the error that ends the stream (the query's own refusal,
or StreamResumeFailed with what was delivered), and ``_on_frame`` /
``_on_failed``, called by the connection, check each page into the ledger
and buffer it, or record why the attempt can't go on.

It is separate from :mod:`.stream`, which holds the consumer side (the
public API, the page buffer the application drains, closing the stream and
releasing its spool). :class:`StreamAttempts` is a base class of
ResultStream, whose ``__init__`` sets the state it uses;
:class:`~.tx_stream.TransactionStream` replaces ``_next_attempt`` (a stream
in a transaction never resumes).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from .._policies import Outcome, OutcomeKind, RetryRule, classify
from .._policies.resume import ResumePolicy
from ..errors import (
    ClientClosed,
    MessageError,
    NotFound,
    QdbError,
    RequestTimeout,
    StreamCorrupted,
    StreamResumeFailed,
)
from ..protocol import BadMessage, Error, Message, StreamEnd, StreamPage, error_from_message
from . import attempt as attempts
from .attempt import Attempt
from .checks import PageLedger

if TYPE_CHECKING:
    from .._cluster import Node
    from .stream import DeliveredFacts, StreamHost

__all__ = ["StreamAttempts"]

logger = logging.getLogger("qdb_client.streams")

#: Outcomes that end a plain call but only delay a stream (see ResumePolicy).
_NOT_NOW = (OutcomeKind.NO_NODE, OutcomeKind.CIRCUIT_OPEN)


class StreamAttempts:
    """The attempts of :class:`~.stream.ResultStream` (its state is set there)."""

    _host: StreamHost
    _args: dict[str, Any]
    _policy: ResumePolicy
    _ledger: PageLedger
    _buffer: deque[StreamPage]
    _lot: trio.lowlevel.ParkingLot
    _attempt: Attempt | None
    #: Why the current attempt can't go on, and its classification.
    _failure: tuple[QdbError, Outcome] | None
    _corrupted: StreamCorrupted | None
    _failed_nodes: list[Node]
    _failures_since_progress: int
    _previous_delay: float | None
    _deadline: float
    #: A node said it no longer has the spool (nothing to release).
    _spool_gone: bool
    #: Times the stream continued on a new request after an interruption.
    resumes: int

    # ------------------------------------------------ starting and resuming

    async def _next_attempt(self) -> None:
        """Start the stream, or resume it after the current attempt's failure."""
        failure, self._failure = self._failure, None
        old, self._attempt = self._attempt, None
        if old is not None:
            old.stop(cancel=False)
            if old.node is not None and old.node not in self._failed_nodes:
                self._failed_nodes.append(old.node)
        if failure is not None:
            error, outcome = failure
            decision = self._policy.decide(
                outcome,
                attempts_done=self._failures_since_progress,
                remaining=self._deadline - trio.current_time(),
                rng=self._host._rng,
                previous_delay=self._previous_delay,
                error=error,
            )
            logger.debug("stream attempt failed: %s", decision.reason)
            if not decision.retry:
                raise self._give_up(error, outcome, decision.reason)
            self._failures_since_progress += 1
            self._previous_delay = decision.delay
            if decision.delay > 0:
                await trio.sleep(decision.delay)
        await self._start()

    async def _start(self) -> None:
        config = self._host.config
        if self._ledger.token is None:
            method, args = "query_stream", dict(self._args)
        else:
            method, args = "resume_stream", {"token": self._ledger.token}
            self.resumes += 1
        args["credit"] = self._ledger.start_attempt(len(self._buffer))
        until = min(self._deadline, trio.current_time() + config.request_timeout)
        try:
            with trio.fail_at(until):
                attempt = await attempts.start(
                    self,
                    self._host._require_cluster(),
                    method,
                    args,
                    exclude=self._failed_nodes,
                    deadline_ms=attempts.ms_until(self._deadline, config.request_timeout),
                )
        except trio.TooSlowError:
            error = RequestTimeout(f"{method} could not be sent in time", timeout=0.0)
            self._failure = (error, classify(None, sent=False, attempt_timed_out=True))
            return
        except QdbError as exc:
            if self._host._closed:
                raise
            self._failure = (exc, classify(exc, sent=getattr(exc, "request_sent", False)))
            return
        self._attempt = attempt

    def _give_up(self, error: QdbError, outcome: Outcome, reason: str) -> QdbError:
        """The error that ends the stream: the query's own refusal as is (before
        page 0), else StreamResumeFailed with what was delivered."""
        ledger = self._ledger
        facts: DeliveredFacts = {
            "rows_delivered": ledger.rows_received,
            "pages_delivered": ledger.pages_received,
            "last_seq": ledger.last_seq,
            "resume_attempts": self._failures_since_progress,
        }
        refused = outcome.retry is RetryRule.NEVER and outcome.kind not in _NOT_NOW
        if (ledger.token is None and refused) or isinstance(error, ClientClosed):
            return error  # the query itself was refused (SqlError...), or the client closed
        if isinstance(error, NotFound):
            self._spool_gone = True
            why = str(error.details.get("reason") or "unknown")
            failed = StreamResumeFailed(
                f"the stream can't be resumed: the node no longer has it ({why}); delivered"
                f" {ledger.rows_received} rows in {ledger.pages_received} pages, up to page"
                f" {ledger.last_seq}",
                reason=why,
                **facts,
            )
        else:
            failed = StreamResumeFailed(
                f"the stream stopped after {ledger.rows_received} rows in"
                f" {ledger.pages_received} pages (last page {ledger.last_seq}): {reason}",
                reason=reason,
                **facts,
            )
        failed.__cause__ = error
        return failed

    # ----------------------------------------- connection side (the feed)

    def _fail_attempt(self, attempt: Attempt, error: QdbError, outcome: Outcome) -> None:
        if attempt is self._attempt and self._failure is None:
            self._failure = (error, outcome)
        self._lot.unpark_all()

    def _on_frame(self, attempt: Attempt, message: Message | BadMessage) -> bool:
        if attempt is not self._attempt:
            return True
        if self._corrupted is not None:  # the first contradiction is the one reported
            return isinstance(message, StreamPage)
        if isinstance(message, StreamPage):
            try:
                self._ledger.accept(message)
            except StreamCorrupted as exc:
                self._corrupted = exc
            else:
                self._buffer.append(message)
                self._failures_since_progress = 0
                self._failed_nodes.clear()
            self._lot.unpark_all()
            return True
        if isinstance(message, StreamEnd):
            try:
                self._ledger.finish(message)
            except StreamCorrupted as exc:
                self._corrupted = exc
            self._lot.unpark_all()
            return False  # the request is over: the connection frees its slot
        error: QdbError
        if isinstance(message, Error):
            error = error_from_message(message, node=attempt.address)
            self._fail_attempt(attempt, error, classify(error, sent=True))
            return False
        if isinstance(message, BadMessage):
            # A page lost in transit: this request can't go on, and stopping it
            # with CANCEL would delete the spool, so its connection goes.
            error = MessageError(f"a stream frame was corrupted: {message.error}")
            self._fail_attempt(attempt, error, classify(error, sent=True))
            attempt.abort_connection(f"stream frame corrupted: {message.error}")
            return True
        self._corrupted = self._ledger._corrupt(f"a {type(message).__name__} on a stream")
        self._lot.unpark_all()
        return False

    def _on_failed(self, attempt: Attempt, error: QdbError) -> None:
        if attempt is not self._attempt or attempt.stalled:
            self._lot.unpark_all()
            return
        error = attempts.connection_error(error, client_closed=self._host._closed)
        self._fail_attempt(attempt, error, classify(error, sent=True))
