"""Command line of a test node: ``python -m qdb_client.testing [options]``.

Once the node listens it prints one readiness line on stdout::

    QDB-NODE READY node_id=node-7000 address=127.0.0.1:7000 port=7000 pid=12345 control_token=...

(``control_token`` only in test mode: the secret a control connection's HELLO
must carry; with ``--state-dir DIR`` it is also written to
``DIR/node-<port>.control-token``, readable by its owner only, and removed at
a clean stop).

Credentials come from a file (``--credentials-file PATH``, lines
``user:password``) or the environment (``QDB_NODE_CREDENTIALS``, the same
lines), never from the command line, which every user of the machine can
read (``/proc/PID/cmdline``, ``ps``): ``--credentials USER:PASSWORD`` still
works but is deprecated and logs a warning. TLS: ``--tls-cert`` (and
``--tls-key``; ``--tls-client-ca`` to require client certificates).

and nothing else (logs go to stderr). SIGTERM or SIGINT shut it down
gracefully: GOAWAY ``shutdown`` to every connection, in-flight requests get
``--grace`` seconds. Exit status 0 after a clean stop, 1 if it could not
start (port in use, bad option).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import trio

from ..errors import ConfigError
from . import control_token
from ._nursery import owned_nursery
from .config import ServerConfig
from .server import QdbNode

__all__ = [
    "CREDENTIALS_ENV",
    "READY_PATTERN",
    "build_parser",
    "config_from_args",
    "main",
    "options_to_args",
    "parse_credentials",
    "run_node",
]

#: Environment variable holding the node's credentials (``user:password`` lines).
CREDENTIALS_ENV = "QDB_NODE_CREDENTIALS"

logger = logging.getLogger("qdb_client.testing")

#: Matches the readiness line; groups ``node_id``, ``address``, ``port``, ``pid`` and
#: ``control_token`` (None outside test mode).
READY_PATTERN = re.compile(
    r"^QDB-NODE READY node_id=(?P<node_id>\S+) address=(?P<address>\S+) port=(?P<port>\d+)"
    r"(?: pid=(?P<pid>\d+))?(?: control_token=(?P<control_token>\S+))?"
)

# ServerConfig field -> command line flag, for options that take a value.
_VALUE_FLAGS = {
    "host": "--host",
    "port": "--port",
    "node_id": "--node-id",
    "database": "--db",
    "peers_file": "--peers-file",
    "client_idle_timeout": "--idle-timeout",
    "request_timeout": "--request-timeout",
    "max_connections": "--max-connections",
    "max_in_flight": "--max-in-flight",
    "max_frame_size": "--max-frame-size",
    "sqlite_pool_size": "--sqlite-pool-size",
    "idempotency_ttl": "--idempotency-ttl",
    "stream_retention": "--stream-retention",
    "change_retention": "--change-retention",
    "transaction_idle_timeout": "--transaction-idle-timeout",
    "max_transactions": "--max-transactions",
    "max_prepared": "--max-prepared",
    "server_name": "--server-name",
    "session_ttl": "--session-ttl",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_client_ca": "--tls-client-ca",
    "tls_handshake_timeout": "--tls-handshake-timeout",
    "handshake_timeout": "--handshake-timeout",
    "max_pending_handshakes": "--max-pending-handshakes",
    "max_connections_per_address": "--max-connections-per-address",
    "write_timeout": "--write-timeout",
    "max_queued_reply_bytes": "--max-queued-reply-bytes",
    "max_result_size": "--max-result-size",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m qdb_client.testing``."""
    defaults = ServerConfig()
    p = argparse.ArgumentParser(
        prog="python -m qdb_client.testing",
        description="Run one QDB protocol v1 test node (SQLite storage).",
    )
    p.add_argument("--host", default=defaults.host, help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    p.add_argument("--db", dest="database", help="SQLite file shared by the cluster")
    p.add_argument("--peers", default="", help="other members, 'host:port,host:port'")
    p.add_argument("--peers-file", help="file listing other members, one 'host:port' a line")
    p.add_argument("--node-id", help="node id (default node-<port>)")
    p.add_argument("--test-mode", action="store_true", help="enable control.* methods")
    p.add_argument(
        "--foreign-keys", action="store_true", help="enforce foreign keys on every connection"
    )
    p.add_argument(
        "--idle-timeout",
        dest="client_idle_timeout",
        type=float,
        default=defaults.client_idle_timeout,
    )
    p.add_argument("--request-timeout", type=float, default=defaults.request_timeout)
    p.add_argument("--max-connections", type=int, default=defaults.max_connections)
    p.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight)
    p.add_argument("--max-frame-size", type=int, default=defaults.max_frame_size)
    p.add_argument("--sqlite-pool-size", type=int, default=defaults.sqlite_pool_size)
    p.add_argument(
        "--idempotency-ttl",
        type=float,
        default=defaults.idempotency_ttl,
        help="seconds the outcome of a keyed write is kept (default %(default)s)",
    )
    p.add_argument(
        "--stream-retention",
        type=float,
        default=defaults.stream_retention,
        help="seconds a spooled result stream is kept after its last page (default %(default)s)",
    )
    p.add_argument(
        "--change-retention",
        type=float,
        default=defaults.change_retention,
        help="seconds the change log keeps a change for subscriptions (default %(default)s)",
    )
    p.add_argument(
        "--transaction-idle-timeout",
        type=float,
        default=defaults.transaction_idle_timeout,
        help="seconds a transaction may stay idle between requests (default %(default)s)",
    )
    p.add_argument(
        "--max-transactions",
        type=int,
        default=defaults.max_transactions,
        help="transactions open on the node at once (default %(default)s)",
    )
    p.add_argument(
        "--max-prepared",
        type=int,
        default=defaults.max_prepared,
        help="prepared statements per session (default %(default)s)",
    )
    p.add_argument("--server-name", default=defaults.server_name)
    p.add_argument(
        "--credentials-file",
        metavar="PATH",
        help="require authentication: a file of 'user:password' lines"
        f" (or set {CREDENTIALS_ENV} to such lines)",
    )
    p.add_argument(
        "--credentials",
        action="append",
        default=[],
        metavar="USER:PASSWORD",
        help="deprecated: any user of the machine can read the command line;"
        " use --credentials-file",
    )
    p.add_argument(
        "--session-ttl",
        type=float,
        default=defaults.session_ttl,
        help="seconds a session token stays valid (default %(default)s)",
    )
    p.add_argument("--tls-cert", help="PEM certificate (chain): the node speaks TLS only")
    p.add_argument("--tls-key", help="PEM private key (if not in --tls-cert)")
    p.add_argument(
        "--tls-client-ca", help="PEM CA certificates: require client certificates signed by one"
    )
    p.add_argument(
        "--tls-handshake-timeout",
        type=float,
        default=defaults.tls_handshake_timeout,
        help="seconds a client gets to complete the TLS handshake (default %(default)s)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=defaults.handshake_timeout,
        help="seconds from accept until the handshake (TLS, HELLO) is done (default %(default)s)",
    )
    p.add_argument(
        "--max-pending-handshakes",
        type=int,
        default=defaults.max_pending_handshakes,
        help="connections in their handshake at once (default %(default)s)",
    )
    p.add_argument(
        "--max-connections-per-address",
        type=int,
        default=None,
        help="open connections from one client host (default: no limit)",
    )
    p.add_argument(
        "--write-timeout",
        type=float,
        default=defaults.write_timeout,
        help="seconds a write to a client may block before it is disconnected"
        " (default %(default)s)",
    )
    p.add_argument(
        "--max-queued-reply-bytes",
        type=int,
        default=defaults.max_queued_reply_bytes,
        help="bytes of replies waiting to be written per connection (default %(default)s)",
    )
    p.add_argument(
        "--max-result-size",
        type=int,
        default=defaults.max_result_size,
        help="largest result, and string or blob a statement builds (default %(default)s)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="write the control token to DIR/node-<port>.control-token (mode 0600)",
    )
    p.add_argument(
        "--grace", type=float, default=5.0, help="seconds in-flight requests get on SIGTERM"
    )
    p.add_argument("--log-level", default=os.environ.get("QDB_TEST_LOG_LEVEL", "INFO"))
    return p


