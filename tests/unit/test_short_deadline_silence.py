"""Silence under deadlines shorter than a node's slow threshold, in virtual time.

A call's deadline passing while it waits for a reply counts against the node
only when the node is slower than usual. Applications with short deadlines
(below ``attempt_timeout_min``, or below 3x the node's usual reply time) never
wait that long in one call, so a stalled node was never blamed beside a
healthy one, and a healthy node that silence had shut out was never probed
while the stalled one was the last admitting: every call failed for
``breaker_open_timeout``. A stall shows across calls instead (what was
abandoned on the node stays unconfirmed), and any such deadline has the nodes
silence shut out probed when no CLOSED node is left beside it.
"""

from __future__ import annotations

import trio

import qdb_client
from qdb_client.protocol import Request

from .fake_network import FakeNetwork, echo
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


def breaker(client: qdb_client.Client, address: str) -> dict:
    return next(n for n in client.statistics()["nodes"] if n["address"] == address)["breaker"]


def scripted(network: FakeNetwork, silent: set[str], delay: float = 0.0) -> None:
    """a:1 and b:2 answer after ``delay``, except the node ids in ``silent``,
    which never answer (nor confirm a CANCEL) but keep answering pings."""

    async def handler(node: FakeNode, request: Request) -> None:
        if node.node_id in silent:
            return
        if delay:
            await trio.sleep(delay)
        await echo(node, request)

    network.handlers["a:1"] = handler
    network.handlers["b:2"] = handler


async def calls(client: qdb_client.Client, count: int, budget: float) -> list[str]:
    """``count`` reads of ``budget`` seconds one after another, 50 ms apart:
    "ok" or the error's class name for each."""
    outcomes = []
    for _ in range(count):
        try:
            await client._call("query", {}, budget, read_only=True)
            outcomes.append("ok")
        except qdb_client.QdbError as exc:
            outcomes.append(type(exc).__name__)
        await trio.sleep(0.05)
    return outcomes


async def shut_out_a_for_silence(client: qdb_client.Client) -> None:
    """Reads with 5 s deadlines while a:1 is silent: its breaker opens for silence."""
    for _ in range(12):
        await client._call("query", {}, 5.0, read_only=True)
    assert breaker(client, "a:1")["current_state"] == "OPEN"
    assert breaker(client, "a:1")["opened_by"] == ["slow"]


async def test_a_shut_out_node_is_probed_when_the_last_one_stalls_under_short_deadlines(
    network: FakeNetwork, autojump_clock
):
    """a was shut out for silence and recovered; b, the last admitting node,
    stalls; deadlines are 0.2 s, below attempt_timeout_min. The first deadline
    that passes on b has a probed (HALF_OPEN), it closes again on its replies,
    and b, whose abandoned requests stay unconfirmed, is ejected after the
    failure threshold instead of failing every call for breaker_open_timeout."""
    silent = {"fake-a:1"}
    scripted(network, silent)
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        await shut_out_a_for_silence(client)
        silent.clear()
        silent.add("fake-b:2")

        first = await calls(client, 1, 0.2)
        assert first == ["RequestTimeout"]
        assert breaker(client, "a:1")["current_state"] == "HALF_OPEN"  # not 30 s later

        outcomes = await calls(client, 40, 0.2)
        assert breaker(client, "a:1")["current_state"] == "CLOSED"
        assert breaker(client, "b:2")["current_state"] == "OPEN"
        assert breaker(client, "b:2")["opened_by"] == ["slow"]
        # b keeps its share of the calls until its breaker opens (5 failures), then none.
        assert outcomes.count("RequestTimeout") == 5
        assert outcomes[10:] == ["ok"] * 30


async def test_a_shut_out_node_is_probed_under_deadlines_below_3x_the_last_ones_reply_time(
    network: FakeNetwork, autojump_clock
):
    """The same with 1 s deadlines when the nodes usually answer in 0.4 s: b's
    slow threshold (3 x 0.4 s) is longer than any call's wait."""
    silent = {"fake-a:1"}
    scripted(network, silent, delay=0.4)
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        await shut_out_a_for_silence(client)
        silent.clear()
        silent.add("fake-b:2")

        outcomes = await calls(client, 30, 1.0)
        assert outcomes[0] == "RequestTimeout"
        assert breaker(client, "a:1")["current_state"] == "CLOSED"
        assert breaker(client, "b:2")["current_state"] == "OPEN"
        assert outcomes.count("RequestTimeout") <= 6
        assert outcomes[-15:] == ["ok"] * 15


async def test_a_node_that_stalls_beside_a_closed_one_is_ejected_under_short_deadlines(
    network: FakeNetwork, autojump_clock
):
    """Both nodes CLOSED, b stalls, deadlines 0.2 s: every deadline passing on
    b after its first abandoned request is 0.25 s old counts as silence, so b
    is ejected after the failure threshold, not failing half the calls for the
    whole stall."""
    silent: set[str] = set()
    scripted(network, silent)
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        await calls(client, 12, 5.0)
        silent.add("fake-b:2")

        outcomes = await calls(client, 40, 0.2)
        assert breaker(client, "a:1")["current_state"] == "CLOSED"
        assert breaker(client, "b:2")["current_state"] == "OPEN"
        assert breaker(client, "b:2")["opened_by"] == ["slow"]
        assert outcomes.count("RequestTimeout") == 6  # the first one is too young to blame
        assert outcomes[12:] == ["ok"] * 28


async def test_deadlines_shorter_than_a_healthy_nodes_reply_time_never_eject_it(
    network: FakeNetwork, autojump_clock
):
    """The caller's own tiny deadlines are no evidence: both nodes answer every
    request in 0.1 s (late replies confirm what the caller abandoned), the
    calls give up after 0.05 s, and for as long as that goes on no breaker
    counts a failure."""
    scripted(network, set(), delay=0.1)
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        await calls(client, 12, 5.0)

        outcomes = await calls(client, 100, 0.05)
        assert outcomes == ["RequestTimeout"] * 100
        for address in ("a:1", "b:2"):
            assert breaker(client, address)["current_state"] == "CLOSED"
            assert breaker(client, address)["failed_requests"] == 0
