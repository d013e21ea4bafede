"""Cluster harness: in-process and subprocess clusters, kill/restart, the CLI, external clusters."""

from __future__ import annotations

import sys

import pytest
import trio

from qdb_client.errors import ConnectError
from qdb_client.protocol import GoAway
from qdb_client.testing import READY_PATTERN, TestCluster, open_node, open_node_control

from ..common.fixtures import node_config
from ..common.raw_client import raw_client


async def test_subprocess_cluster_kill_restart_and_shared_database():
    async with TestCluster.start_subprocesses(n=2) as cluster:
        assert cluster.mode == "subprocess"
        a, b = cluster.addresses
        assert all(node.running and node.pid for node in cluster.nodes)
        async with raw_client(a) as client:
            assert client.welcome is not None
            assert [(m.node_id, m.address) for m in client.welcome.members] == [
                (f"node-{cluster.nodes[0].port}", a),
                (f"node-{cluster.nodes[1].port}", b),
            ]
            await client.call("execute", {"sql": "create table t(x)"})
            await client.call("execute", {"sql": "insert into t values (42)"})
        await cluster.kill(1)
        assert not cluster.nodes[1].running and cluster.nodes[1].pid is None
        with pytest.raises(ConnectError):
            async with open_node_control(b):
                pytest.fail("a control connection must not open")
        await cluster.restart(1)
        assert cluster.addresses == [a, b]  # same port
        async with cluster.control(1) as ctl:
            assert await ctl.ping() == f"node-{cluster.nodes[1].port}"
        async with raw_client(b) as client:
            assert (await client.call("query", {"sql": "select x from t"}))["rows"] == [[42]]
        # SIGTERM is a graceful shutdown: connected clients get GOAWAY "shutdown".
        async with raw_client(a) as client:
            await cluster.stop(0, grace=1.0)
            messages = await client.read_until_eof()
            assert [type(m) for m in messages] == [GoAway]
            assert messages[0].reason == "shutdown"
        assert not cluster.nodes[0].running
    assert cluster.nodes[1].pid is None


async def test_in_process_cluster_kill_is_abrupt_and_restart_reuses_the_port():
    async with TestCluster.start_in_process(n=3, client_idle_timeout=60.0) as cluster:
        assert cluster.mode == "in_process" and len(cluster.addresses) == 3
        assert cluster.database is not None and cluster.database.name == "qdb.sqlite3"
        first = cluster.nodes[0]
        assert first.node is not None and first.node.config.client_idle_timeout == 60.0
        first.faults.fail_next(1, code=503)
        async with raw_client(first.address) as client:
            assert len(client.welcome.members) == 3
            await cluster.kill(0)
            assert await client.read_until_eof() == []  # no GOAWAY: killed
        with pytest.raises(RuntimeError):
            first.faults  # noqa: B018 - not running
        await cluster.restart(0)
        async with raw_client(first.address) as client:
            assert (await client.call("ping"))["node_id"] == first.node_id  # fresh faults
        async with cluster.control(2) as ctl:
            assert await ctl.ping() == cluster.nodes[2].node_id


async def test_from_environment_uses_an_external_cluster_when_ports_are_set(tmp_path):
    async with open_node(node_config(tmp_path)) as node:
        environ = {"TEST_SERVER_PORTS": f"{node.port}"}
        async with TestCluster.from_environment(environ=environ) as cluster:
            assert cluster.mode == "external"
            assert cluster.addresses == [node.address]
            async with cluster.control(0) as ctl:
                assert await ctl.ping() == node.node_id
            with pytest.raises(RuntimeError):
                await cluster.kill(0)
    async with TestCluster.from_environment(n=1, environ={}) as cluster:
        assert cluster.mode == "in_process" and len(cluster.nodes) == 1


async def test_cli_node_prints_readiness_and_refuses_a_busy_port(tmp_path):
    async with open_node(node_config(tmp_path)) as busy:
        result = await trio.run_process(
            [sys.executable, "-m", "qdb_client.testing", "--port", str(busy.port)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"PYTHONPATH": str(_root())},
        )
        assert result.returncode == 1
        assert b"cannot start" in result.stderr
    assert READY_PATTERN.match(
        "QDB-NODE READY node_id=node-7000 address=127.0.0.1:7000 port=7000 pid=1"
    )


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]
