"""Credentials that change or are refused while handshakes are under way
(docs/security.md, "what is authenticated"), in virtual time over scripted
nodes (tests/unit/fake_auth.py).

- A handshake prepared with credentials that ``reauthenticate`` replaced
  changes nothing when it ends: its token is ignored, its refusal marks no
  node, its connection is closed unused and the attempt logs in again.
- A refused token is followed by the password, never by a newer token.
- A refused password reaches each node once, also from attempts that were
  waiting for the single-flight login that it refused.
"""

from __future__ import annotations

import pytest
import trio

import qdb_client
import qdb_client._transport.establish as establish_module
from qdb_client._transport.auth import Authenticator, HelloAuth, Login, Retry
from qdb_client._transport.connection import Connection
from qdb_client.config import Credentials
from qdb_client.errors import AuthenticationFailed, server_error_from_wire
from qdb_client.protocol import PROTOCOL_VERSIONS, Hello, Welcome

from .fake_auth import EXACT, AuthNetwork, ScriptedNode, net, user_of

__all__ = ["net"]

USERS = {"ada": {"pa"}, "bob": {"pb"}}
HELLO = Hello(versions=tuple(PROTOCOL_VERSIONS))


async def connect(nursery: trio.Nursery, auth: Authenticator, address: str) -> Connection:
    return await establish_module.establish(
        address,
        nursery=nursery,
        hello=HELLO,
        connect_timeout=5.0,
        max_frame_size=1 << 20,
        max_in_flight=8,
        auth=auth,
    )


def kinds(node: ScriptedNode) -> list[str]:
    return ["password" if h.credentials else "token" for _, h in node.hellos]


# ------------------------------------------------ reauthenticate mid-handshake


async def test_reauthenticate_as_another_user_is_not_undone_by_a_handshake_in_flight(
    net: AuthNetwork, autojump_clock
):
    """A reconnect to b sent ada's token at 1.0 and is welcomed at 2.5, after
    reauthenticate("bob") at 1.5. Its token (which expires later than bob's)
    used to become the client's: later handshakes logged in as ada, and the
    late connection joined b's pool as ada while statistics said bob."""
    net.nodes["a:1"] = ScriptedNode(users=USERS)
    net.nodes["b:1"] = ScriptedNode(users=USERS)
    async with qdb_client.open_client(["a:1", "b:1"], **EXACT, credentials=("ada", "pa")) as client:
        await trio.sleep(1)
        net.nodes["b:1"].delay = 1.5
        await net.drop("b:1")  # b's pool reconnects at once, with ada's token
        await trio.sleep(0.5)
        net.nodes["b:1"].delay = 0.0
        await client.reauthenticate("bob", "pb")
        await trio.sleep(2)
        late = [(t, a) for t, a, _, r in net.answers if t > 1.5 and user_of(net, r) == "ada"]
        assert late == [(pytest.approx(2.5), "b:1")]  # the race did happen
        session = client.statistics()["session"]
        assert session["user"] == "bob"
        assert {u for _, s, u, _ in net.tokens.values() if s == session["session_id"]} == {"bob"}
        b = client._cluster.find("b:1")
        pooled = [user_of(net, c.welcome) for c in b.pool.connections()]
        assert pooled and set(pooled) == {"bob"}, pooled
        n = len(net.answers)
        await client.refresh_session()
        assert [user_of(net, r) for _, _, _, r in net.answers[n:]] == ["bob"]


async def test_a_connection_welcomed_with_replaced_credentials_is_discarded(
    net: AuthNetwork, nursery: trio.Nursery, autojump_clock
):
    """establish() itself: the late WELCOME for ada is not returned; the same
    attempt logs in with bob's password on a new connection (nothing was sent
    on the other one) and the client's session is bob's."""
    net.nodes["b:1"] = ScriptedNode(users=USERS, delay=1.0)
    auth = Authenticator(Credentials(user="ada", password="pa"))
    result: list[Connection] = []

    async def attempt() -> None:
        result.append(await connect(nursery, auth, "b:1"))

    async with trio.open_nursery() as inner:
        inner.start_soon(attempt)
        await trio.sleep(0.5)
        auth.reset(Credentials(user="bob", password="pb"))
    [connection] = result
    assert connection.welcome is not None
    assert user_of(net, connection.welcome) == "bob"
    assert [(h.credentials or {}).get("user") for _, h in net.nodes["b:1"].hellos] == [
        "ada",
        "bob",
    ]
    await trio.sleep(0.1)
    assert net.nodes["b:1"].closed == [0]  # ada's: closed by the client, never used
    assert auth.session_id == connection.welcome.session_id
    assert auth.password_logins == 1  # the discarded login does not count


