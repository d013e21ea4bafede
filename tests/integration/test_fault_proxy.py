"""The fault proxy over real loopback TCP: bytes, resets, refusals, statistics, CLI, scripts."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from qdb_client.errors import ConfigError, ConnectError
from qdb_client.testing import (
    PROXY_READY_PATTERN,
    FaultProxy,
    ProxyControlError,
    open_fault_proxy,
    open_node,
    open_node_control,
    open_proxy_control,
)
from qdb_client.testing.proxy_cli import handle_control_request

ROOT = Path(__file__).resolve().parents[2]


class Echo:
    """A TCP echo server counting the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.address = ""

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async def handler(stream: trio.SocketStream) -> None:
            self.accepted += 1
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
            )
            self.address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
            task_status.started(self)


@pytest.fixture
async def echo(nursery):
    return await nursery.start(Echo().serve)


async def connect(address: str) -> trio.SocketStream:
    host, port = address.rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def settle(predicate, limit: float = 5.0) -> None:
    """Wait (real time, at most ``limit`` seconds) until ``predicate()`` holds."""
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - counters and fds have no event to wait on
            await trio.sleep(0.01)


def free_ports(n: int) -> list[int]:
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


# ------------------------------------------------------------------- traffic


async def test_bytes_pass_unchanged_both_ways_and_statistics_count_them(echo):
    payloads = [random.Random(i).randbytes(300_000 + i) for i in range(4)]
    async with open_fault_proxy(echo.address) as proxy:
        assert proxy.upstream == echo.address

        async def one(payload: bytes) -> None:
            stream = await connect(proxy.address)
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                assert await receive_exactly(stream, len(payload)) == payload

        async with trio.open_nursery() as nursery:
            for payload in payloads:
                nursery.start_soon(one, payload)
        total = sum(map(len, payloads))
        await settle(lambda: proxy.statistics()["connections_open"] == 0)
        stats = proxy.statistics()
    assert stats["bytes_upstream"] == stats["bytes_downstream"] == total
    assert stats["connections_accepted"] == stats["connections_closed"] == 4
    assert stats["upstream_connect_failures"] == 0 and echo.accepted == 4


async def test_a_real_test_node_answers_through_the_proxy_and_latency_slows_it(tmp_path):
    async with (
        open_node(test_mode=True, database=str(tmp_path / "db.sqlite3")) as node,
        open_fault_proxy(node.address) as proxy,
    ):
        async with open_node_control(proxy.address) as ctl:
            assert await ctl.ping() == node.node_id
            slow = proxy.add_toxic("latency", latency=200)
            started = trio.current_time()
            assert await ctl.ping() == node.node_id
            assert trio.current_time() - started >= 0.2
            assert slow.remove() and not slow.active
        assert proxy.statistics()["toxics"] == {}
        assert proxy.statistics()["bytes_downstream"] > 0


async def test_a_half_close_is_forwarded_so_the_last_reply_still_arrives(echo):
    async with open_fault_proxy(echo.address) as proxy:
        stream = await connect(proxy.address)
        async with stream:
            await stream.send_all(b"last words")
            await stream.send_eof()
            assert await read_to_eof(stream) == b"last words"


async def test_limit_data_cuts_the_stream_mid_frame_over_tcp(echo):
    async with open_fault_proxy(echo.address) as proxy:
        proxy.add_toxic("limit_data", direction="upstream", bytes=5)
        stream = await connect(proxy.address)
        async with stream:
            await stream.send_all(b"0123456789")
            assert await read_to_eof(stream) == b"01234"


# ------------------------------------------------------------ resets, refusals


async def test_reset_peer_resets_the_client_connection(echo):
    async with open_fault_proxy(echo.address) as proxy:
        stream = await connect(proxy.address)
        async with stream:
            await stream.send_all(b"ping")
            assert await receive_exactly(stream, 4) == b"ping"
            proxy.add_toxic("reset_peer", timeout=0)
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some(100)  # a clean close would return b""
            assert isinstance(info.value.__cause__, ConnectionResetError)
        await settle(lambda: proxy.statistics()["connections_reset"] == 1)


