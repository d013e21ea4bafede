"""Processes of the local test cluster: spawning, recognising and running them; its options.

A pid from a pid file is trusted only while it still runs
``qdb_client.testing`` (and is not a zombie), so a stale pid file can never
make ``qdb cluster stop`` signal an unrelated process that reused the pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from .common import EXIT_USAGE, CliError

__all__ = [
    "child_env",
    "is_test_process",
    "ports_option",
    "read_pid",
    "run_proxy",
    "seconds_option",
    "spawn",
    "tail",
]

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_PID = re.compile(r"[0-9]{1,10}")


def seconds_option(text: str, what: str) -> float:
    """An option's text as seconds within 0..3600, else a usage error naming ``what``."""
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"{what} must be a number of seconds, not {text!r}", EXIT_USAGE) from None
    if not 0 < value <= 3600:
        raise CliError(f"{what} must be within 0..3600 seconds, not {text!r}", EXIT_USAGE)
    return value


def ports_option(text: str, what: str) -> list[int]:
    """``"7000,7001"`` as ports 1..65535, else a usage error naming ``what``."""
    ports = []
    for item in text.split(","):
        item = item.strip()
        if not re.fullmatch(r"[0-9]{1,5}", item) or not 0 < int(item) < 65536:
            raise CliError(f"{what} must be ports 1..65535 separated by commas", EXIT_USAGE)
        ports.append(int(item))
    return ports


def is_test_process(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process running ``qdb_client.testing``."""
    if pid <= 0:
        return False
    proc = Path(f"/proc/{pid}")
    if Path("/proc/self").exists():
        try:
            stat = (proc / "stat").read_bytes()
            if stat.rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
            return b"qdb_client.testing" in (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            return False
    try:
        args = subprocess.run(
            ["ps", "-p", str(pid), "-o", "args="], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return False
    return "qdb_client.testing" in args


def read_pid(path: Path) -> int | None:
    """The pid a pid file holds, or None if it is missing or holds something else."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if _PID.fullmatch(text) else None


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" if it can't be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def child_env() -> dict[str, str]:
    """This environment, with this package importable (another ``--python`` may lack it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def _private(path: Path) -> BinaryIO:
    """``path`` opened for writing (truncated), readable by its owner only: a node's
    stdout holds its control token."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def spawn(command: list[str], out: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in the background: stdout to ``out``, stderr to ``log`` (both
    readable by their owner only)."""
    with _private(out) as stdout, _private(log) as stderr:
        return subprocess.Popen(
            command,
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=child_env(),
            start_new_session=True,  # like nohup: the node outlives this command
        )


def run_proxy(args: Sequence[str]) -> int:
    """``qdb proxy ARGS``: become ``python -m qdb_client.testing proxy ARGS``."""
    command = [sys.executable, "-m", "qdb_client.testing", "proxy", *args]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(sys.executable, command, child_env())  # signals and status go straight to it
    return subprocess.call(command, env=child_env())
