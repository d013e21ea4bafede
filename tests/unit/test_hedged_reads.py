"""Hedged reads, in virtual time against scripted nodes: a read with no answer
``hedge_delay`` after it started goes to another node too, the first answer
wins and the other copies are cancelled on their nodes."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import qdb_client
from qdb_client.errors import ConfigError, QdbError, RequestTimeout, SqlError
from qdb_client.events import Event, RequestHedged
from qdb_client.protocol import Cancel, ErrorCode, Request
from qdb_client.protocol.server_errors import error_message

from .fake_network import FakeNetwork, echo
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


class Node:
    """A scripted node: answers after ``delay`` (never when None), or fails with
    ``error``; records the requests it got and the CANCELs."""

    def __init__(
        self,
        network: FakeNetwork,
        delay: float | None = 0.0,
        error: ErrorCode | None = None,
        confirms: bool | None = None,
    ) -> None:
        self.network = network
        #: Whether it answers a CANCEL with CANCELLED (by default when it answers at all).
        self.confirms = delay is not None if confirms is None else confirms
        self.delay = delay
        self.error = error
        self.requests: list[float] = []
        self.cancels: list[int] = []

    async def __call__(self, node: FakeNode, request: Request) -> None:
        self.requests.append(trio.current_time())
        if self.delay is None:
            return
        if self.delay:
            self.network.nursery.start_soon(self._later, node, request)
            return
        await self._answer(node, request)

    async def _later(self, node: FakeNode, request: Request) -> None:
        await trio.sleep(self.delay or 0)
        if request.request_id not in self.cancels:
            await self._answer(node, request)

    async def _answer(self, node: FakeNode, request: Request) -> None:
        if self.error is not None:
            await node.fail(request, self.error, "no such table: t")
        else:
            await echo(node, request)

    async def frame(self, node: FakeNode, message: Any) -> None:
        if isinstance(message, Cancel):
            self.cancels.append(message.request_id)
            if self.confirms:  # a live node confirms it stopped the request
                await node.send(
                    error_message(
                        message.request_id,
                        ErrorCode.CANCELLED,
                        "cancelled",
                        details={"executed": False},
                    )
                )


def node_stats(client: qdb_client.Client, address: str) -> dict:
    return next(n for n in client.statistics()["nodes"] if n["address"] == address)


async def timed_read(client: qdb_client.Client, budget: float = 1.0) -> tuple[Any, float]:
    started = trio.current_time()
    try:
        result: Any = await client._call("query", {}, budget, read_only=True)
    except QdbError as exc:
        result = exc
    return result, trio.current_time() - started


@pytest.fixture
def hedges() -> list[Event]:
    return []


def listen(events: list[Event]) -> Any:
    def listener(event: Event) -> None:
        if isinstance(event, RequestHedged):
            events.append(event)

    return listener


async def test_a_stalled_node_costs_a_read_the_hedge_delay_not_the_attempt_timeout(
    network: FakeNetwork, autojump_clock, hedges
):
    """Reads that start on a node that never answers are answered by their
    hedge after 0.05 s; without hedges each would wait the 0.25 s attempt
    timeout. The stalled node's requests are cancelled there."""
    stalled = Node(network, delay=None)
    network.handlers["good:1"] = echo
    network.handlers["stalled:2"] = stalled
    async with qdb_client.open_client(
        ["good:1", "stalled:2"], hedge_delay=0.05, listeners=[listen(hedges)], **EXACT
    ) as client:
        outcomes = [await timed_read(client) for _ in range(10)]
        assert all(isinstance(result, dict) for result, _ in outcomes), outcomes
        waits = sorted({round(elapsed, 6) for _, elapsed in outcomes})
        assert waits == [0.0, 0.05]
        stats = client.statistics()
        assert stats["hedges"] == stats["hedge_wins"] == len(hedges) >= 1
        assert stats["attempt_timeouts"] == 0
        assert all(h.waiting_on == ("stalled:2",) and h.hedge == 1 for h in hedges)
        assert all(h.waited == pytest.approx(0.05) for h in hedges)
        await trio.sleep(0.01)
        assert len(stalled.cancels) == len(stalled.requests) == len(hedges)
        assert stats["failures"] == 0 and stats["calls"] == 10


