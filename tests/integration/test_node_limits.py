"""Issue 9, over real TCP: a node that clients which misbehave can't take down.

- A client that sends requests for large results and never reads its replies:
  the node's memory stays bounded and the connection is closed within the
  write timeout (a node process of its own, whose peak RSS is measured).
- Sockets that never send HELLO (or never finish TLS) are closed after the
  handshake timeout and can't keep real clients out.
"""

from __future__ import annotations

import socket
import ssl
import sys
from pathlib import Path

import pytest
import trio
import trustme

import qdb_client
from qdb_client.protocol import Hello, Request, encode_message
from qdb_client.testing import TestCluster, open_node

from ..common.fixtures import node_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/PID/status")

MIB = 1024 * 1024


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def _never_reading_client(address: str, requests: int, blob: int) -> trio.SocketStream:
    """Connect, handshake with a 16 MiB max_frame, send ``requests`` queries for
    ``blob``-byte results; never read anything."""
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await stream.send_all(encode_message(Hello(versions=(1,), max_frame_size=16 * MIB)))
    frames = b"".join(
        encode_message(Request(i, "query", {"sql": f"select zeroblob({blob})"}))
        for i in range(1, requests + 1)
    )
    with trio.move_on_after(5.0):  # the node stops reading once its backlog is full
        await stream.send_all(frames)
    return stream


async def test_a_client_that_never_reads_large_results_is_closed_and_node_memory_stays_bounded(
    tmp_path,
):
    # Before: two such connections took a node from 40 to 293 MiB, and stayed open.
    async with TestCluster.start_subprocesses(
        1, directory=tmp_path / "c", write_timeout=2.0, client_idle_timeout=60.0
    ) as cluster:
        server = cluster.nodes[0]
        assert server.pid is not None
        async with server.control() as control:
            await control.ping()
            before = _memory_kib(server.pid, "VmRSS")
            start = trio.current_time()
            streams = [await _never_reading_client(server.address, 200, 500_000) for _ in range(2)]
            with trio.fail_after(15.0):
                while (await control.stats())["connections_open"]:  # noqa: ASYNC110 - a remote counter
                    await trio.sleep(0.1)
            closed_after = trio.current_time() - start
            stats = await control.stats()
        peak = _memory_kib(server.pid, "VmHWM")
        for stream in streams:
            await stream.aclose()
    assert stats["slow_readers_closed"] == 2, stats
    assert stats["queued_reply_bytes"] == 0
    assert closed_after < 12.0  # 5 s of sending at most, then the 2 s write timeout
    grown_mib = (peak - before) / 1024
    assert grown_mib < 120, f"the node grew by {grown_mib:.0f} MiB"


async def test_sockets_that_never_send_hello_are_closed_and_do_not_keep_clients_out(tmp_path):
    config = node_config(tmp_path, handshake_timeout=1.0, max_pending_handshakes=20)
    async with open_node(config) as node:
        host, port = node.address.rsplit(":", 1)
        silent = [await trio.open_tcp_stream(host, int(port)) for _ in range(100)]
        start = trio.current_time()
        async with qdb_client.open_client(
            node.address, discover_members=False, connect_timeout=5.0
        ) as client:

            async def one_client() -> None:
                assert (await client.query("select 1"))[0][0] == 1

            async with trio.open_nursery() as nursery:
                for _ in range(17):
                    nursery.start_soon(one_client)
        served_after = trio.current_time() - start
        with trio.fail_after(5.0):
            for stream in silent:  # each one: closed (EOF, maybe after an ERROR)
                while await stream.receive_some(4096):
                    pass
        for stream in silent:
            await stream.aclose()
        stats = node.statistics()
    assert served_after < 5.0
    assert stats["handshake_timeouts"] + stats["handshakes_evicted"] >= 100
    assert stats["pending_handshakes"] == 0


async def test_a_socket_that_never_finishes_tls_is_closed_at_the_handshake_timeout(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    chain, key = tmp_path / "node.pem", tmp_path / "node.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    config = node_config(
        tmp_path, tls_cert=chain, tls_key=key, handshake_timeout=1.0, tls_handshake_timeout=30.0
    )
    async with open_node(config) as node:
        host, port = node.address.rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        start = trio.current_time()
        with trio.fail_after(10.0):
            while await stream.receive_some(4096):
                pass
        assert 0.9 < trio.current_time() - start < 3.0
        await stream.aclose()
        assert node.statistics()["handshake_timeouts"] == 1
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with qdb_client.open_client(node.address, tls=context) as client:
            assert (await client.query("select 1"))[0][0] == 1
