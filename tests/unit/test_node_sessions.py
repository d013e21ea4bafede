"""Server-issued sessions on real test nodes, in virtual time over memory streams.

Two nodes share one database (a cluster): a session token one issued
resumes the session on the other; a token is valid for ``session_ttl``
seconds of the store's clock (here the trio clock); the driver renews it
before it expires, so work that outlasts a token (seed 002's TC10) is never
failed by it and reconnects never need the password again.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

import qdb_client
import qdb_client._transport.establish as establish_module
from qdb_client.protocol import Hello, Welcome
from qdb_client.testing import QdbNode, ServerConfig
from qdb_client.testing.sessions import answer

PASSWORD = "node-pw"
EXACT = {"retry_jitter": "none", "reconnect_jitter": 0.0, "slow_start": 0.0, "random_seed": 3}


@pytest.fixture
async def cluster(tmp_path: Path, nursery, monkeypatch) -> AsyncIterator[dict[str, QdbNode]]:
    """Nodes ``n1:7000`` and ``n2:7000`` on one database, reached over memory streams."""
    nodes = {
        f"n{i}:7000": QdbNode(
            ServerConfig(
                node_id=f"n{i}",
                database=tmp_path / "db.sqlite3",
                credentials={"ada": PASSWORD},
                session_ttl=60.0,
                request_timeout=300.0,
                test_mode=True,
            )
        )
        for i in (1, 2)
    }
    for node in nodes.values():
        node.sessions.clock = trio.current_time

    async def open_tcp(address: str) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if address not in nodes or nodes[address].stopped:
            raise qdb_client.ConnectError(f"cannot connect to {address}", node=address)
        client_end, node_end = trio.testing.memory_stream_pair()
        nursery.start_soon(nodes[address].serve_connection, node_end)
        return client_end

    monkeypatch.setattr(establish_module, "open_tcp", open_tcp)
    yield nodes
    for node in nodes.values():
        await node.aclose()


def hello(**fields: object) -> Hello:
    return Hello(versions=(1,), **fields)  # type: ignore[arg-type]


async def test_a_token_from_one_node_resumes_the_session_on_another(cluster, autojump_clock):
    n1, n2 = cluster["n1:7000"], cluster["n2:7000"]
    first = await n1.answer_hello(hello(credentials={"user": "ada", "password": PASSWORD}))
    welcome = first.reply
    assert isinstance(welcome, Welcome) and welcome.session_token is not None
    assert welcome.session_expires_ms == 60_000 and len(welcome.session_token) >= 22
    again = await n2.answer_hello(
        hello(resume_session=welcome.session_id, session_token=welcome.session_token)
    )
    assert isinstance(again.reply, Welcome) and again.user == "ada"
    assert again.reply.session_id == welcome.session_id
    assert again.reply.session_token not in (None, welcome.session_token)
    # The token is bound to its session, expires, and is never stored itself.
    other = await n2.answer_hello(
        hello(resume_session="other", session_token=welcome.session_token)
    )
    assert other.reply.name == "UNAUTHENTICATED" and other.reply.details["reason"] == "session"
    assert n2.storage.path is not None
    with sqlite3.connect(n2.storage.path) as db:
        stored = {row[0] for row in db.execute("SELECT token_hash FROM qdb_sessions")}
    assert welcome.session_token not in stored
    assert hashlib.sha256(welcome.session_token.encode()).hexdigest() in stored
    await trio.sleep(61)
    late = await n1.answer_hello(
        hello(resume_session=welcome.session_id, session_token=welcome.session_token)
    )
    assert late.reply.name == "UNAUTHENTICATED" and late.reply.details["reason"] == "session"
    # With the password beside it, a refused token falls back to the password.
    fallback = await n1.answer_hello(
        hello(
            resume_session=welcome.session_id,
            session_token=welcome.session_token,
            credentials={"user": "ada", "password": PASSWORD},
        )
    )
    assert isinstance(fallback.reply, Welcome) and fallback.user == "ada"
    assert n1.statistics()["auth"]["token_refused"] == 2  # the late one, the fallback


async def test_a_forged_session_row_is_ignored(cluster, autojump_clock):
    """Client SQL that reached ``qdb_sessions`` can't mint a session: rows are
    bound to the user's password by their MAC."""
    n1 = cluster["n1:7000"]
    await n1.answer_hello(hello(credentials={"user": "ada", "password": PASSWORD}))
    forged = "forged-token-0123456789"
    assert n1.storage.path is not None
    with sqlite3.connect(n1.storage.path) as db:
        db.execute(
            "INSERT INTO qdb_sessions VALUES (?, 's-forged', 'ada', 99999999999999, 'f00')",
            (hashlib.sha256(forged.encode()).hexdigest(),),
        )
    reply = (await n1.answer_hello(hello(resume_session="s-forged", session_token=forged))).reply
    assert reply.name == "UNAUTHENTICATED"


