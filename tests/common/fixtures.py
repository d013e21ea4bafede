"""pytest fixtures for tests of the test node (imported by tests/integration/conftest.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qdb_client.testing import NodeControl, QdbNode, ServerConfig, open_node, open_node_control

__all__ = ["control", "node", "node_config", "node_rows"]


def node_rows(node: QdbNode | str | Path, sql: str, params: Any = ()) -> list[list[Any]]:
    """Rows of ``sql`` read straight from a node's database file (``node`` or its path).

    For the node's internal tables (``qdb_idempotency``, ...), which the client's
    SQL can't reach.
    """
    path = node.storage.path if isinstance(node, QdbNode) else str(node)
    assert path is not None
    conn = sqlite3.connect(path)
    try:
        return [list(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def node_config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    """A test-mode config on an ephemeral port with a database under ``tmp_path``."""
    settings: dict[str, Any] = {"test_mode": True, "database": tmp_path / "qdb.sqlite3"}
    settings.update(overrides)
    return ServerConfig(**settings)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[QdbNode]:
    """An in-process test-mode node on 127.0.0.1:<ephemeral>."""
    async with open_node(node_config(tmp_path)) as running:
        yield running


@pytest.fixture
async def control(node: QdbNode) -> AsyncIterator[NodeControl]:
    """A control connection to ``node``."""
    async with open_node_control(node.address) as ctl:
        yield ctl