async def test_a_refusal_of_the_old_password_marks_no_node_after_reauthenticate(
    net: AuthNetwork, autojump_clock
):
    """The password is rotated and every session revoked. b's reconnect sends
    the revoked token (refused at 2.0), then the old password, refused at 3.0,
    after reauthenticate at 2.5 cleared every mark: that refusal used to mark b
    AUTH_FAILED for good, though b accepts the new password."""
    net.nodes["a:1"] = ScriptedNode(users={"ada": {"old"}})
    net.nodes["b:1"] = ScriptedNode(users={"ada": {"old"}})
    async with qdb_client.open_client(
        ["a:1", "b:1"], **EXACT, credentials=("ada", "old")
    ) as client:
        await trio.sleep(1)
        for node in net.nodes.values():
            node.users = {"ada": {"new"}}
        net.tokens.clear()
        net.nodes["b:1"].delay = 1.0
        await net.drop("a:1")
        await net.drop("b:1")
        await trio.sleep(1.5)
        await client.reauthenticate("ada", "new")
        await trio.sleep(10)
        b = client._cluster.find("b:1")
        refused_old = [
            t
            for t, a, h, r in net.answers
            if a == "b:1" and h.credentials and not isinstance(r, Welcome)
        ]
        assert refused_old == [pytest.approx(3.0)]  # the race did happen
        assert b.auth_failed is None
        assert b.state.value == "UP"


async def test_a_stale_refusal_is_not_a_verdict_on_the_new_credentials(
    net: AuthNetwork, nursery: trio.Nursery, autojump_clock
):
    """establish() itself: ada's password is refused after the credentials became
    bob's; the attempt logs in as bob instead of raising AuthenticationFailed."""
    net.nodes["b:1"] = ScriptedNode(users={"bob": {"pb"}}, delay=1.0)
    auth = Authenticator(Credentials(user="ada", password="pa"))
    result: list[Connection] = []

    async def attempt() -> None:
        result.append(await connect(nursery, auth, "b:1"))

    async with trio.open_nursery() as inner:
        inner.start_soon(attempt)
        await trio.sleep(0.5)
        auth.reset(Credentials(user="bob", password="pb"))
    assert [user_of(net, c.welcome) for c in result] == ["bob"]
    assert kinds(net.nodes["b:1"]) == ["password", "password"]


def test_outcomes_of_replaced_credentials_are_ignored() -> None:
    auth = Authenticator(Credentials(user="ada", password="pa"))
    old = auth.fields(0.0, "a:1")
    auth.reset(Credentials(user="bob", password="pb"))
    welcome = Welcome(
        version=PROTOCOL_VERSIONS[-1],
        node_id="n",
        session_id="s-ada",
        max_frame_size=1 << 20,
        max_in_flight=8,
        idle_timeout_ms=30_000,
        session_token="token-of-ada",
        session_expires_ms=60_000,
    )
    assert auth.succeeded(old, welcome, 1.0) is False
    assert auth.session_id is None and auth.fields(1.0, "a:1").mode is Login.PASSWORD
    refusal = _refusal()
    assert auth.refused(old, "a:1", refusal) is Retry.AFRESH
    assert auth.fields(1.0, "a:1").credentials == {"user": "bob", "password": "pb"}


async def test_reauthenticate_wakes_attempts_waiting_for_a_login_with_the_old_credentials(
    autojump_clock,
):
    auth = Authenticator(Credentials(user="ada", password="pa"))
    leader = await auth.begin("a:1")
    assert leader.leader
    woken: list[HelloAuth] = []

    async def waiter() -> None:
        woken.append(await auth.begin("b:1"))

    async with trio.open_nursery() as inner:
        inner.start_soon(waiter)
        await trio.sleep(0.1)
        auth.reset(Credentials(user="bob", password="pb"))
    assert trio.current_time() == pytest.approx(0.1)  # not after login_wait
    assert woken[0].credentials == {"user": "bob", "password": "pb"} and woken[0].leader
    auth.end(leader)  # the old leader ending must not end the new one's flight
    assert woken[0].flight is not None and not woken[0].flight.is_set()


# ------------------------------------------------ a refused token, then the password


