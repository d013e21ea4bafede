"""One attempt of a call: pick a node, send, wait for the reply within the
attempt's time, and turn what happened into one outcome.

An attempt that can send at once (a node admits it, its pool has a slot free)
waits for its reply under the client's expiry timer (``Expiries``); one that
must wait for a node or a pool slot runs in a cancel scope at the call's
deadline, lowered to the attempt timeout while it waits to send and again
after the send. Both end the same way (``_conclude``). The one outcome feeds
the node's breaker, its latency tracker and its health monitor (``_feed``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import trio

from .._cluster import Cluster, Node
from .._metrics import LatencyHistograms
from .._policies import (
    SILENCE_CAUSES,
    AttemptTimeouts,
    BreakerVerdict,
    LatencyVerdict,
    Outcome,
    classify,
)
from .._transport import Connection, Expired, Expiries, PendingRequest
from ..errors import CircuitOpen, ProtocolError, QdbError, RequestTimeout
from ..events import (
    EventBus,
    IdempotentReplay,
    RequestStarted,
    RequestSucceeded,
)
from .state import (
    NOT_ADMITTED,
    Arguments,
    AttemptResult,
    CallState,
    DeadlinePassed,
    PipelineCounters,
)

__all__ = ["AttemptRunner", "parsed_reply"]


class AttemptRunner:
    """The attempts of :class:`~.pipeline.RequestPipeline` (its state is set there)."""

    cluster: Cluster
    events: EventBus
    latencies: LatencyHistograms
    attempt_timeouts: AttemptTimeouts
    counters: PipelineCounters
    expiries: Expiries
    _last_reply_time: float
    #: Reads trio's clock (``trio.current_time``, at less cost).
    _now: Callable[[], float]

    # ------------------------------------------------------------ attempts

    async def _attempt(self, call: CallState, args: Arguments) -> tuple[Any, AttemptResult | None]:
        """One attempt: (result, None) on success, else (None, what happened)."""
        # Read afresh, never the call's start: the call's own bookkeeping takes
        # time, and a request whose deadline has passed must not be sent.
        started = self._now()
        node = None
        if self.expiries.running and started < call.deadline:
            await trio.lowlevel.checkpoint_if_cancelled()
            node = self.cluster.select_now(call.tried, started)
            if node is not None:
                call.node = node
                connection = node.pool.try_acquire_slot(started)
                if connection is not None:
                    return await self._attempt_now(call, args, node, connection, started)
        return await self._attempt_scoped(call, args, started, node)

    async def _attempt_now(
        self, call: CallState, args: Arguments, node: Node, connection: Connection, started: float
    ) -> tuple[Any, AttemptResult | None]:
        """An attempt that needs no wait before its send (a node admits it and its
        pool has a slot free, both already taken): its one wait, for the reply, is
        bounded by the expiry timer instead of a cancel scope."""
        timeout = self._attempt_timeout(node, call, started)
        generation = NOT_ADMITTED
        pending = None
        error: QdbError | None = None
        result: Any = None
        expires = call.deadline
        try:
            generation = self._admit(node, started, connection)
            pending = connection.send_reserved(
                call.method,
                _arguments(args, connection),
                deadline_ms=max(1, math.ceil((call.deadline - started) * 1000)),
                idempotency_key=call.key,
                now=started,
            )
            if call.safe and timeout < call.deadline - started:
                expires = started + timeout
            if call.observe:
                self._started(call, node, pending, connection, started)
            result = await pending.wait_until(expires, self.expiries)
            if pending.replayed:
                self._replayed(call, node)
            if call.parse is not None:
                result = parsed_reply(call.parse, result)  # a malformed reply is a corrupted one
        except Expired:
            return self._conclude(
                call, node, generation, pending, None, None, started, started, timeout,
                timed_out=True, ours=expires < call.deadline,
            )  # fmt: skip
        except QdbError as exc:
            error = exc
        except BaseException:
            # The caller's own cancellation: it says nothing about the node.
            if generation != NOT_ADMITTED:
                self._cancelled(call, node, generation, pending, started, timeout)
            raise
        return self._conclude(
            call, node, generation, pending, error, result, started, started, timeout,
            timed_out=False, ours=False,
        )  # fmt: skip

    async def _attempt_scoped(
        self, call: CallState, args: Arguments, started: float, chosen: Node | None
    ) -> tuple[Any, AttemptResult | None]:
        """An attempt that may wait for a node or a connection: the whole of it
        runs in a cancel scope at the call's deadline, lowered to the attempt
        timeout while it waits to send and again after the send. (``chosen``: the
        node already picked for it, whose pool had no slot free at once.)"""
        node: Node | None = None
        pending = None
        generation = NOT_ADMITTED
        sent_at = started
        timeout = math.inf
        error: QdbError | None = None
        result: Any = None
        late = False
        with trio.CancelScope(deadline=call.deadline) as scope:
            try:
                node = (
                    chosen if chosen is not None else await self.cluster.select(exclude=call.tried)
                )
                call.node = node
                timeout = self._attempt_timeout(node, call, trio.current_time())
                if timeout < call.deadline - started:
                    # Waiting for a connection (a node that accepts but never
                    # answers the handshake) counts too: nothing is sent yet,
                    # so any request may then go elsewhere.
                    scope.deadline = started + timeout
                generation = self._admit(node, started)
                # The scope's deadline stays put while the pool is waited for.
                connection = await node.pool.acquire_slot(bounded_by=scope.deadline)
                sent_at = trio.current_time()
                if sent_at >= call.deadline:
                    # trio looks at deadlines once per scheduler pass: a slot
                    # granted in the pass the deadline went by would still send.
                    connection.unreserve()
                    late = True
                    raise DeadlinePassed
                pending = connection.send_reserved(
                    call.method,
                    _arguments(args, connection),
                    deadline_ms=max(1, math.ceil((call.deadline - sent_at) * 1000)),
                    idempotency_key=call.key,
                )
                if call.safe and timeout < call.deadline - sent_at:
                    scope.deadline = sent_at + timeout
                else:
                    scope.deadline = call.deadline  # a write without a key waits for its reply
                if call.observe:
                    self._started(call, node, pending, connection, sent_at)
                result = await pending.wait()
                if pending.replayed:
                    self._replayed(call, node)
                if call.parse is not None:
                    result = parsed_reply(
                        call.parse, result
                    )  # a malformed reply is a corrupted one
            except DeadlinePassed:
                pass
            except QdbError as exc:
                error = exc
            except BaseException:
                # The caller's own cancellation (our own deadlines are handled
                # below, once): it says nothing about the node.
                if node is not None and generation != NOT_ADMITTED and not scope.cancel_called:
                    self._cancelled(call, node, generation, pending, sent_at, timeout)
                raise
        if late:  # as if the scope had fired at the call's deadline, before the send
            return self._conclude(
                call, node, generation, None, None, None, started, sent_at, timeout,
                timed_out=True, ours=False,
            )  # fmt: skip
        return self._conclude(
            call, node, generation, pending, error, result, started, sent_at, timeout,
            timed_out=scope.cancelled_caught, ours=scope.deadline < call.deadline,
        )  # fmt: skip

    def _admit(self, node: Node, now: float, reserved: Connection | None = None) -> int:
        """Count the attempt if ``node``'s breaker admits it and return the breaker's
        generation; else give back the ``reserved`` slot and raise CircuitOpen."""
        breaker = node.breaker
        if not breaker.allow(now):
            if reserved is not None:
                reserved.unreserve()
            raise CircuitOpen(
                f"circuit breaker of {node.address} is open",
                reopens_in={node.address: _reopens_in(node)},
            )
        self.counters.attempts += 1
        node.requests_sent += 1
        return breaker.generation

    def _started(
        self,
        call: CallState,
        node: Node,
        pending: PendingRequest,
        connection: Connection,
        sent_at: float,
    ) -> None:
        self.events.emit(
            RequestStarted(
                sent_at,
                call.method,
                node.address,
                len(call.attempts) + 1,
                pending.request_id,
                connection.serial,
            )
        )

    def _cancelled(
        self,
        call: CallState,
        node: Node,
        generation: int,
        pending: PendingRequest | None,
        sent_at: float,
        timeout: float,
    ) -> None:
        sent = pending is not None and pending.sent
        superseded = call.superseded  # another copy answered first: not the caller's doing
        outcome = classify(None, sent=sent, cancelled=not superseded, superseded=superseded)
        now = trio.current_time()
        waited = now - sent_at
        if superseded:
            timeout = waited  # blamed if the winner answered in less (see _judge)
        self._feed(call, node, generation, outcome, None, now, waited, timeout)

    def _conclude(
        self,
        call: CallState,
        node: Node | None,
        generation: int,
        pending: PendingRequest | None,
        error: QdbError | None,
        result: Any,
        started: float,
        sent_at: float,
        timeout: float,
        *,
        timed_out: bool,
        ours: bool,
    ) -> tuple[Any, AttemptResult | None]:
        """What the attempt's end means: ``timed_out`` if a deadline ended it,
        the attempt's own (``ours``) or the call's."""
        now = self._now()
        if error is None and not timed_out:
            # The hot path: a reply. (node is set: nothing raised.)
            assert node is not None
            node.breaker.record_success(now, generation)
            self._last_reply_time = reply_time = now - sent_at
            node.latency.record_reply(reply_time)
            self.latencies.observe(call.method, node.address, reply_time)
            if call.observe:
                assert pending is not None
                self.events.emit(
                    RequestSucceeded(
                        now,
                        call.method,
                        node.address,
                        len(call.attempts) + 1,
                        pending.request_id,
                        reply_time,
                    )
                )
            return result, None
        sent = pending is not None and pending.sent
        if timed_out:
            outcome = classify(None, sent=sent, attempt_timed_out=ours, deadline_passed=not ours)
            if ours:
                assert node is not None
                error = RequestTimeout(
                    f"no reply from {node.address} within the {timeout:.3g} s attempt timeout"
                    + ("" if sent else " (the request was still waiting to be written)"),
                    timeout=timeout,
                    request_sent=sent,
                )
        else:
            outcome = classify(error, sent=sent)
        if node is not None and generation != NOT_ADMITTED:
            self._feed(call, node, generation, outcome, error, now, now - sent_at, timeout)
        request_id = pending.request_id if pending is not None else 0
        return None, AttemptResult(outcome, error, node, sent, started, request_id)

    def _replayed(self, call: CallState, node: Node) -> None:
        """A node answered this keyed write from its stored outcome: an earlier
        attempt (or an earlier call with the key) applied it."""
        self.counters.idempotent_replays += 1
        if self.events.wants(IdempotentReplay):
            self.events.emit(
                IdempotentReplay(trio.current_time(), call.method, node.address, call.key or "")
            )

    def _attempt_timeout(self, node: Node, call: CallState, now: float) -> float:
        """Seconds the attempt may take before another node is tried (inf: the
        whole deadline), from its start until the request is written, and again
        from the write (then only for requests safe to repeat)."""
        timeouts = self.attempt_timeouts
        if not timeouts.enabled:
            return math.inf
        cluster = self.cluster
        if len(cluster.nodes) == 1 or not cluster.has_alternative(node, call.tried, now):
            return math.inf  # the last node left gets the whole deadline
        quantile = node.latency.reply_quantile
        if quantile is not None and timeouts.factor * quantile <= timeouts.minimum:
            # The floor, whatever the others: their quantiles can only lower this one.
            return timeouts.minimum
        if quantile is None or len(self.cluster.nodes) > 1:
            # A node is judged beside the others: one that slows down by
            # degrees must not raise its own timeout to the whole deadline.
            others = _typical_quantile([n for n in self.cluster.nodes if n is not node])
            if quantile is None:
                quantile = others
            elif others is not None:
                quantile = min(quantile, 2 * others)
        if quantile is None:
            return timeouts.minimum
        return max(timeouts.minimum, timeouts.factor * quantile)

    def _feed(
        self,
        call: CallState,
        node: Node,
        generation: int,
        outcome: Outcome,
        error: QdbError | None,
        now: float,
        elapsed: float,
        timeout: float,
    ) -> None:
        """Give the attempt's one outcome to the node's breaker, latency and health.

        (A success takes the same path inline in ``_attempt``: the table's
        SUCCESS row, a breaker success and a reply-time sample.)
        """
        breaker = node.breaker
        verdict = outcome.breaker
        if verdict is BreakerVerdict.JUDGED:
            # Decided when the call ends (see _judge), penalty included.
            if call.suspects is None:
                call.suspects = []
            call.suspects.append((node, generation, timeout, elapsed))
        else:
            if verdict is BreakerVerdict.IF_SLOW:
                slow = self.attempt_timeouts.slow_threshold(
                    node.latency, _typical_quantile(self.cluster.nodes)
                )
                # Deadlines each too short to show a stall still add up to one:
                # a healthy node confirms what was abandoned on it within its
                # usual reply time, a stalled one leaves it unconfirmed.
                orphaned_since = _oldest_orphan(node)
                if elapsed >= slow or (orphaned_since is not None and now - orphaned_since >= slow):
                    verdict = BreakerVerdict.FAILURE
                else:
                    verdict = BreakerVerdict.IGNORE
                    # Too short to blame this node, yet still silence: if no node
                    # beside it is CLOSED, those that silence shut out are probed.
                    self.cluster.may_open_on_silence(node)
            if verdict is BreakerVerdict.SUCCESS:
                breaker.record_success(now, generation)
            elif verdict is BreakerVerdict.FAILURE:
                breaker.record_failure(
                    now,
                    generation,
                    cause=outcome.cause,
                    correlation=getattr(error, "failure_id", None),
                    # Silence is judged beside the others: never the last node's exit.
                    may_open=outcome.cause not in SILENCE_CAUSES
                    or self.cluster.may_open_on_silence(node),
                )
            else:
                breaker.record_ignored(generation)
            latency = outcome.latency
            if latency is LatencyVerdict.SAMPLE:
                node.latency.record_reply(elapsed)
            elif latency is LatencyVerdict.PENALTY:
                node.latency.record_penalty(elapsed)
        if outcome.probe:
            self.counters.attempt_timeouts += 1
            self.cluster.report_silence(node)


def _arguments(args: Arguments, connection: Connection) -> dict[str, Any]:
    """The request's arguments for ``connection``; if they can't be had, the slot
    reserved on it is given back (nothing was sent)."""
    if not callable(args):
        return args
    try:
        return args(connection)
    except BaseException:
        connection.unreserve()
        raise


def parsed_reply(parse: Any, result: Any) -> Any:
    """``parse(result)``; what it raises other than a QdbError (a parser's
    oversight about what a node can send) becomes the ProtocolError of a
    malformed reply, never an untyped error, nor one taken for the caller's
    own cancellation."""
    try:
        return parse(result)
    except QdbError:
        raise
    except Exception as exc:
        raise ProtocolError(f"unusable result from node: {exc!r:.300}") from exc


def _reopens_in(node: Node) -> float:
    reopens_at = node.breaker.reopens_at()
    return 0.0 if reopens_at is None else max(0.0, reopens_at - trio.current_time())


def _oldest_orphan(node: Node) -> float | None:
    """trio time the oldest request abandoned on ``node`` that it has neither
    answered nor confirmed stopping was sent (None when there is none)."""
    return min(
        (t for c in node.pool.connections() if (t := c.oldest_orphan()) is not None),
        default=None,
    )


def _typical_quantile(nodes: list[Node]) -> float | None:
    known = sorted(q for n in nodes if (q := n.latency.reply_quantile) is not None)
    return known[len(known) // 2] if known else None
