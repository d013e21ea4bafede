"""The request pipeline of one client call.

A call picks a node, sends its request there within one deadline, and lets
the attempt's outcome decide what comes next: the reply, or a retry after a
backoff (on another node when one is left), or the error that says truthfully
what happened.

Each attempt runs in one cancel scope whose deadline is the call's, lowered
to the attempt timeout once the request is out (a multiple of the node's
observed reply time, only while another node is left to try and only for
requests that are safe to repeat), so a node that stalls costs one attempt
timeout, not the whole deadline. What happened to the attempt is classified
once (``_policies.outcome``); that one outcome feeds the node's breaker, its
latency tracker and its health monitor, and the retry policy. Every attempt
is recorded, and every error that leaves the pipeline carries the list and
the facts: whether the request was sent, whether a write may have been
applied, and the idempotency key it was sent with.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._cluster import Cluster, Node
from ._metrics import LatencyHistograms
from ._policies import (
    SILENCE_CAUSES,
    AttemptTimeouts,
    Backoff,
    BreakerVerdict,
    LatencyVerdict,
    Outcome,
    OutcomeKind,
    RetryBudget,
    RetryDecision,
    RetryPolicy,
    RetryRule,
    classify,
)
from ._transport import Connection, Expired, Expiries, PendingRequest
from .errors import (
    Attempt,
    CircuitOpen,
    OutcomeUnknown,
    QdbError,
    RequestTimeout,
    RetryExhausted,
)
from .events import (
    EventBus,
    IdempotentReplay,
    RequestFailed,
    RequestStarted,
    RequestSucceeded,
    RetryScheduled,
)

if TYPE_CHECKING:
    from .config import ClientConfig

__all__ = ["Arguments", "PipelineCounters", "RequestPipeline"]

#: A request's arguments, or a function of the connection it goes on.
Arguments = dict[str, Any] | Callable[[Any], dict[str, Any]]

_NOT_ADMITTED = -1


@attrs.define
class PipelineCounters:
    """Totals across all calls of one client."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    requeues: int = 0
    attempt_timeouts: int = 0
    #: Calls that ended because their deadline passed (RequestTimeout, or
    #: OutcomeUnknown for an unkeyed write that was sent).
    call_timeouts: int = 0
    #: Keyed writes a node answered from its stored outcome (IdempotentReplay).
    idempotent_replays: int = 0
    failures: int = 0
    outcome_unknown: int = 0
    retry_budget_exhausted: int = 0
    circuit_rejections: int = 0


class _Call:
    """The state of one call across its attempts."""

    __slots__ = (
        "attempts",
        "deadline",
        "key",
        "method",
        "observe",
        "parse",
        "previous_delay",
        "read_only",
        "requeues",
        "retries",
        "start",
        "suspects",
        "timeout",
        "tried",
    )

    def __init__(
        self,
        method: str,
        start: float,
        timeout: float,
        read_only: bool,
        key: str | None,
        parse: Callable[[Any], Any] | None,
    ) -> None:
        self.method = method
        self.parse = parse
        #: Whether request events reach anyone (decided once per call).
        self.observe = False
        #: Attempt timeouts to judge when the call ends: (node, generation,
        #: timeout, waited). See BreakerVerdict.JUDGED.
        self.suspects: list[tuple[Node, int, float, float]] | None = None
        self.start = start
        self.timeout = timeout
        self.deadline = start + timeout
        self.read_only = read_only
        self.key = key
        self.attempts: list[Attempt] = []
        self.tried: list[Node] = []
        self.retries = 0
        self.requeues = 0
        self.previous_delay: float | None = None

    @property
    def safe(self) -> bool:
        """Whether the request may be repeated: a read, or a write with a key."""
        return self.read_only or self.key is not None

    @property
    def sent(self) -> bool:
        """Whether any attempt's request reached the wire."""
        return any(a.sent for a in self.attempts)

    @property
    def maybe_applied(self) -> bool:
        """Whether a write may have been applied by one of the attempts."""
        return not self.read_only and any(a.maybe_applied for a in self.attempts)


class _Late(Exception):  # internal: never leaves the attempt
    """The call's deadline passed while the attempt waited to send."""


class _Try:
    """What one attempt left behind, for the call to decide on."""

    __slots__ = ("error", "node", "outcome", "request_id", "sent", "started")

    def __init__(
        self,
        outcome: Outcome,
        error: QdbError | None,
        node: Node | None,
        sent: bool,
        started: float,
        request_id: int = 0,
    ) -> None:
        self.outcome = outcome
        self.error = error
        self.node = node
        self.sent = sent
        self.started = started
        self.request_id = request_id


