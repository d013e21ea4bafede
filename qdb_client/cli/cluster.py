"""``qdb cluster start|stop|status`` and ``qdb proxy``: a local test cluster, in the background.

The same cluster as ``scripts/start-test-cluster.sh`` and
``scripts/stop-test-cluster.sh``, with the same state directory, so either
tool stops what the other started:

- ``node-<port>.pid``, ``node-<port>.log`` (stderr), ``node-<port>.out``
  (stdout: the node's ``QDB-NODE READY`` line) and the shared database
  ``qdb.sqlite3``; ``proxy.pid``, ``proxy.log``, ``proxy.out`` for the
  fault proxy process of ``--proxies``; ``.qdb-test-cluster``, the mark
  that the directory was made by us (only then does ``stop`` remove it).
- Each node is ``python -m qdb_client.testing --test-mode`` on one shared
  SQLite file, announcing the others as peers, in a session of its own so
  it outlives the command.
- ``start`` returns once every node answers ``ping``; if one exits or is
  not ready within the timeout, it kills what it started, prints each
  node's log tail and exits 1. Nodes whose pid file names a live test node
  are left alone.
- ``stop`` sends SIGTERM (a graceful GOAWAY), then SIGKILL after the
  timeout. A pid is signalled only while it still runs ``qdb_client.testing``.

Defaults come from the scripts' variables: ``TEST_SERVER_PORTS``
(7000,7001,7002), ``TEST_CLUSTER_SIZE``, ``TEST_SERVER_HOST`` (127.0.0.1),
``QDB_CLUSTER_DIR`` (``.qdb-cluster`` in the current directory),
``QDB_CLUSTER_START_TIMEOUT`` (15), ``QDB_CLUSTER_STOP_TIMEOUT`` (10),
``TEST_PROXY_PORTS`` (node port + 10000), ``TEST_PROXY_CONTROL_PORT``
(first proxy port + 100).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs
import trio

from .. import open_client
from ..errors import QdbError
from .common import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, CliError, error_line
from .processes import (
    child_env,
    is_test_process,
    ports_option,
    read_pid,
    seconds_option,
    spawn,
    tail,
)
from .render import Output

__all__ = ["add_parsers", "run_start", "run_status", "run_stop"]

#: The mark file of a state directory made by start (same as the script's).
MARKER = ".qdb-test-cluster"
_READY = re.compile(r"^QDB-NODE READY node_id=(?P<node_id>\S+) address=(?P<address>\S+)", re.M)
_PROXY_READY = re.compile(r"^QDB-PROXY READY", re.M)


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``cluster`` (start, stop, status) and ``proxy`` to the subcommand parsers."""
    cluster = commands.add_parser(
        "cluster",
        help="start, stop or inspect a local test cluster (as scripts/*-test-cluster.sh)",
        description="A local test cluster in the background, the same as"
        " scripts/start-test-cluster.sh and scripts/stop-test-cluster.sh: same variables, state"
        " directory and pid files, so either one stops what the other started."
        " status exits 0 if every node answers, 3 if none does, 1 if some do.",
    )
    actions = cluster.add_subparsers(dest="action", metavar="ACTION", required=True)
    env = os.environ

    start = actions.add_parser("start", parents=[common], help="start nodes, wait until ready")
    _state_dir_argument(start)
    start.add_argument(
        "--ports",
        default=env.get("TEST_SERVER_PORTS", "7000,7001,7002"),
        help="node ports, comma-separated ($TEST_SERVER_PORTS, else 7000,7001,7002)",
    )
    start.add_argument(
        "--size",
        default=env.get("TEST_CLUSTER_SIZE"),
        help="how many of the ports to start ($TEST_CLUSTER_SIZE, else all)",
    )
    start.add_argument("--host", default=env.get("TEST_SERVER_HOST", "127.0.0.1"), help="bind host")
    start.add_argument(
        "--timeout",
        default=env.get("QDB_CLUSTER_START_TIMEOUT", "15"),
        help="seconds to wait for readiness ($QDB_CLUSTER_START_TIMEOUT, else 15)",
    )
    start.add_argument("--python", default=sys.executable, help="interpreter of the nodes")
    start.add_argument(
        "--proxies", action="store_true", help="also a fault proxy in front of every node"
    )
    start.add_argument(
        "--proxy-ports",
        default=env.get("TEST_PROXY_PORTS"),
        help="proxy ports, one per node ($TEST_PROXY_PORTS, else node port + 10000)",
    )
    start.add_argument(
        "--proxy-control-port",
        default=env.get("TEST_PROXY_CONTROL_PORT"),
        help="the proxies' control port ($TEST_PROXY_CONTROL_PORT, else first proxy port + 100)",
    )
    start.set_defaults(run=run_start)

    stop = actions.add_parser("stop", parents=[common], help="stop the nodes, remove the state")
    _state_dir_argument(stop)
    stop.add_argument(
        "--timeout",
        default=env.get("QDB_CLUSTER_STOP_TIMEOUT", "10"),
        help="seconds between SIGTERM and SIGKILL ($QDB_CLUSTER_STOP_TIMEOUT, else 10)",
    )
    which = stop.add_mutually_exclusive_group()
    which.add_argument("--proxies", action="store_true", help="accepted for symmetry")
    which.add_argument(
        "--proxies-only", action="store_true", help="stop only the proxies; keep nodes and state"
    )
    stop.set_defaults(run=run_stop)

    status = actions.add_parser("status", parents=[common], help="which nodes run and answer")
    _state_dir_argument(status)
    status.add_argument("--timeout", default="2", help="seconds each node gets to answer (2)")
    status.set_defaults(run=run_status)

    commands.add_parser(
        "proxy",
        help="run fault proxies: python -m qdb_client.testing proxy ARGS (see docs/testing.md)",
        add_help=False,
    )