async def test_copies_that_lose_to_faster_hedges_open_the_stalled_nodes_breaker(
    network: FakeNetwork, autojump_clock
):
    """A copy that loses to a hedge answered faster counts against its node (it
    was slower than the other node by at least the hedge delay): five reads
    that meet the stalled node in a row open its breaker, though it confirms
    every CANCEL; reads then go elsewhere."""
    stalled = Node(network, delay=None, confirms=True)
    network.handlers["good:1"] = echo
    network.handlers["stalled:2"] = stalled
    async with qdb_client.open_client(["good:1", "stalled:2"], hedge_delay=0.05, **EXACT) as client:
        for _ in range(40):
            result, _ = await timed_read(client)
            assert isinstance(result, dict)
        breaker = node_stats(client, "stalled:2")["breaker"]
        assert breaker["current_state"] == "OPEN"
        assert node_stats(client, "good:1")["breaker"]["failed_requests"] == 0
        sent_there = len(stalled.requests)
        for _ in range(10):
            await timed_read(client)
        assert len(stalled.requests) == sent_there  # open: nothing more goes there


async def test_a_copy_that_loses_to_a_faster_one_is_cancelled_and_not_blamed(
    network: FakeNetwork, autojump_clock, hedges
):
    """Both nodes answer in 0.1 s; the hedge sent at 0.05 s loses to the first
    copy, is cancelled on its node, and neither node's breaker counts a failure."""
    first, second = Node(network, delay=0.1), Node(network, delay=0.1)
    network.handlers["a:1"] = first
    network.handlers["b:2"] = second
    async with qdb_client.open_client(
        ["a:1", "b:2"], hedge_delay=0.05, listeners=[listen(hedges)], **EXACT
    ) as client:
        for _ in range(6):
            result, elapsed = await timed_read(client)
            assert isinstance(result, dict) and elapsed == pytest.approx(0.1)
        await trio.sleep(0.2)
        stats = client.statistics()
        assert stats["hedges"] == len(hedges) == 6 and stats["hedge_wins"] == 0
        assert len(first.cancels) + len(second.cancels) == 6
        for address in ("a:1", "b:2"):
            assert node_stats(client, address)["breaker"]["failed_requests"] == 0


async def test_an_answer_that_is_an_error_ends_the_read_at_once(
    network: FakeNetwork, autojump_clock, hedges
):
    """The hedge's node refuses the SQL: that is the answer everywhere, so the
    read raises it at once rather than wait on the stalled first copy."""
    network.handlers["stalled:1"] = Node(network, delay=None)
    network.handlers["refuses:2"] = Node(network, error=ErrorCode.SQL_ERROR)
    async with qdb_client.open_client(
        ["stalled:1", "refuses:2"], hedge_delay=0.05, listeners=[listen(hedges)], **EXACT
    ) as client:
        outcomes = [await timed_read(client, 2.0) for _ in range(2)]
        for result, elapsed in outcomes:
            assert isinstance(result, SqlError), result
            assert elapsed <= 0.05 + 1e-9
        assert hedges and all(h.waiting_on == ("stalled:1",) for h in hedges)
        stats = client.statistics()
        assert stats["failures"] == 2 and stats["call_timeouts"] == 0


async def test_a_copy_that_fails_leaves_the_read_to_the_others(
    network: FakeNetwork, autojump_clock, hedges
):
    """The first copy's connection is reset after the hedge went out: the read
    is not failed, nor retried, while the hedge still waits; the hedge answers."""

    async def reset_later(node: FakeNode, request: Request) -> None:
        await trio.sleep(0.1)
        await node.stream.aclose()

    network.handlers["resets:1"] = reset_later
    network.handlers["slow:2"] = Node(network, delay=0.25)
    async with qdb_client.open_client(
        ["resets:1", "slow:2"],
        hedge_delay=0.05,
        max_retries=0,
        listeners=[listen(hedges)],
        **EXACT,
    ) as client:
        result, elapsed = await timed_read(client)
        assert hedges and hedges[0].waiting_on == ("resets:1",)
        assert isinstance(result, dict) and elapsed == pytest.approx(0.3)
        stats = client.statistics()
        assert stats["hedge_wins"] == 1 and stats["failures"] == 0


