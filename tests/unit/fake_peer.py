"""A scripted QDB node over an in-memory stream, for transport unit tests.

The test decides every byte the "node" sends, so reply order, delays,
corruption and GOAWAY can be staged exactly, in virtual time.
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from qdb_client.protocol import (
    PROTOCOL_VERSIONS,
    ErrorCode,
    FrameError,
    Hello,
    Member,
    Message,
    ProtocolConnection,
    Request,
    Response,
    Role,
    State,
    Welcome,
    error_message,
    receive_event,
)


class FakeNode:
    """The server end of a connection, driven step by step by a test."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        node_id: str = "fake-1",
        max_in_flight: int = 256,
        members: tuple[Member, ...] = (),
    ):
        self.stream = stream
        self.node_id = node_id
        self.max_in_flight = max_in_flight
        self.protocol = ProtocolConnection(Role.SERVER)
        self.members = members
        #: Set by the serving loop once the client's side of the stream closed.
        self.finished = False
        #: trio times at which PINGs arrived (filled by the serving loop).
        self.pings: list[float] = []

    async def handshake(self) -> Hello | None:
        """Read HELLO and answer WELCOME (None if the client hung up first)."""
        hello = await self.receive()
        if hello is None:
            return None
        assert isinstance(hello, Hello)
        await self.send(
            Welcome(
                version=PROTOCOL_VERSIONS[-1],
                node_id=self.node_id,
                session_id="session-1",
                max_frame_size=1 << 20,
                max_in_flight=self.max_in_flight,
                idle_timeout_ms=30_000,
                members=self.members,
            )
        )
        return hello

    async def receive(self) -> Any:
        """Next message (or BadMessage) from the client; None at EOF."""
        try:
            return await receive_event(self.protocol, self.stream)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return None  # this end closed the connection itself
        except FrameError:
            if self.protocol.state is not State.CLOSED:  # not cut short by the close
                raise
            return None

    async def receive_request(self) -> Request:
        message = await self.receive()
        assert isinstance(message, Request), message
        return message

    async def send(self, message: Message) -> None:
        await self.stream.send_all(self.protocol.send(message))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def reply(self, request: Request, result: Any) -> None:
        await self.send(Response(request_id=request.request_id, result=result))

    async def fail(
        self, request: Request, code: ErrorCode, message: str = "failed", **extra: Any
    ) -> None:
        await self.send(error_message(request.request_id, code, message, **extra))


def stream_pair(lockstep: bool = False) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """(client end, node end). ``lockstep``: a write blocks until the peer reads."""
    if lockstep:
        return trio.testing.lockstep_stream_pair()
    return trio.testing.memory_stream_pair()