def _state_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("QDB_CLUSTER_DIR", ".qdb-cluster"),
        help="pid files, logs, database ($QDB_CLUSTER_DIR, else ./.qdb-cluster)",
    )


# ---------------------------------------------------------------- helpers


def _say(out: Output, text: str) -> None:
    """A progress line: a result on stdout, or a note on stderr under --json."""
    if out.json_mode:
        out.note(text)
    else:
        out.line(text)


# ------------------------------------------------------------------ start


@attrs.define
class _Started:
    port: int
    address: str
    pid: int
    process: subprocess.Popen[bytes] | None  # None: it was already running


def run_start(ns: argparse.Namespace, out: Output) -> int:
    """``qdb cluster start``: start the nodes (and proxies), wait until they answer."""
    state = Path(ns.state_dir).resolve()
    timeout = seconds_option(ns.timeout, "--timeout")
    ports = ports_option(ns.ports, "--ports")
    size = len(ports) if ns.size in (None, "") else ns.size
    if not re.fullmatch(r"[0-9]+", str(size)) or not 1 <= int(size) <= len(ports):
        raise CliError(f"--size is {size}, but --ports lists {len(ports)} port(s)", EXIT_USAGE)
    ports = ports[: int(size)]
    if len(set(ports)) != len(ports):
        raise CliError("--ports lists a port twice", EXIT_USAGE)
    proxy_ports: list[int] = []
    control_port = 0
    if ns.proxies:
        given = ns.proxy_ports
        proxy_ports = ports_option(given, "--proxy-ports") if given else [p + 10000 for p in ports]
        if len(proxy_ports) < len(ports):
            raise CliError(
                f"--proxy-ports has {len(proxy_ports)} port(s) for {len(ports)} node(s)",
                EXIT_USAGE,
            )
        proxy_ports = proxy_ports[: len(ports)]
        control_port = proxy_ports[0] + 100
        if ns.proxy_control_port:
            control_port = ports_option(ns.proxy_control_port, "--proxy-control-port")[0]

    state.mkdir(parents=True, exist_ok=True)
    (state / MARKER).touch()
    addresses = [f"{ns.host}:{port}" for port in ports]
    nodes: list[_Started] = []
    for port, address in zip(ports, addresses, strict=True):
        pidfile = state / f"node-{port}.pid"
        pid = read_pid(pidfile)
        if pid is not None and is_test_process(pid):
            _say(out, f"qdb cluster: node on port {port} already running (pid {pid})")
            nodes.append(_Started(port, address, pid, None))
            continue
        peers = ",".join(a for a in addresses if a != address)
        command = [ns.python, "-m", "qdb_client.testing", "--host", ns.host, "--port", str(port)]
        command += ["--db", str(state / "qdb.sqlite3")]
        command += ["--peers", peers] if peers else []
        command += ["--test-mode", "--state-dir", str(state)]  # its control token goes there
        process = spawn(command, state / f"node-{port}.out", state / f"node-{port}.log")
        pidfile.write_text(f"{process.pid}\n")
        nodes.append(_Started(port, address, process.pid, process))

    started = [n for n in nodes if n.process is not None]
    _wait_ready(ns.python, addresses, timeout, started, state, out)
    _say(
        out,
        f"qdb cluster: {len(ports)} node(s) ready on {','.join(addresses)} (state in {state})",
    )
    result: dict[str, Any] = {
        "state_dir": str(state),
        "nodes": [
            {"port": n.port, "address": n.address, "pid": n.pid, "started": n.process is not None}
            for n in nodes
        ],
        "proxies": None,
    }
    if ns.proxies:
        result["proxies"] = _start_proxies(
            ns,
            out,
            state,
            timeout,
            started,
            list(zip(proxy_ports, ports, strict=True)),
            control_port,
        )
    if out.json_mode:
        out.json(result)
    return EXIT_OK