async def test_when_every_copy_fails_the_error_has_every_attempt_and_counts_once(
    network: FakeNetwork, autojump_clock
):
    """Both nodes stall: the read ends at its deadline with one RequestTimeout,
    counted as one failed call, listing the attempts of both copies in order."""
    network.handlers["a:1"] = Node(network, delay=None)
    network.handlers["b:2"] = Node(network, delay=None)
    async with qdb_client.open_client(["a:1", "b:2"], hedge_delay=0.05, **EXACT) as client:
        result, elapsed = await timed_read(client, 0.5)
        assert isinstance(result, RequestTimeout) and elapsed == pytest.approx(0.5)
        assert result.request_sent and not result.maybe_applied
        attempts = result.attempts
        assert [a.number for a in attempts] == list(range(1, len(attempts) + 1))
        assert [a.started for a in attempts] == sorted(a.started for a in attempts)
        assert {a.node for a in attempts} == {"a:1", "b:2"}
        stats = client.statistics()
        assert stats["failures"] == 1 and stats["call_timeouts"] == 1 and stats["calls"] == 1


async def test_a_caller_that_cancels_cancels_every_copy(network: FakeNetwork, autojump_clock):
    """The caller's own cancel scope ends a hedged read like any call: both
    copies are CANCELled on their nodes and nothing is left running."""
    a, b = Node(network, delay=None), Node(network, delay=None)
    network.handlers["a:1"] = a
    network.handlers["b:2"] = b
    async with qdb_client.open_client(["a:1", "b:2"], hedge_delay=0.05, **EXACT) as client:
        with trio.move_on_after(0.1) as scope:
            await client._call("query", {}, 1.0, read_only=True)
        assert scope.cancelled_caught
        await trio.sleep(0.01)
        assert len(a.requests) == len(b.requests) == 1
        assert len(a.cancels) == len(b.cancels) == 1
        stats = client.statistics()
        assert stats["in_progress"] == 0 and stats["failures"] == 0
        for address in ("a:1", "b:2"):
            assert node_stats(client, address)["breaker"]["failed_requests"] == 0


async def test_a_spent_hedge_budget_sends_no_hedge(network: FakeNetwork, autojump_clock):
    """Hedges have a budget (the retry budget's settings): with none left, a
    read on the stalled node waits its attempt timeout as without hedging."""
    network.handlers["stalled:1"] = Node(network, delay=None)
    network.handlers["good:2"] = echo
    async with qdb_client.open_client(
        ["stalled:1", "good:2"],
        hedge_delay=0.05,
        retry_budget_ratio=0.0,
        retry_budget_min_per_second=0.0,
        **EXACT,
    ) as client:
        outcomes = [await timed_read(client) for _ in range(2)]
        stats = client.statistics()
        assert stats["hedges"] == 0 and stats["hedge_budget_exhausted"] >= 1
        assert max(elapsed for _, elapsed in outcomes) == pytest.approx(0.25)


async def test_hedges_never_spend_the_budget_of_retries(network: FakeNetwork, autojump_clock):
    """A budget of one hedge and one retry in the window: the first read that
    meets the stalled node is hedged, the next is not (the hedge budget is
    spent), yet its attempt timeout is still retried elsewhere and it succeeds."""
    stalled = Node(network, delay=None)
    network.handlers["stalled:1"] = stalled
    network.handlers["good:2"] = echo
    async with qdb_client.open_client(
        ["stalled:1", "good:2"],
        hedge_delay=0.05,
        retry_budget_ratio=0.0,
        retry_budget_min_per_second=0.1,  # x 10 s window: one of each
        **EXACT,
    ) as client:
        outcomes = []
        while len(stalled.requests) < 2:  # until two reads met the stalled node
            outcomes.append(await timed_read(client))
        assert all(isinstance(result, dict) for result, _ in outcomes), outcomes
        waits = [round(elapsed, 6) for _, elapsed in outcomes if elapsed > 0]
        assert waits == [0.05, 0.25]  # the hedged one, then the retried one
        stats = client.statistics()
        assert stats["hedges"] == stats["hedge_budget_exhausted"] == stats["retries"] == 1