async def test_a_refused_token_is_followed_by_the_password_not_a_newer_token(
    net: AuthNetwork, nursery: trio.Nursery, autojump_clock
):
    """b accepts ada's password but knows none of the tokens a issued. The
    attempt to b sends token T1; meanwhile a connection to a brings T2; when b
    refused T1 the retry sent T2 (refused too: final, b AUTH_FAILED), never the
    password docs/security.md promises."""
    net.nodes["a:1"] = ScriptedNode(users={"ada": {"pa"}})
    net.nodes["b:1"] = ScriptedNode(users={"ada": {"pa"}}, store="another", delay=0.5)
    auth = Authenticator(Credentials(user="ada", password="pa"))
    await connect(nursery, auth, "a:1")
    result: list[Connection] = []

    async def to_b() -> None:
        result.append(await connect(nursery, auth, "b:1"))

    async with trio.open_nursery() as inner:
        inner.start_soon(to_b)
        await trio.sleep(0.1)
        await connect(nursery, auth, "a:1")
    assert kinds(net.nodes["b:1"]) == ["token", "password"]
    assert [user_of(net, c.welcome) for c in result] == ["ada"]


@pytest.mark.parametrize("min_connections", [1, 2, 4, 8])
async def test_a_node_that_accepts_the_password_but_not_the_token_comes_up(
    net: AuthNetwork, autojump_clock, min_connections: int
):
    net.nodes["a:1"] = ScriptedNode(users={"ada": {"pa"}})
    net.nodes["b:1"] = ScriptedNode(users={"ada": {"pa"}}, store="another", delay=0.2)
    async with qdb_client.open_client(
        ["a:1", "b:1"], **EXACT, credentials=("ada", "pa"), min_connections=min_connections
    ) as client:
        await trio.sleep(20)
        b = client._cluster.find("b:1")
        assert b.auth_failed is None, kinds(net.nodes["b:1"])
        assert b.state.value == "UP"


# ------------------------------------------------ a refused password, once per node


async def test_a_refused_password_is_not_resent_by_an_attempt_waiting_for_it(
    net: AuthNetwork, nursery: trio.Nursery, autojump_clock
):
    """Two attempts to a node that refuses the password: the second waited for
    the first's login (single-flight), then led one of its own and sent the
    refused password again."""
    net.nodes["b:1"] = ScriptedNode(users={"ada": {"other"}}, delay=0.5)
    auth = Authenticator(Credentials(user="ada", password="s3cret-pa"))
    errors: list[AuthenticationFailed] = []

    async def to_b(after: float) -> None:
        await trio.sleep(after)
        with pytest.raises(AuthenticationFailed) as info:
            await connect(nursery, auth, "b:1")
        errors.append(info.value)

    async with trio.open_nursery() as inner:
        inner.start_soon(to_b, 0.0)
        inner.start_soon(to_b, 0.1)
    assert net.nodes["b:1"].password_hellos() == [0.0]
    assert len(errors) == 2 and errors[0] is not errors[1]
    assert all(e.reason == "credentials" and not e.retryable for e in errors)
    for error in errors:
        assert "s3cret" not in str(error) and "s3cret" not in repr(error)
    # Another node still gets the password (a refusal is one node's), and
    # new credentials may go to b again.
    net.nodes["c:1"] = ScriptedNode(users={"ada": {"s3cret-pa"}})
    await connect(nursery, auth, "c:1")
    auth.reset(Credentials(user="ada", password="other"))
    await connect(nursery, auth, "b:1")
    assert len(net.nodes["b:1"].password_hellos()) == 2


@pytest.mark.parametrize("min_connections", [1, 4, 8])
async def test_concurrent_opens_send_a_refused_password_once(
    net: AuthNetwork, autojump_clock, min_connections: int
):
    net.nodes["a:1"] = ScriptedNode(users={"ada": {"pa"}})
    net.nodes["b:1"] = ScriptedNode(users={"ada": {"other"}}, store="another", delay=0.2)
    async with qdb_client.open_client(
        ["a:1", "b:1"], **EXACT, credentials=("ada", "pa"), min_connections=min_connections
    ) as client:
        await trio.sleep(20)
        b = client._cluster.find("b:1")
        assert b.auth_failed is not None
        assert len(net.nodes["b:1"].password_hellos()) <= 1, kinds(net.nodes["b:1"])


def _refusal() -> AuthenticationFailed:
    error = server_error_from_wire(
        code=401,
        name="UNAUTHENTICATED",
        message="refused",
        retryable=False,
        details={"reason": "credentials"},
    )
    assert isinstance(error, AuthenticationFailed)
    return error
