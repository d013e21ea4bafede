"""scripts/start-test-cluster.sh and scripts/stop-test-cluster.sh, run for real on free ports."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import trio

from qdb_client.errors import ConnectError
from qdb_client.testing import open_node_control
from qdb_client.testing.control_token import find_token

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "scripts" / "start-test-cluster.sh"
STOP = ROOT / "scripts" / "stop-test-cluster.sh"


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


async def _run(script: Path, env: dict[str, str]) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        ["bash", str(script)],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_start_and_stop_scripts_manage_a_cluster(tmp_path):
    ports = _free_ports(2)
    state = tmp_path / "cluster"
    env = {
        "TEST_SERVER_PORTS": ",".join(map(str, ports)),
        "QDB_CLUSTER_DIR": str(state),
        "QDB_CLUSTER_STOP_TIMEOUT": "5",
    }
    try:
        started = await _run(START, env)
        assert started.returncode == 0, started.stderr.decode()
        assert b"2 node(s) ready" in started.stdout
        assert sorted(p.name for p in state.glob("node-*.pid")) == [
            f"node-{port}.pid" for port in sorted(ports)
        ]
        again = await _run(START, env)  # idempotent
        assert again.returncode == 0 and b"already running" in again.stdout
        # Each node wrote its control token to the state directory, for its owner only.
        token_file = state / f"node-{ports[0]}.control-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = find_token(f"127.0.0.1:{ports[0]}", environ={"QDB_CLUSTER_DIR": str(state)})
        assert token == token_file.read_text().strip()
        async with open_node_control(f"127.0.0.1:{ports[0]}", control_token=token) as ctl:
            assert await ctl.ping() == f"node-{ports[0]}"
            assert [m.address for m in ctl.welcome.members] == [
                f"127.0.0.1:{ports[0]}",
                f"127.0.0.1:{ports[1]}",
            ]
            assert (await ctl.stats())["node_id"] == f"node-{ports[0]}"  # test mode is on
    finally:
        stopped = await _run(STOP, env)
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert b"stopped 2 node(s)" in stopped.stdout
    assert not state.exists()
    for port in ports:
        with pytest.raises(ConnectError):
            async with open_node_control(f"127.0.0.1:{port}"):
                pytest.fail("a control connection must not open")
    assert (await _run(STOP, env)).returncode == 0  # idempotent


async def test_start_script_fails_fast_with_the_log_tail_when_a_port_is_taken(tmp_path):
    ports = _free_ports(2)
    state = tmp_path / "cluster"
    env = {"TEST_SERVER_PORTS": ",".join(map(str, ports)), "QDB_CLUSTER_DIR": str(state)}
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", ports[1]))
    blocker.listen()
    try:
        start = trio.current_time()
        result = await _run(START, env)
        elapsed = trio.current_time() - start
        leftovers = list(state.glob("node-*.pid"))
    finally:
        blocker.close()
        await _run(STOP, env)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert elapsed < 10, stderr  # the dead node is noticed, not waited out
    assert leftovers == [], stderr  # nothing left half-started
    assert f"port {ports[1]} exited during startup" in stderr
    assert "Address already in use" in stderr  # the log tail