async def test_writes_are_never_hedged(network: FakeNetwork, autojump_clock):
    """A keyed write to the stalled node is not sent twice at once: it waits its
    attempt timeout, then goes to the other node."""
    stalled = Node(network, delay=None)

    applies: list[float] = []

    async def applied(node: FakeNode, request: Request) -> None:
        applies.append(trio.current_time())
        await node.reply(request, {"rows_affected": 1, "last_insert_id": None})

    network.handlers["stalled:1"] = stalled
    network.handlers["good:2"] = applied
    async with qdb_client.open_client(["stalled:1", "good:2"], hedge_delay=0.05, **EXACT) as client:
        waits = []
        for _ in range(2):
            started = trio.current_time()
            await client.execute("insert into t values (1)", idempotency_key=True)
            waits.append(trio.current_time() - started)
        assert client.statistics()["hedges"] == 0
        assert {round(w, 6) for w in waits} <= {0.0, 0.25} and len(applies) == 2
        # One copy at a time: a write that went to the stalled node first was
        # sent to good:2 only when its attempt timeout passed.
        assert len(stalled.requests) == sum(1 for w in waits if w > 0.2) >= 1
        assert all(any(a - s == pytest.approx(0.25) for a in applies) for s in stalled.requests)


async def test_one_node_is_never_hedged(network: FakeNetwork, autojump_clock):
    network.handlers["only:1"] = Node(network, delay=0.2)
    async with qdb_client.open_client("only:1", hedge_delay=0.05, **EXACT) as client:
        result, elapsed = await timed_read(client)
        assert isinstance(result, dict) and elapsed == pytest.approx(0.2)
        assert client.statistics()["hedges"] == 0


async def test_up_to_max_hedges_copies_each_after_another_delay(
    network: FakeNetwork, autojump_clock, hedges
):
    """Three nodes, two stalled: with ``max_hedges=2`` a read that starts on a
    stalled node is answered by hedge 1 or hedge 2, ``hedge_delay`` apart."""
    for address in ("a:1", "b:2"):
        network.handlers[address] = Node(network, delay=None)
    network.handlers["good:3"] = echo
    async with qdb_client.open_client(
        ["a:1", "b:2", "good:3"],
        hedge_delay=0.05,
        max_hedges=2,
        listeners=[listen(hedges)],
        **EXACT,
    ) as client:
        seen: set[int] = set()
        for _ in range(12):
            before = len(hedges)
            result, elapsed = await timed_read(client)
            assert isinstance(result, dict)
            sent = hedges[before:]
            assert [h.hedge for h in sent] == list(range(1, len(sent) + 1))
            assert elapsed == pytest.approx(0.05 * len(sent))
            seen.add(len(sent))
        assert seen == {0, 1, 2}
        assert all(len(h.waiting_on) == h.hedge for h in hedges)


@pytest.mark.parametrize(
    "options",
    [
        {"hedge_delay": 0},
        {"hedge_delay": -1},
        {"hedge_delay": "0.05"},
        {"hedge_delay": 0.05, "max_hedges": 0},
        {"hedge_delay": 0.05, "max_hedges": 9},
    ],
)
def test_bad_hedging_options_are_refused(options):
    with pytest.raises(ConfigError):
        qdb_client.ClientConfig(hosts=["a:1"], **options)


def test_hedging_options_from_a_uri():
    config = qdb_client.ClientConfig.from_uri("qdb://a:1,b:2/?hedge_delay=0.02&max_hedges=2")
    assert (config.hedge_delay, config.max_hedges) == (0.02, 2)
    assert qdb_client.ClientConfig.from_uri("qdb://a:1/?hedge_delay=none").hedge_delay is None
    assert qdb_client.ClientConfig(hosts=["a:1"]).hedge_delay is None
