"""Retries, breakers, budget, deadlines and bulkheads through the client, in
virtual time against scripted nodes. Names trace to seed 000 (TC-TR-xxx) and
seed 003 scenarios."""

from __future__ import annotations

import functools

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import (
    BulkheadFull,
    CircuitOpen,
    OutcomeUnknown,
    RequestTimeout,
    RetryExhausted,
    SqlError,
    Unavailable,
)
from qdb_client.protocol import ErrorCode, Request

from .fake_network import FakeNetwork, echo, never_answer
from .fake_peer import FakeNode

# No jitter: backoff delays exact. No slow start: plain round robin.
EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


def failing(code: ErrorCode, times: int, calls: list[tuple[float, str]]):
    """A handler failing the first ``times`` requests it sees, then echoing."""

    async def handler(node: FakeNode, request: Request) -> None:
        calls.append((trio.current_time(), node.node_id))
        if len(calls) <= times:
            await node.fail(request, code, "injected")
        else:
            await echo(node, request)

    return handler


async def test_retry_on_transient_backend_error_with_exponential_backoff(network, autojump_clock):
    """TC-TR-004 / seed 001 property 27: two 503s, then success; sleeps 100 + 200 ms."""
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.UNAVAILABLE, 2, calls)
    async with qdb_client.open_client("a:1", **EXACT) as client:
        start = trio.current_time()
        result = await client._call("query", {}, None, read_only=True)
        assert result["method"] == "query"
        assert [t - start for t, _ in calls] == pytest.approx([0.0, 0.1, 0.3])
        assert client.statistics()["retries"] == 2


async def test_retry_with_different_backend(network, autojump_clock):
    """TC-TR-007: a retry goes to another node; the caller sees no failure."""
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.UNAVAILABLE, 1, calls)
    network.handlers["b:2"] = failing(ErrorCode.UNAVAILABLE, 1, calls)
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        await client._call("query", {}, None, read_only=True)
        assert [node for _, node in calls] == ["fake-a:1", "fake-b:2"]


async def test_retry_exhaustion_carries_attempts_and_last_error(network, autojump_clock):
    """TC-TR-006 / seed 003 test_max_retries_exceeded: 1 + 3 attempts, then RetryExhausted."""
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.UNAVAILABLE, 100, calls)
    async with qdb_client.open_client("a:1", breaker_failure_threshold=100, **EXACT) as client:
        with pytest.raises(RetryExhausted) as info:
            await client._call("query", {}, None, read_only=True)
    error = info.value
    assert len(calls) == 4 and len(error.attempts) == 4
    assert isinstance(error.last_error, Unavailable) and error.__cause__ is error.last_error
    assert [a.retried for a in error.attempts] == [True, True, True, False]
    assert "all 3 retries are used" in error.attempts[-1].reason
    assert [a.started for a in error.attempts] == pytest.approx([0.0, 0.1, 0.3, 0.7])
    assert all(a.node == "a:1" for a in error.attempts)
    assert "4 attempt(s)" in str(error)


async def test_non_retryable_error_is_raised_at_once_with_its_history(network, autojump_clock):
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.SQL_ERROR, 100, calls)
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(SqlError) as info:
            await client._call("query", {}, None, read_only=True)
    assert len(calls) == 1
    assert len(info.value.attempts) == 1 and not info.value.attempts[0].retried
    assert "not retryable" in info.value.attempts[0].reason


async def test_one_deadline_covers_all_attempts(network, autojump_clock):
    """No attempt starts when the remaining budget can't fit the backoff."""
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.UNAVAILABLE, 100, calls)
    options = dict(EXACT, retry_initial_backoff=0.4, max_retries=10, breaker_failure_threshold=100)
    async with qdb_client.open_client("a:1", request_timeout=1.0, **options) as client:
        start = trio.current_time()
        with pytest.raises(RetryExhausted) as info:
            await client._call("query", {}, None, read_only=True)
        # attempts at 0 and 0.4; the next backoff (0.8) would end past 1.0.
        assert [t - start for t, _ in calls] == pytest.approx([0.0, 0.4])
        assert trio.current_time() - start == pytest.approx(0.4)
        assert "can't fit" in info.value.attempts[-1].reason


async def test_remaining_budget_shrinks_across_attempts(network, autojump_clock):
    seen: list[int] = []

    async def record(node: FakeNode, request: Request) -> None:
        seen.append(request.deadline_ms)
        if len(seen) == 1:
            await node.fail(request, ErrorCode.UNAVAILABLE, "once")
        else:
            await echo(node, request)

    network.handlers["a:1"] = record
    async with qdb_client.open_client("a:1", request_timeout=2.0, **EXACT) as client:
        await client._call("query", {}, None, read_only=True)
    assert seen == [2000, 1900]


async def test_write_without_key_whose_reply_is_lost_is_outcome_unknown(network, autojump_clock):
    network.handlers["a:1"] = never_answer
    async with qdb_client.open_client("a:1", request_timeout=1.0, **EXACT) as client:
        with pytest.raises(OutcomeUnknown) as info:
            await client.execute("insert into t values (1)", idempotency_key=False)
        assert isinstance(info.value.__cause__, RequestTimeout)
        # A read that times out is a plain RequestTimeout.
        with pytest.raises(RequestTimeout) as timeout_info:
            await client.query("select 1")
        assert not isinstance(timeout_info.value, OutcomeUnknown)
        assert client.statistics()["outcome_unknown"] == 1


