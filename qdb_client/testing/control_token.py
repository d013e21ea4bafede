"""The control token of a test node: what lets a connection use ``control.*``.

A node in test mode answers fault controls (drop every connection, refuse
connections, shut down, ...) and exempts the control tool's own traffic from
faults and statistics. What makes a connection the control tool is not a
name any client can claim, but a secret: each node draws a fresh token when
it is built (256 random bits) and a HELLO must carry it in ``auth``
(``{"control_token": token}``, beside the user's credentials or without
them). The token is known to whoever started the node:

- in this process, through :attr:`QdbNode.control_token` and a registry by
  address, so ``open_node_control(node.address)`` finds it;
- from the readiness line of ``python -m qdb_client.testing``
  (``control_token=...``), which :class:`~qdb_client.testing.TestCluster` reads;
- from ``<state dir>/node-<port>.control-token`` (mode 0600), written by a
  node started with ``--state-dir`` (the scripts and ``qdb cluster`` do), and
  found through ``QDB_CLUSTER_DIR``;
- from the environment variable ``QDB_CONTROL_TOKEN`` (one token for every node).

:func:`find_token` looks in that order.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from .config import parse_address

__all__ = [
    "CONTROL_TOKEN_ENV",
    "STATE_DIR_ENV",
    "find_token",
    "new_token",
    "register",
    "remove_token_file",
    "token_file",
    "tokens_match",
    "unregister",
    "write_token_file",
]

#: Environment variable holding a control token (used for every node).
CONTROL_TOKEN_ENV = "QDB_CONTROL_TOKEN"
#: Environment variable naming the state directory of a background cluster.
STATE_DIR_ENV = "QDB_CLUSTER_DIR"

#: Tokens of the nodes running in this process, by address.
_REGISTRY: dict[str, str] = {}


def new_token() -> str:
    """A fresh control token: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def tokens_match(offered: str, expected: str) -> bool:
    """Whether ``offered`` is ``expected`` (compared in constant time)."""
    return hmac.compare_digest(offered.encode("utf-8"), expected.encode("utf-8"))


def register(address: str, token: str) -> None:
    """Make ``token`` findable for ``address`` in this process."""
    _REGISTRY[address] = token


def unregister(address: str, token: str) -> None:
    """Forget ``address``'s token, unless another node registered its own since."""
    if _REGISTRY.get(address) == token:
        del _REGISTRY[address]


def token_file(state_dir: str | os.PathLike[str], port: int) -> Path:
    """Where a node on ``port`` writes its token in ``state_dir``."""
    return Path(state_dir) / f"node-{port}.control-token"


def write_token_file(state_dir: str | os.PathLike[str], port: int, token: str) -> Path:
    """Write ``token`` to :func:`token_file`, readable by its owner only (atomically)."""
    path = token_file(state_dir, port)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return path


def remove_token_file(state_dir: str | os.PathLike[str], port: int, token: str) -> None:
    """Remove the token file if it still holds ``token`` (a restarted node wrote its own)."""
    path = token_file(state_dir, port)
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8").strip() == token:
            path.unlink()


def find_token(address: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The control token for the node at ``address``, or None if none is known.

    Looks in this process's registry, then in ``$QDB_CLUSTER_DIR/node-<port>.control-token``,
    then in ``$QDB_CONTROL_TOKEN``.
    """
    token = _REGISTRY.get(address)
    if token is not None:
        return token
    env = os.environ if environ is None else environ
    state = env.get(STATE_DIR_ENV, "").strip()
    if state:
        try:
            port = parse_address(address)[1]
            text = token_file(state, port).read_text(encoding="utf-8").strip()
        except (OSError, ValueError):
            text = ""
        if text:
            return text
    return env.get(CONTROL_TOKEN_ENV, "").strip() or None
