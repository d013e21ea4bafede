"""Wrong credentials are final, sessions spare the password, credentials go only
where they belong (issue 9), in virtual time over scripted nodes.

The scripted nodes (tests/unit/fake_auth.py) check HELLO like a real one
(docs/protocol.md 7.3, 7.4) and record every HELLO they received, so a test
can count what reached them.
"""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import AuthenticationFailed, ConfigError, Unauthenticated
from qdb_client.events import AuthenticationRefused, Event, MemberSkipped
from qdb_client.protocol import Hello, Member, Welcome
from qdb_client.testing import ServerConfig

from .fake_auth import EXACT, PASSWORD, AuthNetwork, ScriptedNode, net, options

__all__ = ["net"]

# ------------------------------------------------------- wrong credentials


async def test_refused_credentials_reach_each_node_once_in_ten_seconds(
    net: AuthNetwork, autojump_clock
):
    """Issue 9: a node that refused the password got it again from background
    reconnects, 5 times in 10 s with 2 nodes, then every 30 s for good. Now it
    is AUTH_FAILED: one HELLO with the password per node, however long."""
    net.nodes["a:1"] = ScriptedNode()
    net.nodes["b:1"] = ScriptedNode(passwords={"another-password"}, store="another cluster")
    events: list[Event] = []
    async with qdb_client.open_client(["a:1", "b:1"], **options(listeners=[events.append])) as c:
        for _ in range(20):
            await c.query("select 1")
            await trio.sleep(0.5)
        b = next(n for n in c.statistics()["nodes"] if n["address"] == "b:1")
        assert b["auth_failed"] is True and b["state"] == "DOWN"
        assert len(net.nodes["b:1"].password_hellos()) == 1
        assert len(net.nodes["b:1"].hellos) <= 2  # maybe a token first, refused too
        assert len(net.nodes["a:1"].password_hellos()) == 1  # a:1 later: tokens only
        assert [e.node for e in events if isinstance(e, AuthenticationRefused)] == ["b:1"]
        assert "AUTH_FAILED" in c._cluster.find("b:1").describe(trio.current_time())