def _give_up(
    message: str, started: Sequence[_Started], state: Path, logs: Sequence[Path], out: Output
) -> NoReturn:
    """Kill what this command started, show the log tails, fail with ``message``."""
    for node in started:
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()
        (state / f"node-{node.port}.pid").unlink(missing_ok=True)
    for log in logs:
        out.note(f"--- {log} (last 20 lines) ---")
        out.note(tail(log))
    raise CliError(message, EXIT_FAILED)


def _wait_ready(
    python: str,
    addresses: Sequence[str],
    timeout: float,
    started: Sequence[_Started],
    state: Path,
    out: Output,
) -> None:
    """Wait until every node answers ping (``qdb_client.testing.wait``), or give up."""
    waiter = subprocess.Popen(
        [python, "-m", "qdb_client.testing.wait", ",".join(addresses), "--timeout", str(timeout)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**child_env(), "QDB_CLUSTER_DIR": str(state)},  # where the control tokens are
    )
    logs = [state / f"node-{addr.rsplit(':', 1)[1]}.log" for addr in addresses]
    while waiter.poll() is None:
        died = next((n for n in started if n.process and n.process.poll() is not None), None)
        if died is not None:
            waiter.kill()
            waiter.communicate()
            _give_up(
                f"the node on port {died.port} exited during startup", started, state, logs, out
            )
        time.sleep(0.1)
    _, errors = waiter.communicate()
    if waiter.returncode != 0:
        for line in errors.decode(errors="replace").splitlines():
            out.note(line)
        _give_up(f"nodes not ready within {timeout:g}s", started, state, logs, out)


