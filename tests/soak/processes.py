"""The processes of a soak run besides the nodes: fault proxies and workload clients.

Nodes come from :meth:`qdb_client.testing.TestCluster.start_subprocesses`.
Each node gets its own proxy process (``python -m qdb_client.testing proxy``,
listen port and control port both picked by the proxy), so one node's
degraded network never slows another's. Clients are
``python -m tests.soak.workload`` processes (see :mod:`tests.soak.workload`).

Every process started is also written to a pid file (:class:`PidFile`), so
``scripts/soak.sh`` can kill whatever is left if this process itself dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import trio

from qdb_client.testing import PROXY_READY_PATTERN

__all__ = ["ClientProcess", "PidFile", "ProxyProcess", "read_line"]

ROOT = Path(__file__).resolve().parents[2]
#: Seconds a process gets between SIGTERM and SIGKILL.
STOP_TIMEOUT = 5.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _open_log(path: Path) -> BinaryIO:
    return open(path, "ab")


class PidFile:
    """Appends ``pid role`` lines for every process the run starts."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, pid: int | None, role: str) -> None:
        """Record one process (``None`` is ignored)."""
        if pid is not None:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(f"{pid} {role}\n")


async def read_line(process: trio.Process, within: float, what: str) -> str:
    """The next line of ``process``'s stdout, or RuntimeError after ``within`` s or at EOF.

    Reads one byte at a time, so nothing past the line is consumed.
    """
    assert process.stdout is not None
    data = b""
    with trio.move_on_after(within):
        while not data.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                raise RuntimeError(f"{what} exited (status {await process.wait()}) before a line")
            data += chunk
        return data.decode(errors="replace").strip()
    raise RuntimeError(f"{what} printed no line within {within} s")


async def _stop(process: trio.Process | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.returncode is not None:
        return
    with trio.CancelScope(shield=True):
        try:
            process.send_signal(sig)
        except ProcessLookupError:
            return
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


class ProxyProcess:
    """One fault proxy process in front of one node."""

    def __init__(self, index: int, upstream: str, log: Path, seed: int) -> None:
        self.index = index
        self.upstream = upstream
        self.log = log
        self.seed = seed
        #: ``host:port`` the driver connects to (once started).
        self.address = ""
        #: ``host:port`` of the JSON-lines control port (once started).
        self.control = ""
        self.process: trio.Process | None = None

    async def start(self, pids: PidFile) -> None:
        """Start the process and wait for its readiness line."""
        command = [
            sys.executable,
            "-m",
            "qdb_client.testing",
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            self.upstream,
            "--control",
            "127.0.0.1:0",
            "--seed",
            str(self.seed),
            "--connect-timeout",
            "2",
            "--log-level",
            "WARNING",
        ]
        with _open_log(self.log) as log:
            self.process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=_env()
            )
        pids.add(self.process.pid, f"proxy-{self.index}")
        line = await read_line(self.process, 15.0, f"proxy {self.index}")
        match = PROXY_READY_PATTERN.match(line)
        if match is None:
            raise RuntimeError(f"proxy {self.index} printed {line!r}")
        self.address, self.control = match["address"], match["control"]

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`."""
        await _stop(self.process)


class ClientProcess:
    """One workload client process (``python -m tests.soak.workload``)."""

    def __init__(self, index: int, args: list[str], history: Path, log: Path) -> None:
        self.index = index
        self.args = args
        self.history = history
        self.log = log
        self.process: trio.Process | None = None
        #: Why the client failed to run or finish, if it did.
        self.problem: str | None = None

    async def start(self, pids: PidFile) -> None:
        """Start the process; it connects and waits for :meth:`go`."""
        command = [
            sys.executable,
            "-m",
            "tests.soak.workload",
            "--client",
            str(self.index),
            "--history",
            str(self.history),
            *self.args,
        ]
        with _open_log(self.log) as log:
            self.process = await trio.lowlevel.open_process(
                command,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.PIPE,
                env=_env(),
                cwd=str(ROOT),
            )
        pids.add(self.process.pid, f"client-{self.index}")

    async def wait_ready(self, within: float) -> None:
        """Wait up to ``within`` s for ``SOAK-CLIENT READY`` (RuntimeError otherwise)."""
        assert self.process is not None
        line = await read_line(self.process, within, f"client {self.index}")
        if not line.startswith("SOAK-CLIENT READY"):
            raise RuntimeError(f"client {self.index} printed {line!r}")

    async def go(self, stop_at: float) -> None:
        """Start the workload: it runs until ``stop_at`` (monotonic)."""
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all(f"GO {stop_at!r}\n".encode())

    async def finish(self, within: float) -> None:
        """Wait up to ``within`` s for ``SOAK-CLIENT DONE`` and exit 0; else note the
        problem and kill it."""
        assert self.process is not None
        try:
            line = await read_line(self.process, within, f"client {self.index}")
            if not line.startswith("SOAK-CLIENT DONE"):
                self.problem = f"printed {line!r} instead of DONE"
            with trio.move_on_after(within):
                await self.process.wait()
            if self.process.returncode is None:
                self.problem = f"did not exit within {within} s of DONE"
            elif self.process.returncode != 0 and self.problem is None:
                self.problem = f"exited with status {self.process.returncode}"
        except RuntimeError as exc:
            self.problem = str(exc)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Kill the process if it still runs."""
        await _stop(self.process, signal.SIGKILL)
        if self.process is not None:
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
