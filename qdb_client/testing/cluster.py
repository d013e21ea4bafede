"""Clusters of test nodes sharing one SQLite database: in-process, subprocesses or external.

::

    async with TestCluster.start_in_process(n=3) as cluster:
        cluster.addresses            # ["127.0.0.1:40001", ...]
        await cluster.kill(0)        # abrupt: no GOAWAY
        await cluster.restart(0)     # same port, same database

Every node runs in test mode and announces the others in WELCOME
``members`` (through a peers file in the cluster directory, re-read on
each handshake, because ephemeral ports are known only after start).

Nodes with credentials and TLS: pass the :class:`ServerConfig` fields
(``credentials={"ada": "pw"}``, ``tls_cert=..., tls_key=...``). Subprocess
nodes get their credentials through a file in the cluster directory
(``--credentials-file``, readable by its owner only), never on their
command line. ``control_options`` are keyword arguments of every
``control()`` connection (``tls=`` a client context for a TLS cluster,
``credentials=``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ..errors import ConfigError
from ._nursery import owned_nursery
from .cli import READY_PATTERN, options_to_args
from .config import ServerConfig, format_address
from .control import NodeControl, open_node_control
from .faults import Faults
from .server import QdbNode

__all__ = ["TestCluster", "TestServer"]

#: Seconds a subprocess node gets to print its readiness line.
STARTUP_TIMEOUT = 15.0
#: Seconds between SIGTERM and SIGKILL when stopping a subprocess node.
TERMINATE_TIMEOUT = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class TestServer:
    """Handle on one node of a :class:`TestCluster`.

    ``address``/``port``/``node_id`` stay the same across restarts.
    ``node`` is the :class:`QdbNode` of a running in-process node (else
    None); ``pid`` the process id of a running subprocess node (else None).
    """

    __test__ = False  # not a pytest test class

    def __init__(self, index: int, host: str, port: int = 0) -> None:
        #: Position in the cluster.
        self.index = index
        #: Host the node listens on.
        self.host = host
        #: Port (0 until first started).
        self.port = port
        #: Whether the node is up (as far as the harness knows).
        self.running = False

    @property
    def address(self) -> str:
        """``host:port`` of the node."""
        return format_address(self.host, self.port)

    @property
    def node_id(self) -> str:
        """``node-<port>``."""
        return f"node-{self.port}"

    @property
    def node(self) -> QdbNode | None:
        """The in-process node object, when there is one."""
        return None

    @property
    def pid(self) -> int | None:
        """The process id of a subprocess node, when running."""
        return None

    @property
    def faults(self) -> Faults:
        """Synchronous fault controls of a running in-process node (RuntimeError otherwise)."""
        if self.node is None:
            raise RuntimeError(f"{self.address} is not a running in-process node; use control()")
        return self.node.faults

    #: Keyword arguments of every ``control()`` connection (set by the cluster).
    control_options: Mapping[str, Any] = {}

    @property
    def control_token(self) -> str | None:
        """The running node's control token (None when the harness does not know it:
        an external node, whose token is found as :func:`open_node_control` finds it)."""
        return None

    def control(self, **kwargs: Any) -> AbstractAsyncContextManager[NodeControl]:
        """``open_node_control(self.address, **control_options, **kwargs)``, with the
        node's control token."""
        options = {**self.control_options, **kwargs}
        if self.control_token is not None:
            options.setdefault("control_token", self.control_token)
        return open_node_control(self.address, **options)

    async def _start(self, nursery: trio.Nursery) -> None:
        raise RuntimeError(f"cannot start {self.address}: the cluster is external")

    async def _kill(self) -> None:
        raise RuntimeError(f"cannot kill {self.address}: the cluster is external")

    async def _stop(self, grace: float) -> None:
        self.running = False
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.index} {self.address} {state}>"


class _InProcessServer(TestServer):
    def __init__(self, index: int, host: str, config: ServerConfig) -> None:
        super().__init__(index, host)
        self._config = config
        self._node: QdbNode | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None

    @property
    def node(self) -> QdbNode | None:
        return self._node if self.running else None

    @property
    def control_token(self) -> str | None:
        return self._node.control_token if self._node is not None else None

    async def _start(self, nursery: trio.Nursery) -> None:
        node = QdbNode(self._config.evolve(host=self.host, port=self.port))
        scope = trio.CancelScope()
        done = trio.Event()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await node.serve(task_status=task_status)
            finally:
                self.running = False
                done.set()

        await nursery.start(run)
        self._node, self._scope, self._done = node, scope, done
        self.port = node.port
        self.running = True

    async def _kill(self) -> None:
        if self._scope is not None and self._done is not None:
            self._scope.cancel()
            await self._done.wait()
        self.running = False

    async def _stop(self, grace: float) -> None:
        if self.running and self._node is not None:
            await self._node.shutdown(grace)
        await self._kill()