async def test_changing_a_password_revokes_its_sessions(cluster, autojump_clock, tmp_path):
    n1 = cluster["n1:7000"]
    welcome = (
        await n1.answer_hello(hello(credentials={"user": "ada", "password": PASSWORD}))
    ).reply
    rotated = QdbNode(n1.config.evolve(credentials={"ada": "rotated"}))
    rotated.sessions.clock = trio.current_time
    try:
        reply = await rotated.answer_hello(
            hello(resume_session=welcome.session_id, session_token=welcome.session_token)
        )
        assert reply.reply.name == "UNAUTHENTICATED"
    finally:
        await rotated.aclose()


async def test_work_outlasting_the_token_is_not_failed_by_it(cluster, autojump_clock):
    """Seed 002's TC10: a query that runs for three times the token's time to
    live completes; the client renews its token meanwhile; a reconnect after
    it still resumes the session without the password."""
    n1, n2 = cluster["n1:7000"], cluster["n2:7000"]
    n1.faults.add_latency("query", 180.0)
    n2.faults.add_latency("query", 180.0)
    async with qdb_client.open_client(
        ["n1:7000", "n2:7000"],
        credentials=("ada", PASSWORD),
        request_timeout=400.0,
        attempt_timeout_factor=0,
        heartbeat_interval=30.0,
        **EXACT,
    ) as client:
        session = client.statistics()["session"]["session_id"]
        result = await client.query("select 42")
        assert result.rows[0][0] == 42
        n1.faults.add_latency("query", 0)
        n2.faults.add_latency("query", 0)
        n1.drop_connections()
        n2.drop_connections()
        await trio.sleep(5)
        assert (await client.query("select 7")).rows[0][0] == 7
        stats = client.statistics()["session"]
        assert stats["session_id"] == session and stats["refreshes"] >= 5
        assert stats["token_refusals"] == 0
    logins = [node.statistics()["auth"] for node in (n1, n2)]
    assert sum(a["password_hellos"] for a in logins) == 1
    assert sum(a["token_refused"] for a in logins) == 0


async def test_a_node_without_credentials_issues_no_token(tmp_path, autojump_clock):
    node = QdbNode(ServerConfig(database=tmp_path / "db.sqlite3"))
    try:
        reply = (await node.answer_hello(hello(credentials={"user": "x", "password": "y"}))).reply
        assert isinstance(reply, Welcome) and reply.session_token is None
        assert reply.session_expires_ms is None
    finally:
        await node.aclose()


async def test_a_broken_session_store_answers_unavailable(tmp_path, autojump_clock):
    node = QdbNode(ServerConfig(database=tmp_path / "db.sqlite3", credentials={"ada": "pw"}))
    node.sessions.close()  # the store can no longer be used
    try:
        reply = await answer(
            hello(credentials={"user": "ada", "password": "pw"}),
            node.config,
            node.sessions,
            node.auth_stats,
            node_id="n",
            members=node.members,
        )
        assert reply.reply.name == "UNAVAILABLE" and reply.reply.retryable
        assert node.auth_stats.store_errors == 1
    finally:
        await node.aclose()