async def test_reset_peer_waits_for_its_timeout(echo):
    async with open_fault_proxy(echo.address) as proxy:
        proxy.add_toxic("reset_peer", timeout=300)
        stream = await connect(proxy.address)
        started = trio.current_time()
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(100)
        assert trio.current_time() - started >= 0.3


async def test_down_refuses_new_connections_and_closes_open_ones(echo):
    async with open_fault_proxy(echo.address) as proxy:
        before = await connect(proxy.address)
        await before.send_all(b"x")
        assert await receive_exactly(before, 1) == b"x"
        down = proxy.add_toxic("down")
        assert await read_to_eof(before) == b""  # the open connection is closed
        refused = await connect(proxy.address)
        async with refused:
            assert await read_to_eof(refused) == b""
        assert echo.accepted == 1  # the refused one never reached the node
        assert proxy.statistics()["connections_refused"] == 1
        down.remove()
        after = await connect(proxy.address)
        async with after, before:
            await after.send_all(b"back")
            assert await receive_exactly(after, 4) == b"back"


async def test_down_blackhole_accepts_but_never_answers(echo):
    async with open_fault_proxy(echo.address) as proxy:
        proxy.add_toxic("down", mode="blackhole")
        stream = await connect(proxy.address)
        async with stream:
            await stream.send_all(b"anyone?")
            with trio.move_on_after(0.3) as waited:
                await stream.receive_some(100)
            assert waited.cancelled_caught
        assert echo.accepted == 0
        assert proxy.statistics()["connections_blackholed"] == 1


async def test_a_failed_upstream_connect_just_closes_the_client():
    (dead_port,) = free_ports(1)
    async with open_fault_proxy(f"127.0.0.1:{dead_port}") as proxy:
        stream = await connect(proxy.address)
        async with stream:
            assert await read_to_eof(stream) == b""
        await settle(lambda: proxy.statistics()["connections_closed"] == 1)
        assert proxy.statistics()["upstream_connect_failures"] == 1


# ------------------------------------------------------------ API and lifetime


async def test_toxics_are_listed_validated_and_cleared(echo):
    async with open_fault_proxy(echo.address, seed=1) as proxy:
        slow = proxy.add_toxic("latency", latency=10, name="slow")
        proxy.add_toxic("bandwidth", direction="both", rate=100)
        with pytest.raises(ValueError, match="unknown toxic kind 'lag'"):
            proxy.add_toxic("lag")
        assert [t.id for t in proxy.toxics()] == ["slow", "bandwidth-1"]
        assert proxy.toxics()[1].describe()["direction"] == "both"
        assert proxy.remove_toxic("slow") and not proxy.remove_toxic(slow)
        assert proxy.clear() == 1 and proxy.toxics() == []
    with pytest.raises(ConfigError, match="not of the form"):
        FaultProxy("nowhere")


async def test_leaving_the_block_closes_every_socket_without_leaking_fds(echo):
    fds_before = len(os.listdir("/proc/self/fd"))
    clients = []
    with trio.fail_after(5):
        async with open_fault_proxy(echo.address) as proxy:
            proxy.add_toxic("timeout", timeout=0)  # hold traffic in flight
            for _ in range(5):
                stream = await connect(proxy.address)
                await stream.send_all(b"in flight")
                clients.append(stream)
            await settle(lambda: echo.accepted == 5)
            address = proxy.address
    for stream in clients:  # the proxy's side is gone: EOF or reset, at once
        try:
            assert await stream.receive_some(100) == b""
        except trio.BrokenResourceError:
            pass
        await stream.aclose()
    with pytest.raises(OSError):
        await connect(address)  # the listener is closed
    # the echo server closes its side once it reads the EOF; nothing else may stay open
    await settle(lambda: len(os.listdir("/proc/self/fd")) <= fds_before)
    assert len(os.listdir("/proc/self/fd")) == fds_before


async def test_an_exception_in_the_block_comes_out_as_itself(echo):
    with pytest.raises(KeyError):
        async with open_fault_proxy(echo.address):
            raise KeyError("mine")


# ------------------------------------------------------------- control protocol


