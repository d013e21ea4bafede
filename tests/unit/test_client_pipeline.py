"""open_client and the request pipeline over in-memory streams, in virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import (
    ClientClosed,
    ConfigError,
    ConnectTimeout,
    InvalidArgument,
    NoAvailableNode,
    RequestTimeout,
)
from qdb_client.protocol import Request

from .fake_network import echo, never_answer
from .fake_peer import FakeNode


def node_states(client: qdb_client.Client) -> dict[str, str]:
    return {n["address"]: n["state"] for n in client.statistics()["nodes"]}


async def test_open_client_connects_to_every_configured_node(network):
    network.handlers["b:2"] = echo
    async with qdb_client.open_client(["a:1", "b:2"]) as client:
        await trio.testing.wait_all_tasks_blocked()
        assert node_states(client) == {"a:1": "DOWN", "b:2": "UP"}
        assert client.statistics()["nodes"][1]["node_id"] == "fake-b:2"


async def test_no_reachable_node_lists_every_reason(network):
    with pytest.raises(NoAvailableNode) as info:
        async with qdb_client.open_client(["a:1", "b:2"]):
            pytest.fail("must not get here")
    assert set(info.value.reasons) == {"a:1", "b:2"}
    assert "refused" in info.value.reasons["a:1"]
    assert info.value.reasons["a:1"].startswith("DOWN")


async def test_connect_timeout_is_exact(network, autojump_clock):
    network.handlers["a:1"] = "hang"
    started = trio.current_time()
    with pytest.raises(NoAvailableNode) as info:
        async with qdb_client.open_client("a:1", connect_timeout=1.5):
            pytest.fail("no node accepted the connection")
    assert trio.current_time() - started == pytest.approx(1.5)
    assert isinstance(info.value.errors["a:1"], ConnectTimeout)


async def test_remaining_budget_is_sent_to_the_node(network, autojump_clock):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", request_timeout=3.0) as client:
        result = await client._call("query", {}, None, read_only=True)
        assert result["deadline_ms"] == 3000
        result = await client._call("query", {}, 0.25, read_only=True)
        assert result["deadline_ms"] == 250


async def test_request_timeout_is_exact_and_says_it_was_sent(network, autojump_clock):
    network.handlers["a:1"] = never_answer
    async with qdb_client.open_client("a:1", request_timeout=2.0) as client:
        started = trio.current_time()
        with pytest.raises(RequestTimeout) as info:
            await client.query("select 1")
        assert trio.current_time() - started == pytest.approx(2.0)
        assert info.value.request_sent and info.value.timeout == 2.0
        with pytest.raises(RequestTimeout):
            await client.query("select 1", timeout=0.5)
        assert trio.current_time() - started == pytest.approx(2.5)


async def test_caller_cancel_scope_composes_with_request_timeout(network, autojump_clock):
    network.handlers["a:1"] = never_answer
    async with qdb_client.open_client("a:1", request_timeout=10.0) as client:
        started = trio.current_time()
        with trio.move_on_after(0.3) as scope:
            await client.query("select 1")
        assert scope.cancelled_caught
        assert trio.current_time() - started == pytest.approx(0.3)


async def test_body_exception_comes_out_unwrapped(network):
    network.handlers["a:1"] = echo
    with pytest.raises(KeyError, match="boom"):
        async with qdb_client.open_client("a:1"):
            raise KeyError("boom")


async def test_lost_write_is_not_retried_and_node_recovers(network, autojump_clock):
    closed_one = []

    async def die_once(node: FakeNode, request: Request) -> None:
        if not closed_one:
            closed_one.append(request)
            await node.stream.aclose()
        else:
            await echo(node, request)

    network.handlers["a:1"] = die_once
    async with qdb_client.open_client("a:1") as client:
        with pytest.raises(qdb_client.OutcomeUnknown) as info:
            await client._call("execute", {}, None, read_only=False)
        assert isinstance(info.value.__cause__, qdb_client.ConnectionLost)
        assert [a.node for a in info.value.attempts] == ["a:1"]
        assert not info.value.attempts[0].retried
        result = await client._call("execute", {}, None, read_only=False)
        assert result["method"] == "execute"
        assert len(closed_one) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert node_states(client) == {"a:1": "UP"}


async def test_read_fails_over_to_another_node_when_connection_dies(network, autojump_clock):
    async def die(node: FakeNode, request: Request) -> None:
        await node.stream.aclose()

    network.handlers["a:1"] = die
    network.handlers["b:2"] = echo
    async with qdb_client.open_client(["a:1", "b:2"], slow_start=0) as client:
        for _ in range(4):
            result = await client._call("query", {}, None, read_only=True)
            assert result["method"] == "query"
        assert client.statistics()["retries"] >= 1


async def test_use_after_close_is_client_closed(network):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1") as client:
        assert not client.statistics()["closed"]
    assert client.statistics()["closed"]
    with pytest.raises(ClientClosed):
        await client.query("select 1")


async def test_bad_arguments_are_typed_errors(network):
    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1") as client:
        with pytest.raises(InvalidArgument):
            await client.query(b"select 1")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await client.execute("insert", "not params")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await client.batch([42])  # type: ignore[list-item]
        with pytest.raises(InvalidArgument):
            await client.query("select 1", timeout=-1)
        with pytest.raises(InvalidArgument):
            await client.batch("SELECT 1")  # a string is not a list of statements
        with pytest.raises(InvalidArgument):
            await client.batch(5)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="str names"):
            await client.query("select :a", {1: "x"})  # type: ignore[dict-item]
        with pytest.raises(InvalidArgument):
            client.mark_node_unhealthy([])  # type: ignore[arg-type]
        with trio.testing.assert_checkpoints(), pytest.raises(InvalidArgument):
            await client.query(b"select 1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"request_timeout": 0}, "request_timeout"),
        ({"request_timeout": float("inf")}, "request_timeout"),
        ({"connect_timeout": "5"}, "connect_timeout"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_frame_size": True}, "max_frame_size"),
        ({"credentials": "root"}, "credentials"),
        ({"no_such_option": 1}, "unknown option"),
    ],
)
def test_bad_config_values_are_config_errors(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        qdb_client.ClientConfig.from_options(["127.0.0.1:7000"], **options)


@pytest.mark.parametrize("hosts", [[], "localhost", ["h:0"], ["h:70000"], ["a:1", "a:1"], [7000]])
def test_bad_hosts_are_config_errors(hosts):
    with pytest.raises(ConfigError):
        qdb_client.ClientConfig(hosts=hosts)


def test_config_accepts_ipv6_and_credentials_tuple():
    config = qdb_client.ClientConfig(hosts=["[::1]:7000"], credentials=("ada", "secret"))
    assert config.credentials == qdb_client.Credentials(user="ada", password="secret")
    assert "secret" not in repr(config)


async def test_outside_cancellation_comes_out_as_plain_cancelled(network, autojump_clock):
    network.handlers["a:1"] = echo
    matched = False
    with trio.move_on_after(1.0) as scope:
        try:
            async with qdb_client.open_client("a:1"):
                await trio.sleep_forever()
        except trio.Cancelled:
            matched = True
            raise
    assert scope.cancelled_caught and matched


async def test_an_exception_group_from_the_block_comes_out_as_raised(network):
    network.handlers["a:1"] = echo
    with pytest.raises(ExceptionGroup) as info:
        async with qdb_client.open_client("a:1"):
            raise ExceptionGroup("mine", [ValueError("inner")])
    assert info.value.message == "mine"
    assert [type(e) for e in info.value.exceptions] == [ValueError]