class RequestPipeline:
    """Runs calls with attempt timeouts, breakers, retries and one deadline."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        policy: RetryPolicy,
        budget: RetryBudget,
        rng: random.Random,
        attempt_timeouts: AttemptTimeouts | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.cluster = cluster
        self.events = events or EventBus()
        #: Reply times per method and node (always on: a bisect per reply).
        self.latencies = LatencyHistograms()
        self.policy = policy
        self.budget = budget
        self.rng = rng
        self.attempt_timeouts = attempt_timeouts or AttemptTimeouts()
        self.counters = PipelineCounters()
        #: The timer of attempts' waits for replies; run by the client (until
        #: it runs, attempts bound their waits with cancel scopes).
        self.expiries = Expiries()
        #: Reply time of the last successful attempt (read right after it).
        self._last_reply_time = 0.0

    async def call(
        self,
        method: str,
        args: Arguments,
        *,
        budget_seconds: float,
        read_only: bool,
        idempotency_key: str | None = None,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Run ``method``: attempt, and on failure retry or raise as its outcome says.

        ``parse`` turns the node's result into the caller's (it raises
        ProtocolError for a malformed one): run inside the attempt, so a
        malformed reply is classified like a corrupted one. ``args`` may be a
        callable taking the connection the attempt goes on (a prepared
        statement's id depends on it).
        """
        now = trio.current_time()
        call = _Call(method, now, budget_seconds, read_only, idempotency_key, parse)
        call.observe = self.events.wants(RequestStarted)
        self.counters.calls += 1
        self.budget.record_request(now)
        try:
            while True:
                result, attempt = await self._attempt(call, args)
                if attempt is None:
                    if call.suspects:
                        self._judge(call, answered_in=self._last_reply_time)
                    return result  # attempts are only reported with errors
                decision = self._decide(call, attempt)
                self._record_attempt(call, attempt, decision)
                if not decision.retry:
                    if call.suspects:
                        self._judge(call, answered_in=None)
                    raise self._final(call, attempt, decision)
                await self._next(call, attempt, decision)
        except BaseException:
            if call.suspects:
                self._judge(call, answered_in=None, blame=False)  # cancelled: release probes
            raise

    async def _next(self, call: _Call, attempt: _Try, decision: RetryDecision) -> None:
        """Count the retry (or re-queue) and wait out its backoff."""
        if call.observe:
            self.events.emit(
                RetryScheduled(
                    trio.current_time(),
                    call.method,
                    len(call.attempts) + 1,
                    decision.delay,
                    decision.reason,
                )
            )
        if decision.requeue:
            call.requeues += 1
            self.counters.requeues += 1
        else:
            call.retries += 1
            self.counters.retries += 1
            call.previous_delay = decision.delay
            if attempt.node is not None:
                call.tried.append(attempt.node)
        if decision.delay > 0:
            await trio.sleep(decision.delay)

    def _judge(self, call: _Call, *, answered_in: float | None, blame: bool = True) -> None:
        """Decide the attempt timeouts of a call now that it ended.

        A node that timed out is to blame, unless another node's reply took as
        long (then the request is slow everywhere) or the caller cancelled.
        """
        assert call.suspects is not None
        now = trio.current_time()
        for node, generation, timeout, waited in call.suspects:
            if blame and (answered_in is None or answered_in < timeout):
                node.breaker.record_failure(
                    now, generation, cause="slow", may_open=self.cluster.may_open_on_silence(node)
                )
                node.latency.record_penalty(waited)
            else:
                node.breaker.record_ignored(generation)
        call.suspects = None

    # ------------------------------------------------------------ attempts

    async def _attempt(self, call: _Call, args: Arguments) -> tuple[Any, _Try | None]:
        """One attempt: (result, None) on success, else (None, what happened)."""
        # Read afresh, never the call's start: the call's own bookkeeping takes
        # time, and a request whose deadline has passed must not be sent.
        started = trio.current_time()
        node = None
        if self.expiries.running and started < call.deadline:
            await trio.lowlevel.checkpoint_if_cancelled()
            node = self.cluster.select_now(call.tried, started)
            if node is not None:
                connection = node.pool.try_acquire_slot(started)
                if connection is not None:
                    return await self._attempt_now(call, args, node, connection, started)
        return await self._attempt_scoped(call, args, started, node)

    async def _attempt_now(
        self, call: _Call, args: Arguments, node: Node, connection: Connection, started: float
    ) -> tuple[Any, _Try | None]:
        """An attempt that needs no wait before its send (a node admits it and its
        pool has a slot free, both already taken): its one wait, for the reply, is
        bounded by the expiry timer instead of a cancel scope."""
        timeout = self._attempt_timeout(node, call, started)
        generation = _NOT_ADMITTED
        pending = None
        error: QdbError | None = None
        result: Any = None
        expires = call.deadline
        try:
            breaker = node.breaker
            if not breaker.allow(started):
                connection.unreserve()
                raise CircuitOpen(
                    f"circuit breaker of {node.address} is open",
                    reopens_in={node.address: _reopens_in(node)},
                )
            generation = breaker.generation
            self.counters.attempts += 1
            node.requests_sent += 1
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
                result = call.parse(result)  # a malformed reply is a corrupted one
        except Expired:
            return self._conclude(
                call, node, generation, pending, None, None, started, started, timeout,
                timed_out=True, ours=expires < call.deadline,
            )  # fmt: skip
        except QdbError as exc:
            error = exc
        except BaseException:
            # The caller's own cancellation: it says nothing about the node.
            if generation != _NOT_ADMITTED:
                self._cancelled(call, node, generation, pending, started, timeout)
            raise
        return self._conclude(
            call, node, generation, pending, error, result, started, started, timeout,
            timed_out=False, ours=False,
        )  # fmt: skip

    async def _attempt_scoped(
        self, call: _Call, args: Arguments, started: float, chosen: Node | None
    ) -> tuple[Any, _Try | None]:
        """An attempt that may wait for a node or a connection: the whole of it
        runs in a cancel scope at the call's deadline, lowered to the attempt
        timeout while it waits to send and again after the send. (``chosen``: the
        node already picked for it, whose pool had no slot free at once.)"""
        node: Node | None = None
        pending = None
        generation = _NOT_ADMITTED
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
                timeout = self._attempt_timeout(node, call, trio.current_time())
                if timeout < call.deadline - started:
                    # Waiting for a connection (a node that accepts but never
                    # answers the handshake) counts too: nothing is sent yet,
                    # so any request may then go elsewhere.
                    scope.deadline = started + timeout
                breaker = node.breaker
                if not breaker.allow(started):
                    raise CircuitOpen(
                        f"circuit breaker of {node.address} is open",
                        reopens_in={node.address: _reopens_in(node)},
                    )
                generation = breaker.generation
                self.counters.attempts += 1
                node.requests_sent += 1
                connection = await node.pool.acquire_slot()
                sent_at = trio.current_time()
                if sent_at >= call.deadline:
                    # trio looks at deadlines once per scheduler pass: a slot
                    # granted in the pass the deadline went by would still send.
                    connection.unreserve()
                    late = True
                    raise _Late
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
                    result = call.parse(result)  # a malformed reply is a corrupted one
            except _Late:
                pass
            except QdbError as exc:
                error = exc
            except BaseException:
                # The caller's own cancellation (our own deadlines are handled
                # below, once): it says nothing about the node.
                if node is not None and generation != _NOT_ADMITTED and not scope.cancel_called:
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

    def _started(
        self,
        call: _Call,
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
        call: _Call,
        node: Node,
        generation: int,
        pending: PendingRequest | None,
        sent_at: float,
        timeout: float,
    ) -> None:
        sent = pending is not None and pending.sent
        outcome = classify(None, sent=sent, cancelled=True)
        now = trio.current_time()
        self._feed(call, node, generation, outcome, None, now, now - sent_at, timeout)

    def _conclude(
        self,
        call: _Call,
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
    ) -> tuple[Any, _Try | None]:
        """What the attempt's end means: ``timed_out`` if a deadline ended it,
        the attempt's own (``ours``) or the call's."""
        now = trio.current_time()
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
        if node is not None and generation != _NOT_ADMITTED:
            self._feed(call, node, generation, outcome, error, now, now - sent_at, timeout)
        request_id = pending.request_id if pending is not None else 0
        return None, _Try(outcome, error, node, sent, started, request_id)

    def _replayed(self, call: _Call, node: Node) -> None:
        """A node answered this keyed write from its stored outcome: an earlier
        attempt (or an earlier call with the key) applied it."""
        self.counters.idempotent_replays += 1
        if self.events.wants(IdempotentReplay):
            self.events.emit(
                IdempotentReplay(trio.current_time(), call.method, node.address, call.key or "")
            )

    def _attempt_timeout(self, node: Node, call: _Call, now: float) -> float:
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
        call: _Call,
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

    # ------------------------------------------------------------ decisions

    def _decide(self, call: _Call, attempt: _Try) -> RetryDecision:
        now = trio.current_time()
        outcome = attempt.outcome
        if outcome.kind is OutcomeKind.CIRCUIT_OPEN:
            self.counters.circuit_rejections += 1
        decision = self.policy.decide(
            call.retries,
            outcome,
            idempotent=call.safe,
            remaining=call.deadline - now,
            rng=self.rng,
            previous_delay=call.previous_delay,
            requeues_done=call.requeues,
            error=attempt.error,
        )
        if decision.retry and not decision.requeue and not self.budget.try_retry(now):
            self.counters.retry_budget_exhausted += 1
            return RetryDecision(False, 0.0, f"{decision.reason}, but the retry budget is spent")
        return decision

    def _record_attempt(self, call: _Call, attempt: _Try, decision: RetryDecision) -> None:
        now = trio.current_time()
        outcome = attempt.outcome
        text = outcome.kind.value if attempt.error is None else _describe(attempt.error)
        call.attempts.append(
            Attempt(
                number=len(call.attempts) + 1,
                node=attempt.node.address if attempt.node is not None else None,
                started=attempt.started - call.start,
                elapsed=now - attempt.started,
                outcome=text,
                retried=decision.retry,
                reason=decision.reason,
                sent=attempt.sent,
                maybe_applied=outcome.maybe_applied and not call.read_only,
            )
        )
        if self.events.wants(RequestFailed):
            self.events.emit(
                RequestFailed(
                    now,
                    call.method,
                    attempt.node.address if attempt.node is not None else "",
                    len(call.attempts),
                    attempt.request_id,
                    now - attempt.started,
                    outcome.kind.value,
                    text,
                    decision.retry,
                )
            )

    def _final(self, call: _Call, attempt: _Try, decision: RetryDecision) -> QdbError:
        """The one error the call raises, with its facts."""
        self.counters.failures += 1
        outcome = attempt.outcome
        error = attempt.error
        kind = outcome.kind
        history = tuple(call.attempts)
        unkeyed_write = not call.read_only and call.key is None
        final: QdbError
        if kind in (OutcomeKind.DEADLINE_BEFORE_SEND, OutcomeKind.DEADLINE_AFTER_SEND):
            self.counters.call_timeouts += 1
            sent = call.sent
            timed_out = RequestTimeout(
                f"{call.method} did not complete within {call.timeout:g} s"
                + (" (sent; outcome unknown)" if sent else " (not sent)"),
                timeout=call.timeout,
                request_sent=sent,
            )
            if unkeyed_write and call.maybe_applied:
                final = self._unknown(
                    call,
                    f"{call.method} was sent to {history[-1].node} but no reply came within"
                    f" {call.timeout:g} s; without an idempotency key it is unknown whether it"
                    " was applied",
                    timed_out,
                )
            else:
                timed_out.attempts = history
                final = timed_out
        elif unkeyed_write and call.maybe_applied:
            final = self._unknown(
                call,
                f"{call.method} reached {history[-1].node} but its outcome was lost ({error});"
                " without an idempotency key it was not retried and may or may not have been"
                " applied",
                error,
            )
        elif outcome.retry is not RetryRule.NEVER or (
            kind in (OutcomeKind.CIRCUIT_OPEN, OutcomeKind.NO_NODE) and call.sent
        ):
            # Retrying stopped on a failure that could have been retried (or
            # nothing was left to try after an attempt that reached a node).
            assert error is not None
            final = RetryExhausted(
                f"{call.method} failed: {decision.reason}", last_error=error, attempts=history
            )
            final.__cause__ = error
        else:
            assert error is not None
            final = error
        final.attempts = history
        final.request_sent = call.sent
        final.maybe_applied = call.maybe_applied
        final.idempotency_key = call.key
        return final

    def _unknown(self, call: _Call, message: str, cause: BaseException | None) -> OutcomeUnknown:
        self.counters.outcome_unknown += 1
        unknown = OutcomeUnknown(message)
        unknown.__cause__ = cause
        return unknown


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


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


def _reopens_in(node: Node) -> float:
    reopens_at = node.breaker.reopens_at()
    return 0.0 if reopens_at is None else max(0.0, reopens_at - trio.current_time())


def retry_backoff(config: ClientConfig) -> Backoff:
    """The backoff between retries that ``config`` asks for (requests, and the
    resumes of streams and subscriptions)."""
    return Backoff(
        initial=config.retry_initial_backoff,
        maximum=config.retry_max_backoff,
        multiplier=config.retry_multiplier,
        jitter=config.retry_jitter,
        factor=config.retry_jitter_factor,
    )


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
