"""Latency estimates, attempt timeouts, and the breaker's correlation and causes. Pure."""

from __future__ import annotations

import math

import pytest

from qdb_client._policies import (
    AttemptTimeouts,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    LatencyTracker,
)

# ------------------------------------------------------------------ latency


def test_reply_time_follows_rfc_6298():
    tracker = LatencyTracker()
    assert tracker.reply_quantile is None and tracker.load is None
    tracker.record_reply(0.1)
    assert (tracker.srtt, tracker.rttvar) == (0.1, 0.05)
    assert tracker.reply_quantile == pytest.approx(0.3)
    tracker.record_reply(0.2)
    # rttvar = 3/4 * 0.05 + 1/4 * |0.1 - 0.2|; srtt = 7/8 * 0.1 + 1/8 * 0.2
    assert tracker.rttvar == pytest.approx(0.0625)
    assert tracker.srtt == pytest.approx(0.1125)


def test_penalties_raise_the_load_but_not_the_reply_time():
    tracker = LatencyTracker()
    tracker.record_reply(0.001)
    tracker.record_penalty(0.25)
    assert tracker.srtt == 0.001
    assert tracker.load == pytest.approx(0.001 + 0.2 * (0.25 - 0.001))


def test_a_penalty_never_makes_a_node_look_faster():
    """latency.py: a penalty says "at least this slow". A node answering in 1 s
    whose callers give up after 50 ms (DEADLINE_AFTER_SEND feeds a penalty of
    the time waited) must not end up looking like a 50 ms node to the
    latency-aware balancer."""
    tracker = LatencyTracker()
    for _ in range(5):
        tracker.record_reply(1.0)
    for _ in range(10):
        tracker.record_penalty(0.05)
    assert tracker.load is not None and tracker.load >= 1.0, tracker.load


def test_attempt_timeout_is_a_multiple_of_the_quantile_with_a_floor():
    timeouts = AttemptTimeouts(factor=3.0, minimum=0.25)
    tracker = LatencyTracker()
    assert timeouts.for_node(tracker) == 0.25  # nothing known: the floor
    assert timeouts.for_node(tracker, fallback=0.5) == pytest.approx(1.5)  # the others' typical
    tracker.record_reply(0.001)
    assert timeouts.for_node(tracker) == 0.25
    tracker.record_reply(0.4)
    assert timeouts.for_node(tracker) == pytest.approx(3.0 * tracker.reply_quantile)
    assert AttemptTimeouts(factor=0).for_node(tracker) == math.inf


# ------------------------------------------------------------------ breaker


def test_failures_sharing_a_correlation_count_once():
    """One connection loss failing N requests is one failure of the node."""
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2))
    reset = object()
    for _ in range(10):
        breaker.record_failure(1.0, cause="connection", correlation=reset)
    assert breaker.state(1.0) is BreakerState.CLOSED
    assert breaker.failed_requests == 10
    breaker.record_failure(2.0, cause="connection", correlation=object())
    assert breaker.state(2.0) is BreakerState.OPEN


def test_a_success_ends_the_run_of_correlated_failures():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2))
    reset = object()
    breaker.record_failure(1.0, cause="connection", correlation=reset)
    breaker.record_success(1.5)
    breaker.record_failure(2.0, cause="connection", correlation=reset)
    assert breaker.state(2.0) is BreakerState.CLOSED  # 1 failure since the success


def test_reachable_node_half_opens_a_breaker_opened_by_connection_failures_only():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, open_timeout=30.0))
    breaker.record_failure(1.0, cause="connection")
    breaker.record_failure(1.0, cause="connection")
    assert breaker.opened_by == frozenset({"connection"})
    assert breaker.node_reachable(2.0)
    assert breaker.state(2.0) is BreakerState.HALF_OPEN


@pytest.mark.parametrize("cause", ["slow", "overload"])
def test_reachable_node_does_not_half_open_a_breaker_opened_by_silence_or_overload(cause):
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, open_timeout=30.0))
    breaker.record_failure(1.0, cause="connection")
    breaker.record_failure(1.0, cause=cause)
    assert not breaker.node_reachable(2.0)
    assert breaker.state(2.0) is BreakerState.OPEN
    assert breaker.state(31.0) is BreakerState.HALF_OPEN  # the timeout still applies


def test_a_correlated_failure_in_half_open_frees_its_probe_slot():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=1, open_timeout=1.0))
    reset = object()
    breaker.record_failure(0.0, cause="connection", correlation=reset)
    assert breaker.state(1.0) is BreakerState.HALF_OPEN
    assert breaker.allow(1.0)
    breaker.record_failure(1.0, breaker.generation, cause="connection", correlation=reset)
    # A new run after the state change: the key counts again, and reopens.
    assert breaker.state(1.0) is BreakerState.OPEN


def test_a_failure_that_may_not_open_counts_in_the_run_without_opening():
    """Silence on the last node left (``may_open=False``): the run goes on, the
    breaker stays CLOSED, and the next failure allowed to open it does."""
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2))
    for _ in range(3):
        breaker.record_failure(1.0, cause="slow", may_open=False)
    assert breaker.state(1.0) is BreakerState.CLOSED
    assert breaker.failed_requests == 3
    breaker.record_failure(2.0, cause="slow")
    assert breaker.state(2.0) is BreakerState.OPEN


def test_a_failure_that_may_not_open_leaves_half_open_and_frees_its_probe():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=1, open_timeout=1.0))
    breaker.record_failure(0.0, cause="slow")
    assert breaker.state(1.0) is BreakerState.HALF_OPEN and breaker.allow(1.0)
    breaker.record_failure(1.0, breaker.generation, cause="slow", may_open=False)
    assert breaker.state(1.0) is BreakerState.HALF_OPEN
    assert breaker.would_allow(1.0)  # the probe slot is free again


def test_rejudge_half_opens_a_breaker_that_silence_alone_opened():
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, open_timeout=30.0))
    breaker.record_failure(1.0, cause="slow")
    breaker.record_failure(1.0, cause="slow")
    assert breaker.rejudge(2.0)
    assert breaker.state(2.0) is BreakerState.HALF_OPEN
    assert not breaker.rejudge(2.0)  # only an OPEN breaker moves


@pytest.mark.parametrize("other", ["connection", "overload"])
def test_rejudge_leaves_a_breaker_that_other_evidence_opened_too(other):
    """A node that also failed or refused work is not merely slower than the others."""
    breaker = CircuitBreaker(BreakerSettings(failure_threshold=2, open_timeout=30.0))
    breaker.record_failure(1.0, cause="slow")
    breaker.record_failure(1.0, cause=other)
    assert not breaker.rejudge(2.0)
    assert breaker.state(2.0) is BreakerState.OPEN
