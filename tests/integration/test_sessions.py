"""Sessions across nodes and credentials of node processes, over real TCP (issue 9).

- Seed 000's TC-TR-012: a connection drops, the client reconnects to another
  node with its session token, the same session continues, pending keyed
  writes are retried and completed ones are not duplicated.
- A node's credentials never appear on its command line.
"""

from __future__ import annotations

import logging
import ssl
import sys

import pytest
import trio
import trustme

import qdb_client
from qdb_client.errors import ConfigError
from qdb_client.testing import TestCluster
from qdb_client.testing.cli import build_parser, config_from_args, options_to_args

PASSWORD = "tc-tr-012-password"
FAST = {
    "connect_timeout": 2.0,
    "reconnect_initial": 0.05,
    "reconnect_max": 0.2,
    "retry_jitter": "none",
    "attempt_timeout_factor": 0,
}


async def wait_until(predicate, within: float = 5.0) -> None:
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_TC_TR_012_session_continues_on_another_node_after_a_connection_drop():
    async with TestCluster.start_in_process(3, credentials={"ada": PASSWORD}) as cluster:
        nodes = [server.node for server in cluster.nodes]
        assert all(nodes)
        n0 = nodes[0]
        assert n0 is not None
        a1, a2 = cluster.addresses[1:]
        async with qdb_client.open_client(
            cluster.addresses, credentials=("ada", PASSWORD), **FAST
        ) as client:
            await wait_until(
                lambda: all(n["connections"]["open"] for n in client.statistics()["nodes"])
            )
            session = client.statistics()["session"]["session_id"]
            assert session is not None
            await client.execute("CREATE TABLE t (k TEXT)")
            client.mark_node_unhealthy(a1)
            client.mark_node_unhealthy(a2)  # everything goes to n0 now
            for key in ("done-1", "done-2", "done-3"):
                await client.execute("INSERT INTO t VALUES (?)", [key], idempotency_key=key)

            # Three keyed writes in flight on n0; the first to commit loses its
            # reply with the connection (the others are cut off with it).
            n0.faults.add_latency("execute", 0.3)
            n0.faults.drop_after_commit(1)
            pending = ("pending-1", "pending-2", "pending-3")

            async def write(key: str) -> None:
                await client.execute("INSERT INTO t VALUES (?)", [key], idempotency_key=key)

            async with trio.open_nursery() as nursery:
                for key in pending:
                    nursery.start_soon(write, key)
                await wait_until(lambda: n0.statistics()["in_flight"] == 3)
                client.mark_node_healthy(a1)
                client.mark_node_healthy(a2)

            rows = (await client.query("SELECT k, count(*) FROM t GROUP BY k ORDER BY k")).rows
            assert [tuple(row) for row in rows] == [
                ("done-1", 1),
                ("done-2", 1),
                ("done-3", 1),
                ("pending-1", 1),
                ("pending-2", 1),
                ("pending-3", 1),
            ]
            stats = client.statistics()
            assert stats["retries"] >= 3  # every pending write went again
            assert stats["session"]["session_id"] == session  # the same session
            assert stats["session"]["token_refusals"] == 0
        auth = [node.statistics()["auth"] for node in nodes if node is not None]
        # The password went out once, at the start; every other handshake, on
        # n1 and n2 after the drop included, resumed the session with a token.
        assert sum(a["password_hellos"] for a in auth) == 1
        assert auth[1]["sessions_resumed"] >= 1 and auth[2]["sessions_resumed"] >= 1
        assert sum(a["sessions_created"] for a in auth) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_a_node_started_with_credentials_has_no_password_on_its_command_line(tmp_path):
    """A node process with credentials (and TLS, through its command line flags):
    the password is in a file only its owner can read, not in its argv."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "node.pem", tmp_path / "node.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    context = ssl.create_default_context()
    ca.configure_trust(context)
    async with TestCluster.start_subprocesses(
        1,
        directory=tmp_path / "cluster",
        credentials={"ada": PASSWORD},
        tls_cert=chain,
        tls_key=key,
    ) as cluster:
        pid = cluster.nodes[0].pid
        assert pid is not None
        cmdline = await trio.Path(f"/proc/{pid}/cmdline").read_bytes()
        assert b"--credentials-file" in cmdline and PASSWORD.encode() not in cmdline
        credentials = tmp_path / "cluster" / "credentials"
        assert credentials.stat().st_mode & 0o077 == 0  # readable by its owner only
        async with qdb_client.open_client(
            cluster.addresses, credentials=("ada", PASSWORD), tls=context, **FAST
        ) as client:
            await client.ping()
            assert client.statistics()["tls"] is True
        with pytest.raises(qdb_client.AuthenticationFailed):
            async with qdb_client.open_client(
                cluster.addresses, credentials=("ada", "wrong"), tls=context, **FAST
            ):
                pass


def test_credentials_come_from_a_file_or_the_environment(tmp_path, caplog):
    path = tmp_path / "creds"
    path.write_text("# users\nada:pw:with:colons\n\nbob: spaced \n")
    ns = build_parser().parse_args(["--credentials-file", str(path)])
    config = config_from_args(ns, environ={})
    assert config.credentials is not None
    assert {u: s.reveal() for u, s in config.credentials.items()} == {
        "ada": "pw:with:colons",
        "bob": " spaced ",
    }
    ns = build_parser().parse_args([])
    config = config_from_args(ns, environ={"QDB_NODE_CREDENTIALS": "eve:from-env"})
    assert config.credentials is not None and config.credentials["eve"].reveal() == "from-env"
    path.write_text("ada:one\nno-colon-secret\n")
    ns = build_parser().parse_args(["--credentials-file", str(path)])
    with pytest.raises(ConfigError, match="line 2") as info:
        config_from_args(ns, environ={})
    assert "no-colon-secret" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="qdb_client.testing"):
        ns = build_parser().parse_args(["--credentials", "ada:argv-pw"])
        assert config_from_args(ns, environ={}).credentials is not None
    assert "deprecated" in caplog.text and "argv-pw" not in caplog.text
    with pytest.raises(ConfigError, match="command line"):
        options_to_args({"credentials": {"ada": "pw"}})