def test_control_requests_are_answered_and_errors_never_raise():
    proxy = FaultProxy("127.0.0.1:7000", "127.0.0.1:17000")
    added = handle_control_request(
        [proxy], {"op": "add", "kind": "latency", "attributes": {"latency": 100}}
    )
    assert added == {
        "ok": True,
        "id": "latency-1",
        "toxic": {
            "id": "latency-1",
            "kind": "latency",
            "direction": "downstream",
            "toxicity": 1.0,
            "attributes": {"latency": 100, "jitter": 0},
        },
    }
    by_upstream = handle_control_request([proxy], {"op": "list", "proxy": "127.0.0.1:7000"})
    assert by_upstream["proxies"]["127.0.0.1:17000"]["toxics"][0]["id"] == "latency-1"
    for request, error in [
        ([], "must be a JSON object"),
        ({"op": "explode"}, "unknown op 'explode'"),
        ({"op": "add", "kind": "latency", "latency": 5}, "add takes no field 'latency'"),
        ({"op": "add", "kind": ["x"]}, "unknown toxic kind"),
        ({"op": "add", "kind": "latency", "attributes": {"direction": "up"}}, "not an attribute"),
        ({"op": "add", "kind": "latency", "attributes": {"latency": -5}}, "finite and >= 0"),
        ({"op": "remove", "id": "nope"}, "no toxic 'nope'"),
        ({"op": "stats", "proxy": "1.2.3.4:5"}, "no proxy '1.2.3.4:5'"),
    ]:
        reply = handle_control_request([proxy], request)
        assert reply["ok"] is False and error in reply["error"], (request, reply)
    assert handle_control_request([proxy], {"op": "remove", "id": "latency-1"}) == {"ok": True}


@pytest.mark.slow
async def test_the_cli_runs_proxies_whose_control_port_works(echo, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "qdb_client.testing", "proxy"]
    command += ["--listen", "127.0.0.1:0", "--upstream", echo.address]
    command += ["--map", f"127.0.0.1:0={echo.address}", "--control", "127.0.0.1:0"]
    log = await trio.to_thread.run_sync(open, tmp_path / "proxy.log", "wb")
    process = await trio.lowlevel.open_process(
        command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env
    )
    log.close()
    try:
        with trio.fail_after(15):
            line = b""
            while b"\n" not in line:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, (tmp_path / "proxy.log").read_text()
                line += chunk
        ready = PROXY_READY_PATTERN.match(line.decode())
        assert ready is not None and int(ready["pid"]) == process.pid
        first, second = ready["address"].split(",")
        assert ready["upstream"] == f"{echo.address},{echo.address}"

        async with open_proxy_control(ready["control"]) as ctl:
            with pytest.raises(ProxyControlError, match="name the proxy"):
                await ctl.add_toxic("latency", latency=100)
            toxic_id = await ctl.add_toxic("latency", proxy=first, latency=250)
            stream = await connect(first)
            async with stream:
                started = trio.current_time()
                await stream.send_all(b"slow")
                assert await receive_exactly(stream, 4) == b"slow"
                assert trio.current_time() - started >= 0.25
            listed = await ctl.list_toxics()
            assert [t["id"] for t in listed[first]["toxics"]] == [toxic_id]
            assert listed[second]["toxics"] == []
            stats = await ctl.stats(first)
            assert stats[first]["bytes_downstream"] == 4
            assert stats[first]["connections_accepted"] == 1
            with pytest.raises(ProxyControlError, match="finite and > 0"):
                await ctl.add_toxic("bandwidth", proxy=second, rate=-1)
            await ctl.remove_toxic(toxic_id, proxy=first)
            assert await ctl.clear() == 0

        raw = await connect(ready["control"])  # garbage gets an answer, not a crash
        async with raw:
            await raw.send_all(b"this is not json\n" + json.dumps({"op": "list"}).encode() + b"\n")
            replies = b""
            while replies.count(b"\n") < 2:
                replies += await raw.receive_some(65536)
            bad, good = (json.loads(r) for r in replies.splitlines())
            assert bad["ok"] is False and "not JSON" in bad["error"]
            assert good["ok"] is True and set(good["proxies"]) == {first, second}

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stdout.aclose()
    with pytest.raises(ConnectError):
        async with open_proxy_control(ready["control"]):
            pass


