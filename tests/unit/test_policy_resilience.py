"""Pure resilience policies: retry decisions, circuit breaker, retry budget.

Test names carry the seed ids they trace to: TC-TR-xxx (seed 000, transport
failures) and the test names of seed 003 (reliability invariants).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdb_client._policies import (
    Backoff,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    RetryBudget,
    RetryBudgetSettings,
    RetryPolicy,
    classify,
)
from qdb_client.errors import (
    ConnectError,
    ConnectionLost,
    PoolTimeout,
    ServerError,
    server_error_from_wire,
)
from qdb_client.protocol import ErrorCode

RNG = random.Random(3)


def decide(policy: RetryPolicy, retries: int, error: Exception, *, sent: bool = True, **kw):
    """The policy's decision after an attempt that failed with ``error``."""
    return policy.decide(retries, classify(error, sent=sent), error=error, **kw)


def server_error(code: ErrorCode, **extra) -> ServerError:
    return server_error_from_wire(
        code=code.code, name=code.value, message="x", retryable=code.retryable, **extra
    )


# ------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "code",
    [ErrorCode.TIMEOUT, ErrorCode.OVERLOADED, ErrorCode.INTERNAL, ErrorCode.UNAVAILABLE],
)
def test_retryable_error_codes(code):
    """seed 003 test_retryable_error_codes: 408/429/500/503 classes are retried
    (a write without a key only when the error says nothing ran: not INTERNAL)."""
    error = server_error(code)
    decision = decide(RetryPolicy(), 0, error, idempotent=True, remaining=5.0, rng=RNG)
    assert decision.retry, decision.reason
    unkeyed = decide(RetryPolicy(), 0, error, idempotent=False, remaining=5.0, rng=RNG)
    assert unkeyed.retry is (code is not ErrorCode.INTERNAL), unkeyed.reason


@pytest.mark.parametrize(
    "code",
    [
        ErrorCode.PARSE_ERROR,
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.METHOD_NOT_FOUND,
        ErrorCode.CONFLICT,
        ErrorCode.SQL_ERROR,
        ErrorCode.CONSTRAINT_VIOLATION,
    ],
)
def test_non_retryable_error_codes(code):
    """seed 003 test_non_retryable_error_codes: 400/401/403/404/409/422 are not."""
    decision = decide(RetryPolicy(), 0, server_error(code), idempotent=True, remaining=5.0, rng=RNG)
    assert not decision.retry and "not retryable" in decision.reason


def test_max_retries_exceeded():
    """seed 003 test_max_retries_exceeded / TC-TR-006: attempts = 1 + max_retries."""
    policy = RetryPolicy(max_retries=3)
    error = server_error(ErrorCode.UNAVAILABLE)
    decisions = [decide(policy, n, error, idempotent=True, remaining=60, rng=RNG) for n in range(4)]
    assert [d.retry for d in decisions] == [True, True, True, False]
    assert "all 3 retries are used" in decisions[3].reason


def test_exponential_backoff_retry():
    """seed 003 test_exponential_backoff_retry: 100, 200, 400 ms without jitter."""
    policy = RetryPolicy(backoff=Backoff(initial=0.1, maximum=5.0, jitter="none"))
    error = ConnectError("refused")
    delays = [
        decide(policy, n, error, sent=False, idempotent=False, remaining=60, rng=RNG).delay
        for n in range(3)
    ]
    assert delays == pytest.approx([0.1, 0.2, 0.4])


@given(retries=st.integers(0, 2), seed=st.integers(0, 2**32))
def test_jitter_backoff(retries, seed):
    """seed 003 test_jitter_backoff: each delay within +-10% of its base."""
    policy = RetryPolicy()
    decision = decide(
        policy,
        retries,
        ConnectError("x"),
        sent=False,
        idempotent=False,
        remaining=60,
        rng=random.Random(seed),
    )
    base = 0.1 * 2**retries
    assert abs(decision.delay - base) <= base * 0.1 + 1e-12


def test_write_sent_without_key_is_not_retried():
    policy = RetryPolicy()
    lost = ConnectionLost("reset", request_sent=True)
    assert not decide(policy, 0, lost, idempotent=False, remaining=5, rng=RNG).retry
    assert decide(policy, 0, lost, idempotent=True, remaining=5, rng=RNG).retry
    unsent = ConnectionLost("reset", request_sent=False)
    assert decide(policy, 0, unsent, sent=False, idempotent=False, remaining=5, rng=RNG).retry
    pool_timeout = PoolTimeout("t", node="a", in_use="u")
    assert decide(policy, 0, pool_timeout, sent=False, idempotent=False, remaining=5, rng=RNG).retry


def test_no_attempt_starts_when_the_deadline_cannot_fit_it():
    policy = RetryPolicy(backoff=Backoff(initial=0.1, maximum=5.0, jitter="none"))
    error = server_error(ErrorCode.UNAVAILABLE)
    assert decide(policy, 0, error, idempotent=True, remaining=0.2, rng=RNG).retry
    decision = decide(policy, 0, error, idempotent=True, remaining=0.105, rng=RNG)
    assert not decision.retry and "can't fit" in decision.reason


def test_retry_after_from_the_server_is_honoured():
    policy = RetryPolicy(backoff=Backoff(initial=0.1, maximum=5.0, jitter="none"))
    error = server_error(ErrorCode.OVERLOADED, retry_after_ms=750)
    assert decide(policy, 0, error, idempotent=True, remaining=5, rng=RNG).delay == 0.75


