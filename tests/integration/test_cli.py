"""The ``qdb`` command, run as a subprocess against a cluster it started itself.

One two-node cluster (``qdb cluster start`` on free ports in a temporary
state directory) serves the module; the lifecycle test runs its own. Every
command is run the way a user runs it, and checked for its output, its
``--json`` form and its exit status.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from qdb_client.cli import main

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-Pa55"
#: A command that blocks rich, to run the standard-library rendering.
NO_RICH = (
    "import sys; sys.modules['rich'] = None;"
    " from qdb_client.cli import main; sys.exit(main(sys.argv[1:]))"
)


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


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QDB_", "TEST_SERVER_"))}
    env.update(extra)
    return env


def qdb(
    *args: str, env: dict[str, str] | None = None, no_rich: bool = False, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m qdb_client.cli ARGS`` and return what it did."""
    prefix: Sequence[str] = ("-c", NO_RICH) if no_rich else ("-m", "qdb_client.cli")
    return subprocess.run(
        [sys.executable, *prefix, *args],
        capture_output=True,
        text=True,
        env=env if env is not None else _env(),
        input=stdin,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(ok(result).stdout)


def one_error_line(result: subprocess.CompletedProcess[str], code: int, prefix: str) -> str:
    """The single ``qdb: ...`` line of a failed command, checked."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("qdb: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"qdb: {prefix}"), lines[0]
    return lines[0]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """``run(*args)``: ``qdb_client.cli.main(args)`` in this process (no interpreter start-up,
    so the many small checks stay fast), with the environment cleared of QDB_* variables."""
    for name in list(os.environ):
        if name.startswith(("QDB_", "TEST_SERVER_")):
            monkeypatch.delenv(name)

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two nodes started by ``qdb cluster start``; stopped by ``qdb cluster stop``."""
    state = tmp_path_factory.mktemp("cli") / "cluster"
    ports = _free_ports(2)
    started = qdb(
        "cluster",
        "start",
        "--ports",
        ",".join(map(str, ports)),
        "--state-dir",
        str(state),
        "--json",
    )
    info = as_json(started)
    try:
        assert [n["port"] for n in info["nodes"]] == ports
        assert all(n["started"] for n in info["nodes"])
        addresses = [n["address"] for n in info["nodes"]]
        yield {"state": state, "addresses": addresses, "hosts": ",".join(addresses)}
    finally:
        qdb("cluster", "stop", "--state-dir", str(state), "--timeout", "5")


def test_the_console_script_is_installed():
    script = Path(sys.executable).parent / "qdb"
    assert script.exists(), "the qdb console script is missing: run scripts/bootstrap.sh"
    result = ok(subprocess.run([str(script), "--version"], capture_output=True, text=True))
    assert result.stdout.startswith("qdb_client ")


def test_ping_every_host(cluster):
    result = as_json(qdb("ping", cluster["hosts"], "--count", "2", "--json"))
    assert [h["host"] for h in result["hosts"]] == cluster["addresses"]
    for host in result["hosts"]:
        assert host["error"] is None
        assert host["node_id"] == f"node-{host['host'].rsplit(':', 1)[1]}"
        assert len(host["rtt_ms"]) == 2 and all(rtt > 0 for rtt in host["rtt_ms"])
    table = ok(qdb("ping", f"qdb://{cluster['addresses'][0]}", "--plain")).stdout.splitlines()
    assert table[0].split() == ["host", "node", "min", "ms", "avg", "ms", "max", "ms", "status"]
    assert table[2].split()[0] == cluster["addresses"][0] and table[2].endswith("ok")


def test_an_unreachable_host_is_exit_3_with_one_line(cluster, run):
    (closed,) = _free_ports(1)
    result = qdb("ping", f"127.0.0.1:{closed}")
    assert result.returncode == 3, result.stderr
    assert "NoAvailableNode" in result.stdout and "Traceback" not in result.stderr
    one_error_line(run("query", f"127.0.0.1:{closed}", "SELECT 1"), 3, "NoAvailableNode: ")
    mixed = run("ping", f"{cluster['addresses'][0]},127.0.0.1:{closed}", "--json")
    assert mixed.returncode == 1  # some answered, some did not
    errors = [h["error"] for h in json.loads(mixed.stdout)["hosts"]]
    assert errors[0] is None and errors[1]["type"] == "NoAvailableNode"


def test_execute_and_query_with_parameters(cluster, run):
    hosts, table = cluster["hosts"], f"t_{uuid.uuid4().hex[:8]}"
    ok(qdb("execute", hosts, f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT, v REAL)"))
    inserted = as_json(
        qdb(
            "execute",
            hosts,
            f"INSERT INTO {table} (name, v) VALUES (?, ?) RETURNING id, name",
            "-p",
            "ada",
            "-p",
            "1.5",
            "--json",
        )
    )
    assert inserted["rows_affected"] == 1 and inserted["rows"] == [[1, "ada"]]
    sql = f"INSERT INTO {table} (name, v) VALUES (:name, :v)"
    named = ok(run("execute", hosts, sql, "--param", "name=bob", "--param", ":v=null", "--plain"))
    assert named.stdout.splitlines()[0].split() == ["rows", "affected", "last", "insert", "id"]
    assert named.stdout.splitlines()[2].split() == ["1", "2"]

    rows = as_json(qdb("query", hosts, f"SELECT id, name, v FROM {table} ORDER BY id", "--json"))
    assert rows == {"columns": ["id", "name", "v"], "rows": [[1, "ada", 1.5], [2, "bob", None]]}
    shown = ok(run("query", hosts, f"SELECT id, name, v FROM {table} ORDER BY id")).stdout
    assert "ada" in shown and "NULL" in shown and "(2 rows)" in shown  # rich's table
    plain = ok(run("query", hosts, f"SELECT * FROM {table} ORDER BY id", "--plain")).stdout
    assert plain.splitlines() == [
        "id  name     v",
        "--  ----  ----",
        " 1  ada    1.5",
        " 2  bob   NULL",
        "(2 rows)",
    ]
    from_stdin = run("query", hosts, "-", "-p", "bob", stdin=f"SELECT id FROM {table} WHERE name=?")
    assert ok(from_stdin).stdout.splitlines()[2].strip() == "2"


def test_hosts_from_a_uri_or_the_environment(cluster, run, monkeypatch):
    first, second = cluster["addresses"]
    uri = f"qdb://{first},{second}/?request_timeout=3&discover_members=false"
    assert as_json(run("query", uri, "SELECT 7 AS n", "--json"))["rows"] == [[7]]
    from_url = qdb("query", "SELECT 8 AS n", "--json", env=_env(QDB_URL=f"qdb://{first}"))
    assert as_json(from_url)["rows"] == [[8]]
    one_error_line(run("query", "SELECT 1"), 2, "no hosts")
    monkeypatch.setenv("QDB_HOSTS", first)
    monkeypatch.setenv("QDB_DISCOVER_MEMBERS", "0")
    from_hosts = run("stats", "--json", "--probes", "0")
    assert [n["address"] for n in as_json(from_hosts)["nodes"]] == [first]
    monkeypatch.setenv("QDB_REQUEST_TIMEOUT", "0")
    assert "QDB_REQUEST_TIMEOUT" in one_error_line(run("query", "SELECT 1"), 2, "ConfigError: ")


def test_usage_and_configuration_errors_are_exit_2(cluster, run):
    hosts = cluster["hosts"]
    bad_option = qdb("query", hosts, "SELECT 1", "-o", "bogus=1")
    line = one_error_line(bad_option, 2, "ConfigError: ")
    assert "unknown option 'bogus'" in line and "request_timeout" in line
    one_error_line(run("query", f"qdb://{hosts}?nope=1", "SELECT 1"), 2, "ConfigError: ")
    one_error_line(run("query", hosts, "SELECT 1", "--timeout", "0"), 2, "ConfigError: ")
    one_error_line(run("query", hosts, "SELECT 1", "-p", "1", "-p", "a=2"), 2, "--param")
    one_error_line(run("bench", hosts, "--read-ratio", "2"), 2, "--read-ratio")
    argparse_error = run("query", hosts, "SELECT 1", "--bogus")
    assert argparse_error.returncode == 2 and "unrecognized arguments" in argparse_error.stderr
    leaky = run("ping", f"qdb://ada:{SECRET}@127.0.0.1:0", "--json")
    one_error_line(leaky, 2, "ConfigError: ")
    assert SECRET not in leaky.stdout + leaky.stderr


def test_a_failed_operation_is_exit_1_with_the_error_class(cluster, run):
    hosts = cluster["hosts"]
    missing = qdb("query", hosts, "SELECT * FROM no_such_table")
    assert "no such table" in one_error_line(missing, 1, "SqlError: ")
    one_error_line(run("query", hosts, "CREATE TABLE never_made (x)"), 1, "ReadOnlyViolation: ")
    as_json_error = run("query", hosts, "SELEC 1", "--json")
    assert as_json_error.returncode == 1
    assert json.loads(as_json_error.stdout)["error"]["type"] == "SqlError"
    debug = run("query", hosts, "SELEC 1", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1].startswith("qdb: SqlError: ")


def test_stats_shows_every_node(cluster, run):
    snapshot = as_json(qdb("stats", cluster["addresses"][0], "--wait", "5", "--json"))
    nodes = {n["address"]: n for n in snapshot["nodes"]}
    assert set(nodes) == set(cluster["addresses"])  # the second one was discovered
    assert all(n["state"] == "UP" for n in nodes.values())
    assert snapshot["calls"] >= 2 * len(nodes)  # the probes
    table = ok(run("stats", cluster["hosts"], "--plain")).stdout.splitlines()
    assert table[0].split()[:4] == ["node", "id", "state", "breaker"]
    for line in table[2:4]:
        assert line.split()[2:4] == ["UP", "CLOSED"]


def test_bench_reports_throughput_and_percentiles(cluster):
    summary = as_json(
        qdb(
            "bench",
            cluster["hosts"],
            "--duration",
            "1",
            "--tasks",
            "4",
            "--read-ratio",
            "0.5",
            "--rows",
            "20",
            "--json",
            "--seed",
            "1",
        )
    )
    assert summary["tasks"] == 4 and summary["elapsed"] >= 1.0
    operations = summary["operations"]
    assert operations["read"]["requests"] > 0 and operations["write"]["requests"] > 0
    assert operations["total"]["failures"] == 0 and summary["errors"] == {}
    total = operations["total"]
    assert 0 < total["p50_ms"] <= total["p90_ms"] <= total["p99_ms"] <= total["max_ms"]
    assert total["throughput"] > 0

    shown = qdb(
        "bench", cluster["hosts"], "--duration", "0.5", "--tasks", "2", "--progress", "always"
    )
    assert "p99 ms" in ok(shown).stdout and "total" in shown.stdout
    assert "bench" in shown.stderr  # rich's progress bar
    plain = qdb(
        "bench",
        cluster["hosts"],
        "--duration",
        "0.5",
        "--tasks",
        "2",
        "--progress",
        "always",
        no_rich=True,
    )
    lines = ok(plain).stdout.splitlines()
    header = lines[1]
    assert header.split()[:4] == ["operation", "requests", "failures", "req/s"]
    assert [line.split()[0] for line in lines[3:6]] == ["read", "write", "total"]
    assert len({len(line) for line in lines[1:3]}) == 1  # aligned: header as wide as dashes
    assert "[" in plain.stderr and "100%" in plain.stderr  # the plain progress line


def test_proxy_runs_the_fault_proxy(cluster):
    (port,) = _free_ports(1)
    upstream = cluster["addresses"][0]
    assert "--upstream" in ok(qdb("proxy", "--help")).stdout
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qdb_client.cli",
            "proxy",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("QDB-PROXY READY")
        pinged = as_json(qdb("ping", f"127.0.0.1:{port}", "--json"))
        assert pinged["hosts"][0]["node_id"] == f"node-{upstream.rsplit(':', 1)[1]}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_cluster_lifecycle(tmp_path, run):
    state = tmp_path / "one"
    port, taken = _free_ports(2)
    args = ("--ports", str(port), "--state-dir", str(state))
    ok(qdb("cluster", "start", *args))
    try:
        assert "already running" in ok(run("cluster", "start", *args)).stdout
        status = as_json(qdb("cluster", "status", "--state-dir", str(state), "--json"))
        assert [(n["port"], n["running"], n["error"]) for n in status["nodes"]] == [
            (port, True, None)
        ]
    finally:
        stopped = ok(qdb("cluster", "stop", "--state-dir", str(state), "--timeout", "5"))
    assert "stopped 1 node(s)" in stopped.stdout
    assert not state.exists()
    assert run("cluster", "status", "--state-dir", str(state)).returncode == 3
    assert "no cluster state" in ok(run("cluster", "stop", "--state-dir", str(state))).stdout

    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", taken))
    blocker.listen()
    try:
        began = time.monotonic()
        failed = run("cluster", "start", "--ports", str(taken), "--state-dir", str(state))
        elapsed = time.monotonic() - began
    finally:
        blocker.close()
        run("cluster", "stop", "--state-dir", str(state))
    one_error_line(failed, 1, f"the node on port {taken} exited during startup")
    assert "Address already in use" in failed.stderr  # the log tail
    assert elapsed < 10
