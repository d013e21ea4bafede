"""Scripted nodes that check HELLO like a real one (docs/protocol.md 7.3, 7.4),
over in-memory streams, for the trust and session tests.

A node accepts a password from its ``passwords`` (or, per user, ``users``), or
a session token from the network's shared token store (a cluster's shared
database), and records every HELLO it received, so a test can count what
reached it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import attrs
import pytest
import trio

import qdb_client
import qdb_client._transport.establish as establish_module
from qdb_client.protocol import (
    PROTOCOL_VERSIONS,
    ErrorCode,
    Hello,
    Member,
    Ping,
    Pong,
    Request,
    Welcome,
    error_message,
)

from .fake_peer import FakeNode, stream_pair

__all__ = ["EXACT", "PASSWORD", "AuthNetwork", "ScriptedNode", "net", "options", "user_of"]

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1.0,
    "reconnect_initial": 0.5,
    "reconnect_max": 2.0,
}
PASSWORD = "s3cret-pw"


@attrs.define
class ScriptedNode:
    """The auth policy of one address, and what reached it."""

    #: Accepted passwords (None: the node requires no credentials).
    passwords: set[str] | None = attrs.field(factory=lambda: {PASSWORD})
    #: Issue session tokens (False: a node that keeps no sessions).
    tokens: bool = True
    ttl_ms: int = 60_000
    #: Seconds the node takes to answer a HELLO.
    delay: float = 0.0
    #: user -> accepted passwords (instead of ``passwords``, which any user may use).
    users: dict[str, set[str]] | None = None
    #: The token store it shares (a cluster's database): nodes of another store
    #: know none of its tokens.
    store: str = "cluster"
    hellos: list[tuple[float, Hello]] = attrs.field(factory=list)
    nodes: list[FakeNode] = attrs.field(factory=list)
    #: Welcomed connections the client closed, and requests they carried.
    closed: list[int] = attrs.field(factory=list)

    def password_hellos(self) -> list[float]:
        return [t for t, h in self.hellos if h.credentials and "password" in h.credentials]

    def token_hellos(self) -> list[float]:
        return [t for t, h in self.hellos if h.session_token is not None]


class AuthNetwork:
    """Addresses -> scripted nodes sharing one token store (one cluster)."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.nodes: dict[str, ScriptedNode] = {}
        self.members: tuple[Member, ...] = ()
        #: token -> (store, session id, user, expiry in trio time): the shared stores.
        self.tokens: dict[str, tuple[str, str, str, float]] = {}
        self.connects: list[str] = []
        #: (trio time, address, HELLO, answer) of every HELLO answered.
        self.answers: list[tuple[float, str, Hello, object]] = []
        self._ids: Iterator[int] = itertools.count(1)

    async def open_tcp(self, address: str) -> trio.abc.Stream:
        self.connects.append(address)
        await trio.lowlevel.checkpoint()
        node = self.nodes.get(address)
        if node is None:
            raise qdb_client.ConnectError(f"cannot connect to {address}: refused", node=address)
        client_end, node_end = stream_pair()
        fake = FakeNode(node_end, node_id=f"fake-{address}", members=self.members)
        node.nodes.append(fake)
        self.nursery.start_soon(self._serve, address, node, fake)
        return client_end

    async def drop(self, address: str) -> None:
        for fake in self.nodes[address].nodes:
            await fake.stream.aclose()

    def _answer(self, node: ScriptedNode, fake: FakeNode, hello: Hello) -> Welcome | object:
        now = trio.current_time()
        auth = dict(hello.credentials or {})
        user = session = None
        if node.passwords is None:
            return Welcome(
                version=PROTOCOL_VERSIONS[-1],
                node_id=fake.node_id,
                session_id=f"session-{next(self._ids)}",
                max_frame_size=1 << 20,
                max_in_flight=256,
                idle_timeout_ms=30_000,
                members=self.members,
            )
        if hello.resume_session and hello.session_token:
            found = self.tokens.get(hello.session_token)
            if found is not None and found[0] == node.store:
                _, stored_session, stored_user, expires = found
                if stored_session == hello.resume_session and expires > now:
                    session, user = stored_session, stored_user
        if user is None:
            if "password" not in auth:
                reason = "session" if hello.session_token else "credentials"
                return error_message(
                    0, ErrorCode.UNAUTHENTICATED, "refused", details={"reason": reason}
                )
            allowed = node.passwords if node.users is None else node.users.get(auth["user"], set())
            if auth.get("password") not in allowed:
                return error_message(
                    0, ErrorCode.UNAUTHENTICATED, "refused", details={"reason": "credentials"}
                )
            user = auth["user"]
            known = {s for store, s, _, _ in self.tokens.values() if store == node.store}
            session = hello.resume_session if hello.resume_session in known else None
            session = session or f"session-{next(self._ids)}"
        token = None
        if node.tokens:
            token = f"token-{next(self._ids)}"
            self.tokens[token] = (node.store, session, user, now + node.ttl_ms / 1000)
        return Welcome(
            version=PROTOCOL_VERSIONS[-1],
            node_id=fake.node_id,
            session_id=session,
            max_frame_size=1 << 20,
            max_in_flight=256,
            idle_timeout_ms=30_000,
            members=self.members,
            session_token=token,
            session_expires_ms=node.ttl_ms if token else None,
        )

    async def _serve(self, address: str, node: ScriptedNode, fake: FakeNode) -> None:
        hello = await fake.receive()
        if not isinstance(hello, Hello):
            return
        node.hellos.append((trio.current_time(), hello))
        if node.delay:
            await trio.sleep(node.delay)
        reply = self._answer(node, fake, hello)
        self.answers.append((trio.current_time(), address, hello, reply))
        try:
            await fake.send(reply)  # type: ignore[arg-type]
            if not isinstance(reply, Welcome):
                await fake.stream.aclose()
                return
            requests = 0
            while (message := await fake.receive()) is not None:
                if isinstance(message, Ping):
                    await fake.send(Pong(message.request_id))
                elif isinstance(message, Request):
                    requests += 1
                    await fake.reply(message, {"columns": ["x"], "rows": [[1]]})
            node.closed.append(requests)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


@pytest.fixture
def net(nursery, monkeypatch) -> AuthNetwork:
    network = AuthNetwork(nursery)
    monkeypatch.setattr(establish_module, "open_tcp", network.open_tcp)
    return network


def user_of(network: AuthNetwork, reply: object) -> str | None:
    """The user a WELCOME logged in (by the token it issued), None for a refusal."""
    if isinstance(reply, Welcome) and reply.session_token:
        return network.tokens[reply.session_token][2]
    return None


def options(**extra: object) -> dict[str, object]:
    return {**EXACT, "credentials": ("ada", PASSWORD), **extra}
