"""Idempotency keys of the test node: key format, request hashes, stored outcomes.

A write (``execute``, ``batch``, ``executemany``, and a transaction's
``commit``) carrying REQUEST ``idem_key`` is executed at most once per key
within the TTL (docs/protocol.md, section 8.5). The outcome lives in the
table ``qdb_idempotency`` of the node's SQLite file, so every node of a
cluster (in-process or separate processes) sees the same keys.
:mod:`.storage` runs the keyed transaction; this module holds what needs no
database: validating a key, hashing a request, and the types that describe a
keyed outcome.

A key is stored per *scope*: the authenticated user, or ``""`` on a node
without credentials, so two users never see each other's keys.
"""

from __future__ import annotations

import enum
import hashlib
import re
from typing import Any

import attrs
import cbor2

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .typed import identity_default

__all__ = [
    "DEFAULT_TTL",
    "KEY_PATTERN",
    "SCHEMA",
    "IdempotencyKey",
    "KeyedOutcome",
    "KeyedResult",
    "check_key",
    "request_hash",
]

#: Seconds a stored outcome is kept, counted from the execution that stored it.
DEFAULT_TTL = 3600.0
#: A well-formed key: 1 to 128 characters of this set (ASCII only).
KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")

#: Created when the storage opens (idempotent, so every node may run it).
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS qdb_idempotency ("
    " scope TEXT NOT NULL,"
    " key TEXT NOT NULL,"
    " request_hash BLOB NOT NULL,"
    " result BLOB NOT NULL,"
    " created_at REAL NOT NULL,"
    " PRIMARY KEY (scope, key))",
    "CREATE INDEX IF NOT EXISTS qdb_idempotency_created_at ON qdb_idempotency (created_at)",
)


def check_key(key: Any) -> str:
    """``key`` if well formed; otherwise RequestFailed INVALID_REQUEST."""
    if isinstance(key, str) and KEY_PATTERN.fullmatch(key):
        return key
    shown = repr(key) if not isinstance(key, str) or len(key) <= 40 else f"{key[:40]!r}..."
    length = f" ({len(key)} characters)" if isinstance(key, str) else ""
    raise RequestFailed(
        ErrorCode.INVALID_REQUEST,
        f"malformed idempotency key {shown}{length}:"
        " it must be 1 to 128 characters of A-Z a-z 0-9 _ - : .",
    )


def request_hash(method: str, payload: Any) -> bytes:
    """SHA-256 of the canonical CBOR of ``[method, payload]``.

    ``payload`` is ``[sql, params]`` for ``execute`` (``[sql, params,
    expect_rows]`` with an expected row count), the list of ``[sql, params]``
    pairs for ``batch``, ``[sql, rows]`` for ``executemany`` and ``[tx]`` for
    ``commit``, after argument validation (so absent, null and empty
    ``params`` hash alike, and a prepared statement's id counts as its text).
    Canonical CBOR sorts map keys, so named parameters hash the same in any
    order; a typed parameter counts as its tag and stored text.
    """
    data = cbor2.dumps([method, payload], canonical=True, default=identity_default)
    return hashlib.sha256(data).digest()


@attrs.frozen
class IdempotencyKey:
    """A validated key, the hash of the request it came with, and its scope."""

    key: str
    request_hash: bytes
    scope: str = ""


class KeyedOutcome(enum.Enum):
    """What a keyed write did."""

    #: Not seen before (or expired): executed, and the result stored with the write.
    STORED = "stored"
    #: Seen with the same request: not executed, the stored result returned.
    REPLAYED = "replayed"
    #: Seen with a different request: not executed, nothing returned.
    CONFLICT = "conflict"


@attrs.frozen
class KeyedResult:
    """The outcome of a keyed write and its result (None for CONFLICT)."""

    outcome: KeyedOutcome
    result: Any = None
