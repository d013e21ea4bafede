"""The request pipeline of one client call.

deadline -> pick a node (balancer over healthy nodes whose breaker admits)
-> breaker admission -> pool slot -> send with the remaining budget ->
reply, or a retry decision (policy, budget, deadline) -> backoff -> again,
preferably on another node.

Every attempt is recorded; every error that leaves the pipeline carries the
list, so a failure says what was tried, where, and why it stopped.
"""

from __future__ import annotations

import math
import random
from typing import Any

import attrs
import trio

from ._cluster import Cluster, Node
from ._policies import RetryBudget, RetryDecision, RetryPolicy, request_reached_node
from ._transport import PendingRequest
from .errors import (
    Attempt,
    CircuitOpen,
    ClientClosed,
    MessageError,
    OutcomeUnknown,
    PoolError,
    QdbError,
    RequestTimeout,
    RetryExhausted,
    ServerError,
    TransportError,
)

__all__ = ["PipelineCounters", "RequestPipeline"]


@attrs.define
class PipelineCounters:
    """Totals across all calls of one client."""

    calls: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    outcome_unknown: int = 0
    retry_budget_exhausted: int = 0
    circuit_rejections: int = 0


class _Try:
    """The attempt in progress, so a deadline can say what it interrupted."""

    __slots__ = ("node", "pending", "started")

    def __init__(self, started: float) -> None:
        self.node: Node | None = None
        self.pending: PendingRequest | None = None
        self.started = started

    @property
    def sent(self) -> bool:
        return self.pending is not None and self.pending.sent


