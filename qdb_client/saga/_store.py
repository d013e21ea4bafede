"""Where a saga's state lives: the ``qdb_sagas`` table, written through the driver.

One row per saga, created on first use (``CREATE TABLE IF NOT EXISTS``)::

    saga_id               TEXT PRIMARY KEY
    name                  TEXT       the saga's name
    status                TEXT       running | compensating | completed | compensated | failed
    steps                 TEXT       JSON list of the declared step names, in order
    completed_steps       TEXT       JSON list: steps whose action completed, in order
    compensated_steps     TEXT       JSON list: steps compensated, in compensation order
    results               TEXT       JSON object: step name -> what its action returned
    failed_step           TEXT       the step whose action failed (NULL if none)
    error                 TEXT       class and message of what went wrong (NULL if nothing)
    compensation_retries  INTEGER    compensation tries that failed and were retried
    version               INTEGER    bumped by every update (optimistic concurrency)
    created_at            TEXT       CURRENT_TIMESTAMP of the database (UTC)
    updated_at            TEXT       likewise, at the last update

Every write carries an idempotency key made of the saga id, the new version
and a token of the writing ``Saga`` object (``saga:<id>:<version>:<token>``),
so a write whose reply was lost is retried by the driver and applied once;
and every update is conditional on the version it read (``WHERE version =
?``), so two processes driving the same saga can't both advance it: the
second gets :class:`SagaConflict`.
"""

from __future__ import annotations

import json
import re
import weakref
from typing import Any

import attrs

from ..errors import ConstraintViolation, QdbError

__all__ = [
    "TABLE",
    "SagaConflict",
    "SagaError",
    "SagaRecord",
    "check_saga_id",
    "ensure_table",
    "insert",
    "load",
    "pending",
    "update",
]

#: The table holding every saga's state.
TABLE = "qdb_sagas"

_CREATE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    saga_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    steps TEXT NOT NULL,
    completed_steps TEXT NOT NULL,
    compensated_steps TEXT NOT NULL,
    results TEXT NOT NULL,
    failed_step TEXT,
    error TEXT,
    compensation_retries INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
)"""

_COLUMNS = (
    "saga_id, name, status, steps, completed_steps, compensated_steps, results,"
    " failed_step, error, compensation_retries, version, created_at, updated_at"
)

#: Saga ids: 1..64 characters that are also valid in an idempotency key.
_SAGA_ID = re.compile(r"[A-Za-z0-9_\-.]{1,64}")

#: Clients that created (or saw) the table already.
_created: weakref.WeakSet[Any] = weakref.WeakSet()


class SagaError(QdbError):
    """A saga can't be run or resumed as asked (unknown id, steps that don't
    match the stored ones, an id already used, a saga executed twice)."""


class SagaConflict(SagaError):
    """Another process advanced the saga since this one read it."""


@attrs.define(kw_only=True)
class SagaRecord:
    """A saga's state as stored in the ``qdb_sagas`` table (one row)."""

    saga_id: str
    name: str
    status: str
    steps: tuple[str, ...]
    completed_steps: list[str] = attrs.Factory(list)
    compensated_steps: list[str] = attrs.Factory(list)
    results: dict[str, Any] = attrs.Factory(dict)
    failed_step: str | None = None
    error: str | None = None
    compensation_retries: int = 0
    version: int = 0
    created_at: str | None = None
    updated_at: str | None = None

    @property
    def finished(self) -> bool:
        """Whether the saga ended (completed or compensated; failed can be resumed)."""
        return self.status in ("completed", "compensated")


def check_saga_id(saga_id: Any) -> str:
    """``saga_id`` if it is 1..64 characters of ``A-Z a-z 0-9 _ - .``, else SagaError."""
    if not isinstance(saga_id, str) or not _SAGA_ID.fullmatch(saga_id):
        raise SagaError(f"a saga id is 1..64 characters of A-Z a-z 0-9 _ - and ., not {saga_id!r}")
    return saga_id


async def ensure_table(client: Any) -> None:
    """Create the ``qdb_sagas`` table unless this client did already."""
    if client in _created:
        return
    await client.execute(_CREATE)
    _created.add(client)


async def insert(client: Any, record: SagaRecord, token: str) -> None:
    """Store a new saga (SagaError if its id is taken); ``token`` names the writer."""
    await ensure_table(client)
    sql = (
        f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES"
        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    params = [
        record.saga_id,
        record.name,
        record.status,
        json.dumps(list(record.steps)),
        *_mutable(record),
        record.version,
    ]
    try:
        await client.execute(sql, params, idempotency_key=_key(record.saga_id, 0, token))
    except ConstraintViolation as exc:
        raise SagaError(
            f"saga id {record.saga_id!r} is already used; resume it with Saga.resume()"
            " or choose another id"
        ) from exc


async def update(client: Any, record: SagaRecord, token: str) -> None:
    """Write ``record`` as the next version of its saga (SagaConflict if another
    process wrote one first); bumps ``record.version``. ``token`` names the writer."""
    version = record.version + 1
    sql = (
        f"UPDATE {TABLE} SET status = ?, completed_steps = ?, compensated_steps = ?,"
        " results = ?, failed_step = ?, error = ?, compensation_retries = ?, version = ?,"
        " updated_at = CURRENT_TIMESTAMP WHERE saga_id = ? AND version = ?"
    )
    params = [record.status, *_mutable(record), version, record.saga_id, record.version]
    result = await client.execute(sql, params, idempotency_key=_key(record.saga_id, version, token))
    if result.rows_affected != 1:
        raise SagaConflict(
            f"saga {record.saga_id!r} was changed by someone else since version"
            f" {record.version}; resume it from one place at a time"
        )
    record.version = version


async def load(client: Any, saga_id: str) -> SagaRecord | None:
    """The stored state of saga ``saga_id`` (None if there is none)."""
    await ensure_table(client)
    result = await client.query(
        f"SELECT {_COLUMNS} FROM {TABLE} WHERE saga_id = ?", [check_saga_id(saga_id)]
    )
    row = result.first()
    return None if row is None else _record(row.as_dict())


async def pending(client: Any, name: str | None = None) -> list[SagaRecord]:
    """Sagas that have not ended (running, compensating or failed), oldest first;
    only those called ``name`` when given."""
    await ensure_table(client)
    sql = f"SELECT {_COLUMNS} FROM {TABLE} WHERE status IN ('running', 'compensating', 'failed')"
    params: list[Any] = []
    if name is not None:
        sql += " AND name = ?"
        params.append(name)
    result = await client.query(sql + " ORDER BY created_at, saga_id", params)
    return [_record(row.as_dict()) for row in result]


def _key(saga_id: str, version: int, token: str) -> str:
    return f"saga:{saga_id}:{version}:{token}"


def _mutable(record: SagaRecord) -> list[Any]:
    return [
        json.dumps(record.completed_steps),
        json.dumps(record.compensated_steps),
        json.dumps(record.results),
        record.failed_step,
        record.error,
        record.compensation_retries,
    ]


def _record(row: dict[str, Any]) -> SagaRecord:
    return SagaRecord(
        saga_id=row["saga_id"],
        name=row["name"],
        status=row["status"],
        steps=tuple(json.loads(row["steps"])),
        completed_steps=list(json.loads(row["completed_steps"])),
        compensated_steps=list(json.loads(row["compensated_steps"])),
        results=dict(json.loads(row["results"])),
        failed_step=row["failed_step"],
        error=row["error"],
        compensation_retries=int(row["compensation_retries"]),
        version=int(row["version"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )
