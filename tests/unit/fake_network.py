"""A fake network for client tests: scripted nodes behind in-memory streams."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

import pytest
import trio

import qdb_client._transport.establish as establish_module
from qdb_client.errors import ConnectError
from qdb_client.protocol import Member, Ping, Pong, Request

from .fake_peer import FakeNode, stream_pair

Handler = Callable[[FakeNode, Request], Awaitable[None]]


class FakeNetwork:
    """Replaces the TCP connector: each address gets a scripted node or a failure.

    A scripted node answers PINGs itself and hands each REQUEST to the
    address's handler; ``handlers[address]`` may also be "refuse" or "hang".
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.handlers: dict[str, Handler | str] = {}
        self.connects: list[str] = []
        #: (trio time, address) of every connection attempt.
        self.connect_times: list[tuple[float, str]] = []
        self.nodes: list[FakeNode] = []
        #: Addresses whose nodes stay silent on PING.
        self.muted: set[str] = set()
        #: Cluster members every node announces in WELCOME.
        self.members: tuple[Member, ...] = ()
        #: Node id per address (default ``fake-<address>``), to model aliases.
        self.node_ids: dict[str, str] = {}
        #: Seconds an address takes to accept a connection.
        self.connect_delay: dict[str, float] = {}
        #: Per address, which of its connections (numbered from 0 in the order
        #: they are made) get a node that reads the HELLO and never answers.
        self.silent_handshakes: dict[str, set[int]] = {}
        self._connections_made: dict[str, int] = {}

    def nodes_at(self, address: str) -> list[FakeNode]:
        node_id = self.node_ids.get(address, f"fake-{address}")
        return [n for n in self.nodes if n.node_id == node_id]

    async def kill(self, address: str) -> None:
        """Refuse new connections and drop the open ones, like a killed process."""
        self.handlers[address] = "refuse"
        for node in self.nodes_at(address):
            await node.stream.aclose()

    async def open_tcp(self, address: str) -> trio.abc.Stream:
        self.connects.append(address)
        self.connect_times.append((trio.current_time(), address))
        handler = self.handlers.get(address, "refuse")
        if handler == "refuse":
            await trio.lowlevel.checkpoint()
            raise ConnectError(f"cannot connect to {address}: refused", node=address)
        if handler == "hang":
            await trio.sleep_forever()
        if address in self.connect_delay:
            await trio.sleep(self.connect_delay[address])
        client_end, node_end = stream_pair()
        node_id = self.node_ids.get(address, f"fake-{address}")
        node = FakeNode(node_end, node_id=node_id, members=self.members)
        self.nodes.append(node)
        number = self._connections_made.get(address, 0)
        self._connections_made[address] = number + 1
        if number in self.silent_handshakes.get(address, ()):
            self.nursery.start_soon(_never_welcome, node)
        else:
            self.nursery.start_soon(_serve, self, address, node, handler)
        return client_end

    def connections_made(self, address: str) -> int:
        """Connections made to ``address`` so far (the next one's number)."""
        return self._connections_made.get(address, 0)


async def _never_welcome(node: FakeNode) -> None:
    """A node whose WELCOME is lost: it reads until the client hangs up."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await node.stream.receive_some(65536):
            pass
    node.finished = True


async def _serve(network: FakeNetwork, address: str, node: FakeNode, handler: Handler) -> None:
    if await node.handshake() is None:
        node.finished = True
        return
    while (message := await node.receive()) is not None:
        if isinstance(message, Ping):
            node.pings.append(trio.current_time())
            if address not in network.muted:
                await node.send(Pong(message.request_id))
        elif isinstance(message, Request):
            await handler(node, message)
        elif hasattr(handler, "frame"):  # a handler that also wants CANCEL, STREAM_CREDIT...
            await handler.frame(node, message)
    node.finished = True


async def echo(node: FakeNode, request: Request) -> None:
    await node.reply(request, {"method": request.method, "deadline_ms": request.deadline_ms})


async def never_answer(node: FakeNode, request: Request) -> None:
    pass


@pytest.fixture
async def network(nursery, monkeypatch) -> FakeNetwork:
    """Route the client's connections to scripted nodes instead of TCP."""
    net = FakeNetwork(nursery)
    monkeypatch.setattr(establish_module, "open_tcp", net.open_tcp)
    return net