class RequestPipeline:
    """Runs calls with retries, breakers and one deadline."""

    def __init__(
        self,
        cluster: Cluster,
        *,
        policy: RetryPolicy,
        budget: RetryBudget,
        rng: random.Random,
    ) -> None:
        self.cluster = cluster
        self.policy = policy
        self.budget = budget
        self.rng = rng
        self.counters = PipelineCounters()

    async def call(
        self,
        method: str,
        args: dict[str, Any],
        *,
        budget_seconds: float,
        idempotent: bool,
        idempotency_key: str | None = None,
    ) -> Any:
        """Run ``method`` until it succeeds or retrying must stop."""
        timeout = budget_seconds
        start = trio.current_time()
        deadline = start + timeout
        safe = idempotent or idempotency_key is not None
        attempts: list[Attempt] = []
        tried: list[Node] = []
        previous_delay: float | None = None
        sent_before = False  # did an earlier attempt reach a node?
        self.counters.calls += 1
        self.budget.record_request(start)
        current = _Try(start)
        try:
            with trio.fail_at(deadline):
                while True:
                    current = _Try(trio.current_time())
                    try:
                        node = await self.cluster.select(exclude=tried)
                        current.node = node
                        result = await self._attempt(
                            node, method, args, deadline, idempotency_key, current
                        )
                    except QdbError as exc:
                        error: QdbError = exc
                    else:
                        return result  # attempts are only reported with errors
                    decision = self._decide(len(attempts), error, safe, deadline, previous_delay)
                    attempts.append(
                        self._record(
                            attempts,
                            current,
                            start,
                            _describe(error),
                            decision.retry,
                            decision.reason,
                        )
                    )
                    if not decision.retry:
                        raise self._final(method, error, attempts, safe, decision, current.sent)
                    self.counters.retries += 1
                    sent_before = sent_before or current.sent
                    previous_delay = decision.delay
                    if current.node is not None:
                        tried.append(current.node)
                    await trio.sleep(decision.delay)
        except trio.TooSlowError as exc:
            self.counters.failures += 1
            sent = current.sent or sent_before
            attempts.append(
                self._record(
                    attempts,
                    current,
                    start,
                    "interrupted by the deadline",
                    False,
                    f"the {timeout:g} s deadline passed",
                )
            )
            timed_out = RequestTimeout(
                f"{method} did not complete within {timeout:g} s"
                + (" (sent; outcome unknown)" if sent else " (not sent)"),
                timeout=timeout,
                request_sent=sent,
            )
            timed_out.attempts = tuple(attempts)
            if sent and not safe:
                self.counters.outcome_unknown += 1
                unknown = OutcomeUnknown(
                    f"{method} was sent to {current.node.address if current.node else '?'} but"
                    f" no reply came within {timeout:g} s; without an idempotency key it is"
                    " unknown whether it was applied"
                )
                unknown.attempts = tuple(attempts)
                raise unknown from timed_out
            raise timed_out from exc

    def _decide(
        self,
        done: int,
        error: QdbError,
        safe: bool,
        deadline: float,
        previous_delay: float | None,
    ) -> RetryDecision:
        now = trio.current_time()
        if isinstance(error, CircuitOpen):
            self.counters.circuit_rejections += 1
        decision = self.policy.decide(
            done,
            error,
            idempotent=safe,
            remaining=deadline - now,
            rng=self.rng,
            previous_delay=previous_delay,
        )
        if decision.retry and not self.budget.try_retry(now):
            self.counters.retry_budget_exhausted += 1
            return RetryDecision(False, 0.0, f"{decision.reason}, but the retry budget is spent")
        return decision

    async def _attempt(
        self,
        node: Node,
        method: str,
        args: dict[str, Any],
        deadline: float,
        idempotency_key: str | None,
        current: _Try,
    ) -> Any:
        breaker = node.breaker
        admitted = breaker.allow(trio.current_time())
        generation = breaker.generation
        if not admitted:
            raise CircuitOpen(
                f"circuit breaker of {node.address} is open",
                reopens_in={node.address: _reopens_in(node)},
            )
        self.counters.attempts += 1
        node.requests_sent += 1
        verdict = "ignored"
        pool = node.pool
        try:
            token, connection = await pool.acquire_slot()
            try:
                remaining_ms = max(1, math.ceil((deadline - trio.current_time()) * 1000))
                current.pending = await connection.send_request(
                    method, args, deadline_ms=remaining_ms, idempotency_key=idempotency_key
                )
                result = await current.pending.wait()
            finally:
                pool.release_slot(token)
            verdict = "success"
            return result
        except ServerError as exc:
            # A SQL error says nothing bad about the node; an overload does.
            verdict = "failure" if exc.retryable else "success"
            raise
        except PoolError:
            # Our own pool was congested: says nothing about the node.
            raise
        except (TransportError, MessageError):
            verdict = "failure"
            node.failures += 1
            raise
        finally:
            now = trio.current_time()
            if verdict == "success":
                breaker.record_success(now, generation)
                node.record_latency(now - current.started)
            elif verdict == "failure":
                breaker.record_failure(now, generation)
            else:
                breaker.record_ignored(generation)

    def _record(
        self,
        attempts: list[Attempt],
        current: _Try,
        start: float,
        outcome: str,
        retried: bool,
        reason: str,
    ) -> Attempt:
        now = trio.current_time()
        return Attempt(
            number=len(attempts) + 1,
            node=current.node.address if current.node is not None else None,
            started=current.started - start,
            elapsed=now - current.started,
            outcome=outcome,
            retried=retried,
            reason=reason,
        )

    def _final(
        self,
        method: str,
        error: QdbError,
        attempts: list[Attempt],
        safe: bool,
        decision: RetryDecision,
        sent: bool,
    ) -> QdbError:
        self.counters.failures += 1
        history = tuple(attempts)
        lost_reply = (
            isinstance(error, (TransportError, MessageError)) and request_reached_node(error)
        ) or (isinstance(error, ClientClosed) and sent)  # closed while the write was out
        if not safe and lost_reply:
            self.counters.outcome_unknown += 1
            unknown = OutcomeUnknown(
                f"{method} reached {attempts[-1].node} but its reply was lost ({error});"
                " without an idempotency key it was not retried and may or may not have been"
                " applied"
            )
            unknown.__cause__ = error
            unknown.attempts = history
            return unknown
        retryable, _ = self.policy.classify(error, idempotent=safe)
        if retryable:
            exhausted = RetryExhausted(
                f"{method} failed: {decision.reason}", last_error=error, attempts=history
            )
            exhausted.__cause__ = error
            return exhausted
        error.attempts = history
        return error


def _describe(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"[:300]


def _reopens_in(node: Node) -> float:
    reopens_at = node.breaker.reopens_at()
    return 0.0 if reopens_at is None else max(0.0, reopens_at - trio.current_time())