class _SubprocessServer(TestServer):
    def __init__(self, index: int, host: str, args: list[str], python: str, log_path: Path) -> None:
        super().__init__(index, host)
        self._args = args
        self._python = python
        self.log_path = log_path
        self._process: trio.Process | None = None
        self._control_token: str | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    @property
    def control_token(self) -> str | None:
        return self._control_token

    async def _start(self, nursery: trio.Nursery) -> None:
        command = [
            self._python,
            "-m",
            "qdb_client.testing",
            "--host",
            self.host,
            "--port",
            str(self.port),
            *self._args,
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        log = await trio.to_thread.run_sync(open, self.log_path, "ab")
        try:
            process = await trio.lowlevel.open_process(
                command, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env
            )
        finally:
            log.close()  # the child has its own copy
        self._process = process
        try:
            with trio.fail_after(STARTUP_TIMEOUT):
                port, self._control_token = await self._read_ready_line(process)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self._kill()
            if isinstance(exc, (trio.TooSlowError, EOFError)):
                raise RuntimeError(
                    f"test node {self.index} did not start: {exc}\n{self._log_tail()}"
                ) from exc
            raise
        self.port = port
        self.running = True

    async def _read_ready_line(self, process: trio.Process) -> tuple[int, str | None]:
        assert process.stdout is not None
        buffer = b""
        while b"\n" not in buffer:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise EOFError(f"the process exited with status {await process.wait()}")
            buffer += chunk
        line = buffer.split(b"\n", 1)[0].decode(errors="replace")
        match = READY_PATTERN.match(line)
        if match is None:
            raise EOFError(f"unexpected first line {line!r}")
        return int(match["port"]), match["control_token"]

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def _kill(self) -> None:
        process = self._process
        self.running = False
        if process is not None:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()

    async def _stop(self, grace: float) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            process.terminate()
            with trio.move_on_after(grace + TERMINATE_TIMEOUT):
                await process.wait()
        await self._kill()


class TestCluster:
    """A set of test nodes sharing one SQLite file; see the constructors below.

    ``nodes`` are :class:`TestServer` handles, ``addresses`` their
    ``host:port``. ``mode`` is ``"in_process"``, ``"subprocess"`` or
    ``"external"`` (a cluster found through ``TEST_SERVER_PORTS``, which can
    only be reached through ``control()``).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        nodes: Sequence[TestServer],
        *,
        mode: str,
        directory: Path | None = None,
        nursery: trio.Nursery | None = None,
    ) -> None:
        #: Handles of the nodes, by index.
        self.nodes = list(nodes)
        #: ``"in_process"``, ``"subprocess"`` or ``"external"``.
        self.mode = mode
        #: Directory holding the database, peers file and logs (None if external).
        self.directory = directory
        self._nursery = nursery

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every node, by index."""
        return [node.address for node in self.nodes]

    @property
    def database(self) -> Path | None:
        """The shared SQLite file (None if external)."""
        return None if self.directory is None else self.directory / "qdb.sqlite3"

    def control(self, index: int, **kwargs: Any) -> AbstractAsyncContextManager[NodeControl]:
        """``open_node_control`` for node ``index``."""
        return self.nodes[index].control(**kwargs)

    async def kill(self, index: int) -> None:
        """Kill node ``index`` abruptly (SIGKILL a subprocess; no GOAWAY)."""
        await self.nodes[index]._kill()

    async def restart(self, index: int) -> None:
        """Start node ``index`` again on the same port (killing it first if running)."""
        node = self.nodes[index]
        if node.running:
            await node._kill()
        if self._nursery is None:  # only an external cluster has none: it starts nothing
            assert self.mode == "external"
            raise RuntimeError(f"cannot start {node.address}: the cluster is external")
        await node._start(self._nursery)

    async def stop(self, index: int | None = None, *, grace: float = 1.0) -> None:
        """Shut node ``index`` (default: every node) down gracefully, killing after a timeout."""
        targets = self.nodes if index is None else [self.nodes[index]]
        async with trio.open_nursery() as nursery:
            for node in targets:
                if node.running:
                    nursery.start_soon(node._stop, grace)

    def _write_peers(self) -> None:
        assert self.directory is not None
        text = "".join(f"{address}\n" for address in self.addresses)
        path = self.directory / "peers"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # ------------------------------------------------------------ constructors

    @classmethod
    @asynccontextmanager
    async def start_in_process(
        cls,
        n: int = 3,
        *,
        directory: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        control_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncIterator[TestCluster]:
        """Run ``n`` nodes in this trio run; ``options`` are :class:`ServerConfig` fields."""
        async with cls._directory(directory) as path:
            config = ServerConfig(
                **{
                    "test_mode": True,
                    **options,
                    "database": path / "qdb.sqlite3",
                    "peers_file": path / "peers",
                }
            )
            nodes: list[TestServer] = [_InProcessServer(i, host, config) for i in range(n)]
            _set_control_options(nodes, control_options)
            async with cls._running(nodes, "in_process", path, parallel=False) as cluster:
                yield cluster

    @classmethod
    @asynccontextmanager
    async def start_subprocesses(
        cls,
        n: int = 3,
        *,
        directory: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        python: str | None = None,
        control_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncIterator[TestCluster]:
        """Run ``n`` nodes as ``python -m qdb_client.testing`` processes (always test mode).

        Each logs to ``node-<i>.log`` in the cluster directory. ``options``
        are :class:`ServerConfig` fields passed as command line flags, except
        ``credentials``, written to ``credentials`` in the cluster directory
        (mode 0600) and passed as ``--credentials-file``.
        """
        async with cls._directory(directory) as path:
            options = dict(options)
            credentials = options.pop("credentials", None)
            args = options_to_args(
                {**options, "database": path / "qdb.sqlite3", "peers_file": path / "peers"}
            )
            if credentials is not None:
                args += ["--credentials-file", str(_write_credentials(path, credentials))]
            args.append("--test-mode")
            nodes: list[TestServer] = [
                _SubprocessServer(i, host, args, python or sys.executable, path / f"node-{i}.log")
                for i in range(n)
            ]
            _set_control_options(nodes, control_options)
            async with cls._running(nodes, "subprocess", path, parallel=True) as cluster:
                yield cluster

    @classmethod
    @asynccontextmanager
    async def from_environment(
        cls, n: int = 3, *, environ: Mapping[str, str] | None = None, **options: Any
    ) -> AsyncIterator[TestCluster]:
        """The external cluster named by ``TEST_SERVER_PORTS`` (``"7000,7001,7002"``; host
        from ``TEST_SERVER_HOST``, default 127.0.0.1), else :meth:`start_in_process` (``n``,
        ``options``).
        """
        env = os.environ if environ is None else environ
        ports = [p.strip() for p in env.get("TEST_SERVER_PORTS", "").split(",") if p.strip()]
        if ports:
            host = env.get("TEST_SERVER_HOST", "127.0.0.1")
            nodes = []
            for i, port in enumerate(ports):
                node = TestServer(i, host, int(port))
                node.running = True
                nodes.append(node)
            yield cls(nodes, mode="external")
            return
        async with cls.start_in_process(n, **options) as cluster:
            yield cluster

    @staticmethod
    @asynccontextmanager
    async def _directory(directory: str | os.PathLike[str] | None) -> AsyncIterator[Path]:
        if directory is not None:
            path = Path(directory)
            await trio.Path(path).mkdir(parents=True, exist_ok=True)
            yield path
            return
        with tempfile.TemporaryDirectory(prefix="qdb-cluster-") as tmp:
            yield Path(tmp)

    @classmethod
    @asynccontextmanager
    async def _running(
        cls, nodes: list[TestServer], mode: str, path: Path, *, parallel: bool
    ) -> AsyncIterator[TestCluster]:
        async with owned_nursery() as nursery:
            cluster = cls(nodes, mode=mode, directory=path, nursery=nursery)
            try:
                if parallel:
                    errors: list[Exception] = []

                    async def start(node: TestServer, starters: trio.Nursery) -> None:
                        try:
                            await node._start(nursery)
                        except Exception as exc:  # report one plain error, not a group
                            errors.append(exc)
                            starters.cancel_scope.cancel()

                    async with trio.open_nursery() as starters:
                        for node in nodes:
                            starters.start_soon(start, node, starters)
                    if errors:
                        raise errors[0]
                else:
                    for node in nodes:
                        await node._start(nursery)
                cluster._write_peers()
                yield cluster
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(TERMINATE_TIMEOUT):
                        await cluster.stop(grace=0.0)
                    for node in nodes:
                        await node._kill()


def _set_control_options(nodes: Sequence[TestServer], options: Mapping[str, Any] | None) -> None:
    for node in nodes:
        node.control_options = dict(options or {})


def _write_credentials(directory: Path, credentials: Mapping[str, Any]) -> Path:
    """Write ``user:password`` lines to ``directory/credentials``, readable by its owner only."""
    users = ServerConfig(credentials=credentials).credentials or {}
    lines = []
    for user, secret in users.items():
        password = secret.reveal()
        if ":" in user or any(c in user + password for c in "\r\n"):
            raise ConfigError(
                f"credentials of {user!r}: a user name can't hold ':', nor either one a line break"
            )
        lines.append(f"{user}:{password}\n")
    path = directory / "credentials"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(lines))
    return path
