"""RawClient: a bare protocol v1 client for driving a test node byte by byte.

It encodes messages without any client-side state checks (so tests can send
what a real client never would) and decodes what the node sends with a
client-role ProtocolConnection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from qdb_client.protocol import (
    PROTOCOL_VERSIONS,
    BadMessage,
    Error,
    FrameError,
    Hello,
    Message,
    ProtocolConnection,
    Request,
    Response,
    Role,
    State,
    Welcome,
    encode_message,
    receive_event,
)
from qdb_client.testing import parse_address

#: Default seconds a RawClient read waits for the node before failing the test.
TIMEOUT = 5.0


class RawClient:
    """One connection to a node; every read is bounded by ``TIMEOUT``."""

    def __init__(self, stream: trio.abc.Stream, *, timeout: float = TIMEOUT) -> None:
        self.stream = stream
        #: Seconds any single read may wait (raise it under a MockClock).
        self.timeout = timeout
        self.proto = ProtocolConnection(Role.CLIENT)
        self.welcome: Welcome | None = None
        #: True if the node reset the connection (instead of a clean EOF).
        self.reset = False
        self._next_id = 1

    @classmethod
    async def connect(cls, address: str) -> RawClient:
        host, port = parse_address(address)
        return cls(await trio.open_tcp_stream(host, port))

    def next_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    # ----------------------------------------------------------------- send

    async def send(self, message: Message) -> None:
        await self.stream.send_all(encode_message(message))

    async def send_bytes(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def handshake(self, **hello: Any) -> Welcome:
        reply = await self.hello(**hello)
        assert isinstance(reply, Welcome), reply
        return reply

    async def hello(self, **hello: Any) -> Message | BadMessage:
        hello.setdefault("versions", PROTOCOL_VERSIONS)
        await self.send(Hello(**hello))
        reply = await self.receive()
        if isinstance(reply, Welcome):
            self.welcome = reply
        return reply

    async def send_request(
        self, method: str, args: Mapping[str, Any] | None = None, **extra: Any
    ) -> int:
        rid = extra.pop("request_id", None)
        if rid is None:
            rid = self.next_id()
        await self.send(Request(rid, method, dict(args or {}), **extra))
        return rid

    async def request(
        self, method: str, args: Mapping[str, Any] | None = None, **extra: Any
    ) -> Response | Error:
        """Send one request and return the reply with its id (anything else fails)."""
        rid = await self.send_request(method, args, **extra)
        reply = await self.receive()
        assert isinstance(reply, (Response, Error)), reply
        assert reply.request_id == rid, (reply, rid)
        return reply

    async def call(self, method: str, args: Mapping[str, Any] | None = None, **extra: Any) -> Any:
        """Send one request and return its result (an ERROR fails the test)."""
        reply = await self.request(method, args, **extra)
        assert isinstance(reply, Response), reply
        return reply.result

    # -------------------------------------------------------------- receive

    async def receive(self, *, within: float | None = None) -> Message | BadMessage:
        """The next message from the node (within ``within`` s); EOFError at end of stream."""
        with trio.fail_after(self.timeout if within is None else within):
            try:
                event = await receive_event(self.proto, self.stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.reset = True
                raise EOFError("connection reset") from None
            except FrameError:
                if self.proto.state is not State.CLOSED:  # not cut short by the close
                    raise
                raise EOFError("connection closed inside a frame") from None
        if event is None:
            raise EOFError("connection closed")
        return event

    async def read_until_eof(self, *, within: float | None = None) -> list[Message | BadMessage]:
        """Every message until the node closes the connection."""
        messages: list[Message | BadMessage] = []
        within = self.timeout if within is None else within
        with trio.fail_after(within):
            while True:
                try:
                    messages.append(await self.receive(within=within))
                except EOFError:
                    return messages

    async def nothing_within(self, seconds: float) -> bool:
        """True if no message and no EOF arrives within ``seconds``."""
        with trio.move_on_after(seconds):
            try:
                await self.receive(within=seconds + 1)
            except EOFError:
                return False
            return False
        return True

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def raw_client(address: str, *, handshake: bool = True) -> AsyncIterator[RawClient]:
    """Connect (and by default handshake); close on exit."""
    client = await RawClient.connect(address)
    try:
        if handshake:
            await client.handshake()
        yield client
    finally:
        await client.aclose()