@pytest.mark.slow
async def test_the_cli_rejects_bad_options_with_status_2():
    for args in (["--listen", "127.0.0.1:0"], ["--map", "no-equals-sign"], []):
        result = await trio.run_process(
            [sys.executable, "-m", "qdb_client.testing", "proxy", *args],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == b""


# ------------------------------------------------------------------- scripts


def script_env(state: Path, node_ports: list[int], proxy_ports: list[int]) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "TEST_SERVER_PORTS": ",".join(map(str, node_ports)),
        "TEST_PROXY_PORTS": ",".join(map(str, proxy_ports[:-1])),
        "TEST_PROXY_CONTROL_PORT": str(proxy_ports[-1]),
        "QDB_CLUSTER_DIR": str(state),
        "QDB_CLUSTER_STOP_TIMEOUT": "5",
        "QDB_CLUSTER_START_TIMEOUT": "15",
    }


async def script(env: dict[str, str], name: str, *args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(
        ["bash", str(ROOT / "scripts" / name), *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@pytest.mark.slow
async def test_start_script_with_proxies_puts_a_proxy_in_front_of_every_node(tmp_path):
    node_ports, proxy_ports = free_ports(2), free_ports(3)
    state = tmp_path / "cluster"
    env = script_env(state, node_ports, proxy_ports)
    proxied = [f"127.0.0.1:{port}" for port in proxy_ports[:2]]
    control = f"127.0.0.1:{proxy_ports[2]}"
    try:
        started = await script(env, "start-test-cluster.sh", "--proxies")
        assert started.returncode == 0, started.stderr.decode()
        out = started.stdout.decode()
        assert f"proxies ready on {','.join(proxied)} (control {control})" in out
        assert f"TEST_SERVER_PORTS={proxy_ports[0]},{proxy_ports[1]}" in out
        assert (state / "proxy.pid").exists()
        again = await script(env, "start-test-cluster.sh", "--proxies")  # idempotent
        assert again.returncode == 0 and b"proxies already running" in again.stdout
        async with open_node_control(proxied[1]) as ctl:
            assert await ctl.ping() == f"node-{node_ports[1]}"
        async with open_proxy_control(control) as ctl:
            stats = await ctl.stats(proxied[1])
            assert stats[proxied[1]]["upstream"] == f"127.0.0.1:{node_ports[1]}"
            assert stats[proxied[1]]["connections_accepted"] >= 1

        only = await script(env, "stop-test-cluster.sh", "--proxies-only")
        assert only.returncode == 0, only.stderr.decode()
        assert b"stopped 1 proxy process(es)" in only.stdout
        with pytest.raises(ConnectError):
            async with open_proxy_control(control):
                pass
        async with open_node_control(f"127.0.0.1:{node_ports[0]}") as ctl:
            assert await ctl.ping() == f"node-{node_ports[0]}"  # the nodes still run
    finally:
        stopped = await script(env, "stop-test-cluster.sh", "--proxies")
    assert stopped.returncode == 0, stopped.stderr.decode()
    assert b"stopped 2 node(s)" in stopped.stdout
    assert not state.exists()


@pytest.mark.slow
async def test_start_script_gives_up_cleanly_when_a_proxy_port_is_taken(tmp_path):
    node_ports, proxy_ports = free_ports(1), free_ports(2)
    state = tmp_path / "cluster"
    env = script_env(state, node_ports, proxy_ports)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", proxy_ports[0]))
        squatter.listen()
        try:
            started = await script(env, "start-test-cluster.sh", "--proxies")
        finally:
            await script(env, "stop-test-cluster.sh")
    assert started.returncode == 1
    assert b"the proxy process exited during startup" in started.stderr
    assert b"proxy.log" in started.stderr  # with its log tail
    with pytest.raises(ConnectError):  # the node it started was killed too
        async with open_node_control(f"127.0.0.1:{node_ports[0]}"):
            pass