async def test_keyed_write_is_retried_after_a_lost_reply_with_the_same_key(
    network: FakeNetwork, autojump_clock
):
    keys: list[str | None] = []

    async def drop_first(node: FakeNode, request: Request) -> None:
        keys.append(request.idempotency_key)
        if len(keys) == 1:
            await node.stream.aclose()
        else:
            await node.reply(request, {"rows_affected": 1, "last_insert_id": 9})

    network.handlers["a:1"] = drop_first
    network.handlers["b:2"] = drop_first
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        result = await client.execute("insert into t values (1)")
    assert result.rows_affected == 1
    assert len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("qdb-")


async def test_malformed_idempotency_key_is_rejected_before_sending(network):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(qdb_client.InvalidArgument):
            await client.execute("insert", idempotency_key="has spaces")
        with pytest.raises(qdb_client.InvalidArgument):
            await client.execute("insert", idempotency_key="x" * 129)


async def test_circuit_opens_after_threshold_and_fails_fast(network, autojump_clock):
    """TC-TR-008: after 5 failures the node's breaker opens; requests fail fast."""
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.INTERNAL, 1000, calls)
    async with qdb_client.open_client("a:1", max_retries=0, **EXACT) as client:
        for _ in range(5):
            with pytest.raises(RetryExhausted):
                await client._call("query", {}, None, read_only=True)
        started = trio.current_time()
        with pytest.raises(CircuitOpen) as info:
            await client._call("query", {}, None, read_only=True)
        assert trio.current_time() == started  # no waiting
        assert len(calls) == 5
        assert info.value.reopens_in["a:1"] == pytest.approx(30.0)
        breaker = client.statistics()["nodes"][0]["breaker"]
        assert breaker["current_state"] == "OPEN" and breaker["failed_requests"] == 5


async def test_circuit_half_open_exactly_at_timeout_then_closes(network, autojump_clock):
    """TC-TR-009: half-open at open_timeout; 2 successes close it."""
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.INTERNAL, 5, calls)
    async with qdb_client.open_client("a:1", max_retries=0, **EXACT) as client:
        for _ in range(5):
            with pytest.raises(RetryExhausted):
                await client._call("query", {}, None, read_only=True)
        opened = trio.current_time()
        await trio.sleep(29.999)
        with pytest.raises(CircuitOpen):
            await client._call("query", {}, None, read_only=True)
        await trio.sleep(opened + 30.0 - trio.current_time())
        await client._call("query", {}, None, read_only=True)
        node = client.statistics()["nodes"][0]
        assert node["breaker"]["current_state"] == "HALF_OPEN"
        await client._call("query", {}, None, read_only=True)
        assert client.statistics()["nodes"][0]["breaker"]["current_state"] == "CLOSED"


async def test_circuit_prevents_cascade_failures(network, autojump_clock):
    """TC-TR-010: a failing node doesn't slow or break requests to healthy ones."""
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.INTERNAL, 10**6, calls)
    network.handlers["b:2"] = echo
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        start = trio.current_time()
        for _ in range(40):
            await client._call("query", {}, None, read_only=True)
        # Each failure on a:1 costs one 100 ms backoff until its breaker opens.
        assert len(calls) == 5
        assert trio.current_time() - start == pytest.approx(0.5)
        states = {n["address"]: n["breaker"]["current_state"] for n in client.statistics()["nodes"]}
        assert states == {"a:1": "OPEN", "b:2": "CLOSED"}


async def test_retries_stay_within_the_budget_when_everything_fails(network, autojump_clock):
    calls: list[tuple[float, str]] = []
    network.handlers["a:1"] = failing(ErrorCode.UNAVAILABLE, 10**6, calls)
    options = dict(
        EXACT,
        breaker_failure_threshold=10**6,
        retry_budget_ratio=0.2,
        retry_budget_min_per_second=1.0,
        retry_budget_window=10.0,
        retry_initial_backoff=0.001,
    )
    async with qdb_client.open_client("a:1", **options) as client:
        for _ in range(100):
            with pytest.raises(RetryExhausted):
                await client._call("query", {}, None, read_only=True)
        stats = client.statistics()
    # 100 calls; without a budget 300 retries; with it at most 20% + 10 floor.
    assert stats["retries"] <= 0.2 * 100 + 10
    assert len(calls) == 100 + stats["retries"]
    assert stats["retry_budget_exhausted"] > 0


async def test_client_bulkhead_refuses_over_the_cap(network, autojump_clock):
    async def slow(node: FakeNode, request: Request) -> None:
        await trio.sleep(1.0)
        await echo(node, request)

    network.handlers["a:1"] = slow
    async with (
        qdb_client.open_client("a:1", max_concurrent_requests=3, **EXACT) as client,
        trio.open_nursery() as nursery,
    ):
        for _ in range(3):
            nursery.start_soon(functools.partial(client._call, "query", {}, None, read_only=True))
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(BulkheadFull, match="max_concurrent_requests=3"):
            await client._call("query", {}, None, read_only=True)
        assert client.statistics()["bulkhead_rejections"] == 1


async def test_closing_the_client_under_an_unkeyed_write_reports_an_unknown_outcome(network):
    network.handlers["a:1"] = never_answer
    outcomes: list[BaseException] = []
    async with qdb_client.open_client("a:1", **EXACT) as client:

        async def write() -> None:
            try:
                await client.execute("insert into t values (1)", idempotency_key=False)
            except qdb_client.QdbError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()  # inside the block: the block itself goes on
        assert client.statistics()["closed"]
    assert len(outcomes) == 1 and isinstance(outcomes[0], OutcomeUnknown)