def parse_credentials(text: str, *, source: str) -> dict[str, str]:
    """``user:password`` lines (blank lines and ``#`` comments skipped) as a dict.

    The password is everything after the first ``:``. A malformed line or a
    user named twice is a ConfigError that names the line, never its text.
    """
    credentials: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        user = user.strip()
        if not sep or not user:
            raise ConfigError(f"{source}, line {number}: not 'user:password'")
        if user in credentials:
            raise ConfigError(f"{source}, line {number}: user {user!r} is listed twice")
        credentials[user] = password
    return credentials


def _credentials(ns: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str] | None:
    found: list[tuple[str, dict[str, str]]] = []
    if ns.credentials_file:
        try:
            with open(ns.credentials_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read --credentials-file: {exc.strerror}") from None
        found.append(("--credentials-file", parse_credentials(text, source=ns.credentials_file)))
    if environ.get(CREDENTIALS_ENV, "").strip():
        found.append(
            (CREDENTIALS_ENV, parse_credentials(environ[CREDENTIALS_ENV], source=CREDENTIALS_ENV))
        )
    if ns.credentials:
        logger.warning(
            "--credentials puts passwords on the command line, which any user of this"
            " machine can read: use --credentials-file or %s (deprecated)",
            CREDENTIALS_ENV,
        )
        items: dict[str, str] = {}
        for item in ns.credentials:
            user, sep, password = item.partition(":")
            if not sep or not user:
                raise ConfigError("a --credentials value is not USER:PASSWORD")
            items[user] = password
        found.append(("--credentials", items))
    if not found:
        return None
    merged: dict[str, str] = {}
    for source, users in found:
        for user, password in users.items():
            if user in merged:
                raise ConfigError(f"user {user!r} is given twice ({source} and before)")
            merged[user] = password
    return merged


def config_from_args(
    ns: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ServerConfig:
    """Build the :class:`ServerConfig` that parsed arguments describe (ConfigError if invalid).

    Credentials come from ``--credentials-file``, ``QDB_NODE_CREDENTIALS`` in
    ``environ`` (default ``os.environ``) and the deprecated ``--credentials``.
    """
    credentials = _credentials(ns, os.environ if environ is None else environ)
    return ServerConfig(
        host=ns.host,
        port=ns.port,
        node_id=ns.node_id,
        database=ns.database,
        peers=ns.peers,
        peers_file=ns.peers_file,
        client_idle_timeout=ns.client_idle_timeout,
        max_connections=ns.max_connections,
        request_timeout=ns.request_timeout,
        max_frame_size=ns.max_frame_size,
        max_in_flight=ns.max_in_flight,
        test_mode=ns.test_mode,
        credentials=credentials,
        sqlite_pool_size=ns.sqlite_pool_size,
        idempotency_ttl=ns.idempotency_ttl,
        stream_retention=ns.stream_retention,
        change_retention=ns.change_retention,
        server_name=ns.server_name,
        foreign_keys=ns.foreign_keys,
        transaction_idle_timeout=ns.transaction_idle_timeout,
        max_transactions=ns.max_transactions,
        max_prepared=ns.max_prepared,
        session_ttl=ns.session_ttl,
        tls_cert=ns.tls_cert,
        tls_key=ns.tls_key,
        tls_client_ca=ns.tls_client_ca,
        tls_handshake_timeout=ns.tls_handshake_timeout,
        handshake_timeout=ns.handshake_timeout,
        max_pending_handshakes=ns.max_pending_handshakes,
        max_connections_per_address=ns.max_connections_per_address,
        write_timeout=ns.write_timeout,
        max_queued_reply_bytes=ns.max_queued_reply_bytes,
        max_result_size=ns.max_result_size,
    )


def options_to_args(options: Mapping[str, Any]) -> list[str]:
    """Command line flags for :class:`ServerConfig` field values (``peers`` and
    ``test_mode`` included). ConfigError for a field the command line can't express,
    and for ``credentials``: passwords never go on a command line (write them to
    a file for ``--credentials-file``, as :class:`~.cluster.TestCluster` does).
    """
    args: list[str] = []
    for name, value in options.items():
        if value is None:
            continue
        if name in _VALUE_FLAGS:
            args += [_VALUE_FLAGS[name], str(value)]
        elif name == "peers":
            args += ["--peers", value if isinstance(value, str) else ",".join(value)]
        elif name == "test_mode":
            args += ["--test-mode"] if value else []
        elif name == "foreign_keys":
            args += ["--foreign-keys"] if value else []
        elif name == "credentials":
            raise ConfigError(
                "credentials can't go on a command line (any user of the machine can read"
                " it): write them to a file and pass --credentials-file"
            )
        else:
            raise ConfigError(f"no command line option for {name!r}")
    return args


async def run_node(
    config: ServerConfig,
    *,
    grace: float = 5.0,
    out: TextIO | None = None,
    state_dir: str | None = None,
) -> None:
    """Serve ``config`` until SIGTERM/SIGINT (graceful shutdown) or ``control.shutdown``.

    Prints the readiness line to ``out`` (default stdout) once listening; in
    test mode it carries the control token, which ``state_dir`` also receives
    (``node-<port>.control-token``, removed when the node stops).
    """
    out = sys.stdout if out is None else out
    node = QdbNode(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with owned_nursery() as nursery:
            await nursery.start(node.serve)
            token = ""
            if config.test_mode:
                token = f" control_token={node.control_token}"
                if state_dir is not None:
                    control_token.write_token_file(state_dir, node.port, node.control_token)
                    nursery.start_soon(_remove_token_at_stop, node, state_dir)
            print(
                f"QDB-NODE READY node_id={node.node_id} address={node.address}"
                f" port={node.port} pid={os.getpid()}{token}",
                file=out,
                flush=True,
            )

            async def on_signal() -> None:
                async for signum in signals:
                    logger.info("%s: got signal %d, shutting down", node.node_id, signum)
                    await node.shutdown(grace)
                    return

            nursery.start_soon(on_signal)
            await node.wait_stopped()


async def _remove_token_at_stop(node: QdbNode, state_dir: str) -> None:
    try:
        await node.wait_stopped()
    finally:
        control_token.remove_token_file(state_dir, node.port, node.control_token)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m qdb_client.testing``; returns the exit status."""
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(ns)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(functools.partial(run_node, config, grace=ns.grace, state_dir=ns.state_dir))
    except OSError as exc:
        logger.error("cannot start the node: %s", exc)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - signal arrived before the receiver existed
        return 130
    return 0