def _start_proxies(
    ns: argparse.Namespace,
    out: Output,
    state: Path,
    timeout: float,
    started: Sequence[_Started],
    pairs: Sequence[tuple[int, int]],
    control: int,
) -> dict[str, Any]:
    """Start the fault proxy process (``proxy port -> node port`` pairs) and wait for it."""
    host = ns.host
    proxy_ports = [proxy_port for proxy_port, _ in pairs]
    proxies = [f"{host}:{p}" for p in proxy_ports]
    log = state / "proxy.log"
    pidfile = state / "proxy.pid"
    pid = read_pid(pidfile)
    if pid is not None and is_test_process(pid):
        _say(out, f"qdb cluster: proxies already running (pid {pid})")
    else:
        command = [ns.python, "-m", "qdb_client.testing", "proxy"]
        for proxy_port, port in pairs:
            command += ["--map", f"{host}:{proxy_port}={host}:{port}"]
        command += ["--control", f"{host}:{control}"]
        process = spawn(command, state / "proxy.out", log)
        pidfile.write_text(f"{process.pid}\n")
        pid = process.pid
        deadline = time.monotonic() + timeout
        while not _PROXY_READY.search(tail(state / "proxy.out", 5)):
            message = None
            if process.poll() is not None:
                message = "the proxy process exited during startup"
            elif time.monotonic() >= deadline:
                message = f"proxies not ready within {timeout:g}s"
            if message is not None:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                pidfile.unlink(missing_ok=True)
                _give_up(message, started, state, [log], out)
            time.sleep(0.1)
    waiter = subprocess.run(
        [ns.python, "-m", "qdb_client.testing.wait", ",".join(proxies), "--timeout", str(timeout)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=child_env(),
        check=False,
    )
    if waiter.returncode != 0:
        _give_up("the nodes do not answer through the proxies", started, state, [log], out)
    _say(out, f"qdb cluster: proxies ready on {','.join(proxies)} (control {host}:{control})")
    _say(
        out,
        "qdb cluster: point the driver at the proxies:"
        f" TEST_SERVER_PORTS={','.join(map(str, proxy_ports))}",
    )
    return {"pid": pid, "addresses": proxies, "control": f"{host}:{control}"}


# ------------------------------------------------------------------- stop


def run_stop(ns: argparse.Namespace, out: Output) -> int:
    """``qdb cluster stop``: SIGTERM, then SIGKILL after the timeout; remove the state."""
    state = Path(ns.state_dir).resolve()
    timeout = seconds_option(ns.timeout, "--timeout")
    if not state.is_dir():
        _say(out, f"qdb cluster: no cluster state in {state}")
        if out.json_mode:
            out.json({"state_dir": str(state), "nodes": 0, "proxies": 0, "removed": False})
        return EXIT_OK
    pidfiles = [state / "proxy.pid"]
    if not ns.proxies_only:
        pidfiles += sorted(state.glob("node-*.pid"))
    signalled: list[int] = []
    nodes = proxies = 0
    for pidfile in pidfiles:
        pid = read_pid(pidfile)
        if pid is None or not is_test_process(pid):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            continue
        signalled.append(pid)
        if pidfile.name == "proxy.pid":
            proxies += 1
        else:
            nodes += 1
    deadline = time.monotonic() + timeout
    while any(is_test_process(pid) for pid in signalled) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in signalled:
        if is_test_process(pid):
            out.note(f"qdb cluster: pid {pid} did not stop after {timeout:g}s; killing it")
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    (state / "proxy.pid").unlink(missing_ok=True)
    removed = False
    if ns.proxies_only:
        _say(out, f"qdb cluster: stopped {proxies} proxy process(es)")
    else:
        for pidfile in state.glob("node-*.pid"):
            pidfile.unlink(missing_ok=True)
        if (state / MARKER).exists():
            shutil.rmtree(state, ignore_errors=True)
            removed = True
        else:
            out.note(f"qdb cluster: {state} was not created by cluster start; kept it")
        tail = f" and {proxies} proxy process(es)" if proxies else ""
        _say(out, f"qdb cluster: stopped {nodes} node(s){tail}")
    if out.json_mode:
        out.json({"state_dir": str(state), "nodes": nodes, "proxies": proxies, "removed": removed})
    return EXIT_OK


# ----------------------------------------------------------------- status


def run_status(ns: argparse.Namespace, out: Output) -> int:
    """``qdb cluster status``: each node's process and whether it answers a PING.

    Exit 0 when every node answers, 3 when none does (or there is no
    cluster), 1 when only some do.
    """
    state = Path(ns.state_dir).resolve()
    timeout = seconds_option(ns.timeout, "--timeout")
    entries: list[dict[str, Any]] = []  # one record per node (the JSON output)
    for pidfile in sorted(state.glob("node-*.pid"), key=lambda p: _port_of(p.name)):
        port = _port_of(pidfile.name)
        pid = read_pid(pidfile)
        found = _READY.search(tail(state / f"node-{port}.out", 5))
        entries.append(
            {
                "port": port,
                "pid": pid,
                "address": found["address"] if found else f"127.0.0.1:{port}",
                "running": pid is not None and is_test_process(pid),
            }
        )
    answers = trio.run(_ping_each, [e["address"] for e in entries if e["running"]], timeout)
    for entry in entries:
        entry.update(answers.get(entry["address"], {"node_id": None, "rtt_ms": None}))
        entry.setdefault("error", None if entry["running"] else "not running")
    proxy_pid = read_pid(state / "proxy.pid")
    proxy = None
    if proxy_pid is not None:
        proxy = {"pid": proxy_pid, "running": is_test_process(proxy_pid)}
    answering = [e for e in entries if e["error"] is None]
    if out.json_mode:
        out.json({"state_dir": str(state), "nodes": entries, "proxy": proxy})
    elif not entries:
        out.line(f"qdb cluster: no nodes in {state}")
    else:
        rows = [
            [
                e["address"],
                e["node_id"],
                e["pid"],
                "ok" if e["error"] is None else e["error"],
                None if e["rtt_ms"] is None else round(e["rtt_ms"], 3),
            ]
            for e in entries
        ]
        out.table(["address", "node", "pid", "status", "ping ms"], rows, title=str(state))
        if proxy is not None:
            running = "running" if proxy["running"] else "not running"
            out.line(f"proxy process: pid {proxy['pid']}, {running}")
    if entries and len(answering) == len(entries):
        return EXIT_OK
    return EXIT_UNREACHABLE if not answering else EXIT_FAILED


def _port_of(name: str) -> int:
    match = re.fullmatch(r"node-([0-9]+)\.pid", name)
    return int(match[1]) if match else 0


async def _ping_each(addresses: Sequence[str], seconds: float) -> Mapping[str, dict[str, Any]]:
    answers: dict[str, dict[str, Any]] = {}

    async def ping(address: str) -> None:
        answer: dict[str, Any] = {"node_id": None, "rtt_ms": None}
        try:
            async with open_client(
                address,
                discover_members=False,
                connect_timeout=seconds,
                request_timeout=seconds,
                node_selection_timeout=seconds,
            ) as client:
                answer["node_id"] = client.statistics()["nodes"][0]["node_id"]
                answer["rtt_ms"] = await client.ping() * 1000
                answer["error"] = None
        except QdbError as exc:
            answer["error"] = error_line(exc)
        answers[address] = answer

    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(ping, address)
    return answers