async def test_every_node_refusing_fails_open_client_at_once(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode(passwords={"x"})
    net.nodes["b:1"] = ScriptedNode(passwords={"x"})
    started = trio.current_time()
    with pytest.raises(AuthenticationFailed) as info:
        async with qdb_client.open_client(["a:1", "b:1"], **options()):
            pass
    assert isinstance(info.value, Unauthenticated)  # existing handlers keep working
    assert not info.value.retryable and info.value.reason == "credentials"
    assert trio.current_time() - started < 1.0
    assert [len(n.hellos) for n in net.nodes.values()] == [1, 1]


async def test_a_request_meeting_a_refusal_is_not_retried(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode()
    async with qdb_client.open_client("a:1", **options(keep_password=False)) as client:
        await client.query("select 1")
        net.tokens.clear()  # the cluster forgot every session
        await net.drop("a:1")
        await trio.sleep(1)  # the probe's reconnect is refused: AUTH_FAILED
        with pytest.raises(AuthenticationFailed) as info:
            await client.query("select 1")
        assert info.value.reason == "session"
        assert len(info.value.attempts) == 1, [str(a) for a in info.value.attempts]
        await trio.sleep(10)
        assert len(net.nodes["a:1"].password_hellos()) == 1
        assert client.statistics()["session"]["password_kept"] is False


async def test_reauthenticate_clears_auth_failed_and_logs_in_again(
    net: AuthNetwork, autojump_clock
):
    net.nodes["a:1"] = ScriptedNode(passwords={PASSWORD, "rotated"})
    net.nodes["b:1"] = ScriptedNode(passwords={"rotated"}, store="another cluster")
    async with qdb_client.open_client(["a:1", "b:1"], **options()) as client:
        await trio.sleep(5)
        assert client._cluster.find("b:1").auth_failed is not None
        with pytest.raises(ConfigError):
            await client.reauthenticate("ada", b"bytes")  # type: ignore[arg-type]
        await client.reauthenticate("ada", "rotated")
        await trio.sleep(2)
        b = client._cluster.find("b:1")
        assert b.auth_failed is None and b.state.value == "UP"
        # b:1 got the old password once, and the new one once now.
        assert len(net.nodes["b:1"].password_hellos()) == 2
        with pytest.raises(AuthenticationFailed):
            await client.reauthenticate("ada", "wrong")


# --------------------------------------------------------------- sessions


async def test_reconnects_and_new_connections_use_the_token(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode()
    async with qdb_client.open_client("a:1", **options(min_connections=2)) as client:
        await trio.testing.wait_all_tasks_blocked()
        session = client.statistics()["session"]["session_id"]
        for _ in range(3):
            await net.drop("a:1")
            await trio.sleep(3)
            await client.query("select 1")
        stats = client.statistics()["session"]
        assert stats["session_id"] == session
        assert stats["password_logins"] == 1 and stats["token_logins"] >= 6
        assert len(net.nodes["a:1"].password_hellos()) == 1
        assert all(h.resume_session == session for _, h in net.nodes["a:1"].hellos[1:])
        assert "token-" not in repr(client.statistics())
        assert PASSWORD not in repr(client.statistics())


async def test_starting_against_three_nodes_sends_the_password_once(
    net: AuthNetwork, autojump_clock
):
    for address in ("a:1", "a:2", "a:3"):
        net.nodes[address] = ScriptedNode()
    async with qdb_client.open_client(["a:1", "a:2", "a:3"], **options()) as client:
        await trio.sleep(1)
        assert all(n["connections"]["open"] for n in client.statistics()["nodes"])
    assert sum(len(n.password_hellos()) for n in net.nodes.values()) == 1


async def test_the_token_is_renewed_at_half_its_time_to_live(net: AuthNetwork, autojump_clock):
    """Seed 002's TC10: work that outlasts a token never meets an expired one,
    because the client renews it before it expires (with the token, never the
    password), even when it opens no connection by itself."""
    net.nodes["a:1"] = ScriptedNode(ttl_ms=60_000)
    async with qdb_client.open_client("a:1", **options(heartbeat_interval=5.0)) as client:
        start = trio.current_time()
        await trio.sleep(100)
        renewals = [t - start for t in net.nodes["a:1"].token_hellos()]
        assert [round(t) for t in renewals] == [30, 60, 90]
        assert len(net.nodes["a:1"].password_hellos()) == 1
        assert client.statistics()["session"]["refreshes"] == 3
        assert client.statistics()["session"]["expires_in"] > 30


async def test_a_refused_token_falls_back_to_the_kept_password(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode()
    async with qdb_client.open_client("a:1", **options()) as client:
        await client.query("select 1")
        net.tokens.clear()
        await net.drop("a:1")
        await trio.sleep(3)
        await client.query("select 1")
        stats = client.statistics()["session"]
        assert stats["token_refusals"] == 1 and stats["password_logins"] == 2
        assert not client._cluster.find("a:1").auth_failed


async def test_keep_password_false_forgets_it_once_a_token_came(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode()
    async with qdb_client.open_client("a:1", **options(keep_password=False)) as client:
        assert client.statistics()["session"]["password_kept"] is False
        assert PASSWORD not in repr(vars(client._auth))


async def test_a_node_without_sessions_keeps_getting_the_password(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode(tokens=False)
    async with qdb_client.open_client("a:1", **options(keep_password=False)) as client:
        await net.drop("a:1")
        await trio.sleep(3)
        await client.query("select 1")
        assert client.statistics()["session"]["password_kept"] is True
    assert len(net.nodes["a:1"].password_hellos()) >= 2


# ------------------------------------------------------ announced members


async def test_a_member_on_another_host_never_gets_the_credentials(
    net: AuthNetwork, autojump_clock
):
    """Issue 9: a listener named only in a hostile WELCOME's member list got the
    password. It is now not used at all (reported), while a member on a
    configured host (another port) is."""
    net.nodes["a:1"] = ScriptedNode()
    net.nodes["a:2"] = ScriptedNode()
    net.nodes["evil:7000"] = ScriptedNode()
    net.members = (Member("m-2", "a:2"), Member("m-evil", "evil:7000"))
    events: list[Event] = []
    async with qdb_client.open_client("a:1", **options(listeners=[events.append])) as client:
        await trio.sleep(5)
        stats = client.statistics()
        assert stats["members_untrusted"] == 1 and stats["untrusted_members"] == ["evil:7000"]
        assert {n["address"] for n in stats["nodes"]} == {"a:1", "a:2"}
    assert "evil:7000" not in net.connects and not net.nodes["evil:7000"].hellos
    assert net.nodes["a:2"].hellos  # same host, another port: trusted
    skipped = [e for e in events if isinstance(e, MemberSkipped)]
    assert [(e.node, e.node_id) for e in skipped] == [("evil:7000", "m-evil")]


async def test_trust_announced_members_sends_them_the_credentials(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode()
    net.nodes["b:7000"] = ScriptedNode()
    net.members = (Member("m-b", "b:7000"),)
    async with qdb_client.open_client("a:1", **options(trust_announced_members=True)):
        await trio.sleep(2)
    assert net.nodes["b:7000"].hellos


async def test_without_credentials_every_member_is_used(net: AuthNetwork, autojump_clock):
    net.nodes["a:1"] = ScriptedNode(passwords=None)
    net.nodes["b:7000"] = ScriptedNode(passwords=None)
    net.members = (Member("m-b", "b:7000"),)
    async with qdb_client.open_client("a:1", **EXACT):
        await trio.sleep(2)
    assert net.nodes["b:7000"].hellos


async def test_credentials_given_later_drop_untrusted_members(net: AuthNetwork, autojump_clock):
    """A client opened without credentials uses every member; ``reauthenticate``
    gives it credentials, and the members the policy does not trust are dropped
    before any of them could receive them."""
    net.nodes["a:1"] = ScriptedNode(passwords=None)
    net.nodes["b:7000"] = ScriptedNode(passwords=None)
    net.members = (Member("m-b", "b:7000"),)
    async with qdb_client.open_client("a:1", **EXACT) as client:
        await trio.sleep(2)
        assert {n["address"] for n in client.statistics()["nodes"]} == {"a:1", "b:7000"}
        before = len(net.nodes["b:7000"].hellos)
        await client.reauthenticate("ada", PASSWORD)
        await trio.sleep(5)
        assert {n["address"] for n in client.statistics()["nodes"]} == {"a:1"}
    assert not any(h.credentials for _, h in net.nodes["b:7000"].hellos[before:])


# ----------------------------------------------------------------- secrets


def test_secrets_never_show_in_messages_and_configs():
    hello = Hello(versions=(1,), credentials={"user": "ada", "password": PASSWORD})
    hello = attrs.evolve(hello, session_token="tok-secret")
    welcome = Welcome(1, "n", "s", 1024, 1, 1, session_token="tok-secret", session_expires_ms=1)
    for text in (repr(hello), str(hello), repr(welcome)):
        assert PASSWORD not in text and "tok-secret" not in text
    assert "'ada'" in repr(hello) and "'***'" in repr(hello)
    server = ServerConfig(credentials={"ada": PASSWORD})
    client = qdb_client.ClientConfig(hosts=["a:1"], credentials=("ada", PASSWORD))
    for config in (server, client):
        for text in (repr(config), repr(attrs.asdict(config)), str(attrs.astuple(config))):
            assert PASSWORD not in text
    assert server.credentials is not None and server.credentials["ada"].reveal() == PASSWORD
    with pytest.raises(ConfigError) as info:
        ServerConfig(credentials={"ada": b"bytes-password"})
    assert "bytes-password" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        qdb_client.Credentials(user="ada", password=b"bytes-password")
    assert "bytes-password" not in str(info.value)


def test_tls_options_are_checked():
    with pytest.raises(ConfigError, match="tls must be"):
        qdb_client.ClientConfig(hosts=["a:1"], tls="yes")
    with pytest.raises(ConfigError, match="tls_server_hostname"):
        qdb_client.ClientConfig(hosts=["a:1"], tls=True, tls_server_hostname="a b")
    config = qdb_client.ClientConfig.from_uri("qdb://h/?tls=true&tls_server_hostname=db.test")
    assert config.tls is True and config.tls_server_hostname == "db.test"
    with pytest.raises(ConfigError, match="tls_key and tls_client_ca need tls_cert"):
        ServerConfig(tls_key=__file__)
    with pytest.raises(ConfigError, match="no such file"):
        ServerConfig(tls_cert="/nonexistent/cert.pem")


async def test_a_token_that_expires_at_once_is_not_renewed_in_a_loop(
    net: AuthNetwork, autojump_clock
):
    """A node (buggy or hostile) whose tokens live 0.5 s: they are ignored, not
    renewed over and over (which would hammer the node with handshakes)."""
    net.nodes["a:1"] = ScriptedNode(ttl_ms=500)
    async with qdb_client.open_client("a:1", **options(heartbeat_interval=5.0)) as client:
        await trio.sleep(10)
        assert client.statistics()["session"]["session_id"] is None
    assert len(net.nodes["a:1"].hellos) <= 2