# ------------------------------------------------------------------- breaker


def test_circuit_opens_after_threshold():
    """TC-TR-008 / seed 003 test_circuit_breaker_opens_on_failures."""
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=5))
    for n in range(5):
        assert breaker.allow(n)
        breaker.record_failure(n)
    assert breaker.state(5) is BreakerState.OPEN
    assert not breaker.allow(5.1)


def test_successes_between_failures_keep_it_closed():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=3))
    for n in range(10):
        breaker.allow(n)
        (breaker.record_failure if n % 2 else breaker.record_success)(n)
    assert breaker.state(10) is BreakerState.CLOSED


def test_circuit_half_open_exactly_at_open_timeout_then_closes():
    """TC-TR-009 / seed 003 test_circuit_breaker_closes_on_successes."""
    breaker = CircuitBreaker(
        BreakerSettings(failure_threshold=3, success_threshold=2, open_timeout=30)
    )
    for _ in range(3):
        breaker.allow(100.0)
        breaker.record_failure(100.0)
    assert breaker.state(129.999) is BreakerState.OPEN
    assert breaker.state(130.0) is BreakerState.HALF_OPEN
    assert breaker.allow(130.0)
    assert not breaker.allow(130.0)  # one probe at a time
    breaker.record_success(130.1)
    assert breaker.state(130.1) is BreakerState.HALF_OPEN
    assert breaker.allow(130.2)
    breaker.record_success(130.2)
    assert breaker.state(130.2) is BreakerState.CLOSED
    assert [s for _, s in breaker.transitions] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_half_open_failure_reopens_for_a_full_timeout():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=1, open_timeout=10))
    breaker.allow(0)
    breaker.record_failure(0)
    assert breaker.allow(10)
    breaker.record_failure(10.5)
    assert breaker.state(20.4) is BreakerState.OPEN
    assert breaker.reopens_at() == 20.5
    assert breaker.state(20.5) is BreakerState.HALF_OPEN


def test_circuit_breaker_metrics():
    """seed 003 test_circuit_breaker_metrics: 10 failing calls, threshold 3."""
    breaker = CircuitBreaker(
        BreakerSettings(failure_threshold=3, success_threshold=2, open_timeout=60)
    )
    for n in range(10):
        if breaker.allow(n):
            breaker.record_failure(n)
    metrics = breaker.metrics(10)
    assert metrics["total_requests"] == 10
    assert metrics["successful_requests"] == 0
    assert metrics["failed_requests"] == 3
    assert metrics["circuit_open_requests"] == 7
    assert metrics["current_state"] == "OPEN"


# -------------------------------------------------------------------- budget


def test_retry_budget_caps_retries_when_everything_fails():
    """With every request failing, retries stay within ratio * requests + floor."""
    settings = RetryBudgetSettings(ratio=0.2, min_per_second=1.0, ttl=10.0)
    budget = RetryBudget(settings)
    retries = 0
    requests = 0
    now = 0.0
    for _ in range(1000):  # 100 requests/s for 10 s, each wanting 3 retries
        budget.record_request(now)
        requests += 1
        for _ in range(3):
            if budget.try_retry(now):
                retries += 1
        now += 0.01
    assert retries <= 0.2 * requests + 1.0 * 10.0
    assert retries >= 0.2 * requests  # and the budget is actually usable
    assert budget.exhausted > 0


def test_retry_budget_floor_lets_a_quiet_client_retry():
    budget = RetryBudget(RetryBudgetSettings(ratio=0.2, min_per_second=1.0, ttl=10.0))
    budget.record_request(0.0)
    assert sum(budget.try_retry(0.0) for _ in range(20)) == 10


def test_retry_budget_window_slides():
    budget = RetryBudget(RetryBudgetSettings(ratio=0.0, min_per_second=0.5, ttl=4.0))
    assert [budget.try_retry(0.0) for _ in range(3)] == [True, True, False]
    assert not budget.try_retry(3.9)
    assert budget.try_retry(4.0)  # the retries of second 0 left the window


def test_stale_records_do_not_steer_a_newer_state():
    """A request admitted while CLOSED that ends after the breaker went
    HALF_OPEN neither frees a probe slot nor counts towards closing."""
    breaker = CircuitBreaker(
        BreakerSettings(failure_threshold=1, success_threshold=1, open_timeout=5)
    )
    assert breaker.allow(0)
    old = breaker.generation
    assert breaker.allow(0)
    breaker.record_failure(0, breaker.generation)  # opens
    assert breaker.state(5) is BreakerState.HALF_OPEN
    assert breaker.allow(5)  # the one probe
    breaker.record_success(5, old)  # the stale request from before
    assert breaker.state(5) is BreakerState.HALF_OPEN
    assert not breaker.allow(5)  # its probe slot wasn't freed by the stale record
    assert breaker.successful_requests == 1  # still counted in the metrics


def test_circuit_open_is_never_retried():
    from qdb_client.errors import CircuitOpen

    decision = decide(
        RetryPolicy(),
        0,
        CircuitOpen("open", reopens_in={"a:1": 3.0}),
        sent=False,
        idempotent=True,
        remaining=5,
        rng=RNG,
    )
    assert not decision.retry and "circuit breaker" in decision.reason
