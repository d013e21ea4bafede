"""TLS between the driver and test nodes, over real sockets (issue 9).

A throwaway certificate authority (``trustme``) signs the nodes'
certificates. Every way TLS can go wrong is a typed
:class:`~qdb_client.errors.TlsError` raised before anything (a password
included) is sent: an unknown authority, a certificate for another host
name, a plain client on a TLS node, a TLS client on a plain node, a client
certificate missing where the node requires one.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme

import qdb_client
from qdb_client.errors import TlsError
from qdb_client.testing import TestCluster, open_node

from ..common.fixtures import node_config

FAST = {"connect_timeout": 2.0, "reconnect_initial": 0.05, "reconnect_max": 0.2}


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_cert(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    """A certificate for ``names`` signed by ``ca``: (chain file, key file)."""
    cert = ca.issue_cert(*names)
    chain, key = directory / f"{names[0]}.pem", directory / f"{names[0]}.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    return chain, key


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def node_tls(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    cert, key = write_cert(ca, tmp_path, "127.0.0.1", "localhost")
    return {"tls_cert": cert, "tls_key": key}


async def test_a_verified_tls_connection(node_tls, ca, tmp_path):
    async with open_node(node_config(tmp_path, **node_tls, credentials={"ada": "pw"})) as node:
        async with qdb_client.open_client(
            node.address, tls=trusting(ca), credentials=("ada", "pw")
        ) as client:
            await client.execute("CREATE TABLE t (x)")
            await client.execute("INSERT INTO t VALUES (?)", [1])
            assert (await client.query("SELECT x FROM t")).rows[0][0] == 1
            assert client.statistics()["tls"] is True
        assert node.statistics()["tls"] is True


async def test_a_certificate_from_an_unknown_authority_is_refused(node_tls, tmp_path):
    async with open_node(node_config(tmp_path, **node_tls, credentials={"ada": "pw"})) as node:
        with pytest.raises(TlsError) as info:
            async with qdb_client.open_client(
                node.address, tls=trusting(trustme.CA()), credentials=("ada", "pw"), **FAST
            ):
                pass
        assert info.value.verification_failed and not info.value.retryable
        with pytest.raises(TlsError):  # the system's authorities don't know it either
            async with qdb_client.open_client(node.address, tls=True, **FAST):
                pass
        assert node.statistics()["auth"]["password_hellos"] == 0  # nothing reached it


async def test_a_certificate_for_another_host_name_is_refused(ca, tmp_path):
    cert, key = write_cert(ca, tmp_path, "db.internal.test")
    async with open_node(node_config(tmp_path, tls_cert=cert, tls_key=key)) as node:
        with pytest.raises(TlsError, match="refused") as info:
            async with qdb_client.open_client(node.address, tls=trusting(ca), **FAST):
                pass
        assert info.value.verification_failed
        async with qdb_client.open_client(
            node.address, tls=trusting(ca), tls_server_hostname="db.internal.test"
        ) as client:
            await client.ping()


async def test_a_plain_client_to_a_tls_node_is_told_to_use_tls(node_tls, tmp_path):
    async with open_node(node_config(tmp_path, **node_tls)) as node:
        with trio.fail_after(5):
            with pytest.raises(TlsError, match="speaks TLS only") as info:
                async with qdb_client.open_client(node.address, **FAST):
                    pass
        assert info.value.tls_required and not info.value.retryable


async def test_a_tls_client_to_a_plain_node_is_refused(ca, tmp_path):
    async with open_node(node_config(tmp_path)) as node:
        with trio.fail_after(5):
            with pytest.raises(TlsError, match="does not seem to speak TLS"):
                async with qdb_client.open_client(node.address, tls=trusting(ca), **FAST):
                    pass


async def test_a_silent_socket_on_a_tls_node_is_closed_after_the_handshake_timeout(
    node_tls, tmp_path
):
    config = node_config(tmp_path, **node_tls, tls_handshake_timeout=0.2)
    async with open_node(config) as node:
        host, port = node.address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        with trio.fail_after(3):
            assert await stream.receive_some(100) == b""  # closed, never hangs
        await stream.aclose()


async def test_client_certificates(ca, node_tls, tmp_path):
    authority = tmp_path / "client-ca.pem"
    authority.write_bytes(ca.cert_pem.bytes())
    config = node_config(tmp_path, **node_tls, tls_client_ca=authority)
    async with open_node(config) as node:
        with pytest.raises(TlsError):
            async with qdb_client.open_client(node.address, tls=trusting(ca), **FAST):
                pass
        context = trusting(ca)
        ca.issue_cert("client@example.test").configure_cert(context)
        async with qdb_client.open_client(node.address, tls=context) as client:
            await client.ping()


async def test_a_tls_cluster_discovers_reconnects_and_heartbeats(ca, node_tls):
    """Three TLS nodes with credentials: the client configured with one finds
    the other two (same host, so trusted with the credentials), keeps them
    alive with heartbeats, and reconnects, with its session token, to a node
    restarted on the same port."""
    context = trusting(ca)
    async with (
        TestCluster.start_in_process(
            3,
            **node_tls,
            credentials={"ada": "pw"},
            control_options={"tls": context, "credentials": {"user": "ada", "password": "pw"}},
        ) as cluster,
        qdb_client.open_client(
            cluster.addresses[0],
            tls=context,
            credentials=("ada", "pw"),
            heartbeat_interval=0.1,
            **FAST,
        ) as client,
    ):
        with trio.fail_after(5):
            while len(client.statistics()["nodes"]) < 3 or not all(  # noqa: ASYNC110
                n["connections"]["open"] for n in client.statistics()["nodes"]
            ):
                await trio.sleep(0.02)
        await client.execute("CREATE TABLE t (x)")
        await cluster.kill(1)
        await cluster.restart(1)
        restarted = cluster.nodes[1].node
        assert restarted is not None
        with trio.fail_after(5):
            while not restarted.statistics()["pings_answered"]:  # noqa: ASYNC110
                await trio.sleep(0.02)
        for i in range(6):
            await client.execute("INSERT INTO t VALUES (?)", [i])
        async with cluster.control(1) as control:  # the control tool over TLS too
            assert await control.ping() == cluster.nodes[1].node_id
        assert restarted.statistics()["auth"]["password_hellos"] == 0  # tokens only
        assert client.statistics()["session"]["password_logins"] == 1
