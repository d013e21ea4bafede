"""open_client and the request pipeline over in-memory streams, in virtual time."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

import qdb_client
import qdb_client._client as client_module
from qdb_client.errors import (
    ClientClosed,
    ConfigError,
    ConnectError,
    ConnectTimeout,
    InvalidArgument,
    NoAvailableNode,
    RequestTimeout,
)
from qdb_client.protocol import Request

from .fake_peer import FakeNode, stream_pair

Behaviour = Callable[[FakeNode], Awaitable[None]]


class FakeNetwork:
    """Replaces the TCP connector: each address gets a scripted node or a failure."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.behaviours: dict[str, Behaviour | str] = {}
        self.connects: list[str] = []

    async def open_tcp(self, address: str) -> trio.abc.Stream:
        self.connects.append(address)
        behaviour = self.behaviours.get(address, "refuse")
        if behaviour == "refuse":
            await trio.lowlevel.checkpoint()
            raise ConnectError(f"cannot connect to {address}: refused", node=address)
        if behaviour == "hang":
            await trio.sleep_forever()
        client_end, node_end = stream_pair()
        node = FakeNode(node_end, node_id=f"fake-{address}")
        self.nursery.start_soon(_serve, node, behaviour)
        return client_end


async def _serve(node: FakeNode, behaviour: Behaviour) -> None:
    await node.handshake()
    await behaviour(node)


async def echo_forever(node: FakeNode) -> None:
    while (message := await node.receive()) is not None:
        if isinstance(message, Request):
            await node.reply(
                message, {"method": message.method, "deadline_ms": message.deadline_ms}
            )


async def never_answer(node: FakeNode) -> None:
    while await node.receive() is not None:
        pass


@pytest.fixture
async def network(nursery, monkeypatch):
    net = FakeNetwork(nursery)
    monkeypatch.setattr(client_module, "open_tcp", net.open_tcp)
    return net


async def test_open_client_connects_to_first_reachable_node(network):
    network.behaviours["b:2"] = echo_forever
    async with qdb_client.open_client(["a:1", "b:2"]) as client:
        assert network.connects == ["a:1", "b:2"]
        assert client.statistics()["connection"]["node_id"] == "fake-b:2"


async def test_no_reachable_node_lists_every_reason(network):
    network.behaviours["b:2"] = "refuse"
    with pytest.raises(NoAvailableNode) as info:
        async with qdb_client.open_client(["a:1", "b:2"]):
            pytest.fail("must not get here")
    assert set(info.value.reasons) == {"a:1", "b:2"}
    assert "refused" in info.value.reasons["a:1"]


async def test_connect_timeout_is_exact(network, autojump_clock):
    network.behaviours["a:1"] = "hang"
    started = trio.current_time()
    with pytest.raises(NoAvailableNode) as info:
        async with qdb_client.open_client("a:1", connect_timeout=1.5):
            pass
    assert trio.current_time() - started == pytest.approx(1.5)
    assert "ConnectTimeout" in info.value.reasons["a:1"]
    assert isinstance(info.value.errors["a:1"], ConnectTimeout)


async def test_remaining_budget_is_sent_to_the_node(network, autojump_clock):
    network.behaviours["a:1"] = echo_forever
    async with qdb_client.open_client("a:1", request_timeout=3.0) as client:
        result = await client._call("query", {}, None)
        assert result["deadline_ms"] == 3000
        result = await client._call("query", {}, 0.25)
        assert result["deadline_ms"] == 250


async def test_request_timeout_is_exact_and_says_it_was_sent(network, autojump_clock):
    network.behaviours["a:1"] = never_answer
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
    network.behaviours["a:1"] = never_answer
    async with qdb_client.open_client("a:1", request_timeout=10.0) as client:
        with trio.move_on_after(0.3) as scope:
            await client.query("select 1")
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(0.3)


async def test_body_exception_comes_out_unwrapped_and_tasks_stop(network):
    network.behaviours["a:1"] = echo_forever
    with pytest.raises(KeyError, match="boom"):
        async with qdb_client.open_client("a:1"):
            raise KeyError("boom")


async def test_client_reconnects_after_its_connection_dies(network):
    calls = {"n": 0}

    async def die_after_first_request(node: FakeNode) -> None:
        calls["n"] += 1
        request = await node.receive()
        if calls["n"] == 1:
            await node.stream.aclose()
            return
        await node.reply(request, "second connection")
        await echo_forever(node)

    network.behaviours["a:1"] = die_after_first_request
    async with qdb_client.open_client("a:1") as client:
        with pytest.raises(qdb_client.ConnectionLost):
            await client._call("query", {}, None)
        assert await client._call("query", {}, None) == "second connection"
        assert network.connects == ["a:1", "a:1"]


async def test_use_after_close_is_client_closed(network):
    network.behaviours["a:1"] = echo_forever
    async with qdb_client.open_client("a:1") as client:
        pass
    with pytest.raises(ClientClosed):
        await client.query("select 1")


async def test_bad_arguments_are_typed_errors(network):
    network.behaviours["a:1"] = echo_forever
    async with qdb_client.open_client("a:1") as client:
        with pytest.raises(InvalidArgument):
            await client.query(b"select 1")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await client.execute("insert", "not params")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await client.batch([42])  # type: ignore[list-item]
        with pytest.raises(ConfigError):
            await client.query("select 1", timeout=-1)


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
