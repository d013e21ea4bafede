"""Sagas: steps that all complete, or are compensated in reverse (seed 003).

::

    from qdb_client.saga import Saga

    async def reserve(ctx):          # every action and compensation takes a StepContext
        await ctx.client.execute(
            "UPDATE stock SET held = held + 1 WHERE item = ?", [7],
            idempotency_key=ctx.idempotency_key,   # applied once, even when run again
        )

    saga = Saga(client, "order")
    saga.add_step("reserve", reserve, release)
    saga.add_step("charge", charge, refund)
    saga.add_step("ship", ship)                  # no compensation: nothing to undo
    result = await saga.execute()
    result.status               # "completed" | "compensated" | "failed"
    result.completed_steps      # ("reserve", "charge")          actions that completed
    result.compensated_steps    # ("charge", "reserve")          in compensation order
    result.compensation_retries # compensation tries that failed and were retried

When an action raises, the completed steps are compensated last first; a
failing compensation is retried (``max_compensation_retries=3``, with the
driver's backoff, sleeping in trio time) and when it still fails the saga
stops there with status ``failed`` (the steps before it are left alone,
since they may be what it depends on).

The saga's state is a row of the ``qdb_sagas`` table, written through the
client before the first step and after every step and compensation, each
write with its own idempotency key. After a crash, find the sagas that did
not end with :func:`pending_sagas` and continue each with
``await Saga.resume(client, saga_id, steps=...)``, declaring the same steps
again (code can't be stored in a database: keep each saga's step list in one
function that both the first run and the recovery call). A step that was in
progress when the process died runs again: make it idempotent with
``ctx.idempotency_key``.

Events ``saga.started``, ``saga.step_completed``, ``saga.compensated`` and
``saga.completed`` (classes :class:`SagaStarted` ...) go to the client's
listeners and the ``qdb_client.saga`` logger; compensations count in
``client.statistics()["reliability"]`` (docs/observability.md).
"""

from __future__ import annotations

from typing import Any

from ._events import (
    SAGA_EVENTS,
    SagaCompensated,
    SagaCompleted,
    SagaEvent,
    SagaStarted,
    SagaStepCompleted,
)
from ._saga import (
    DEFAULT_COMPENSATION_BACKOFF,
    MAX_COMPENSATION_RETRIES,
    Saga,
    SagaResult,
    Step,
    StepContext,
    StepFunction,
)
from ._store import TABLE, SagaConflict, SagaError, SagaRecord
from ._store import load as _load
from ._store import pending as _pending

__all__ = [
    "DEFAULT_COMPENSATION_BACKOFF",
    "MAX_COMPENSATION_RETRIES",
    "SAGA_EVENTS",
    "TABLE",
    "Saga",
    "SagaCompensated",
    "SagaCompleted",
    "SagaConflict",
    "SagaError",
    "SagaEvent",
    "SagaRecord",
    "SagaResult",
    "SagaStarted",
    "SagaStepCompleted",
    "Step",
    "StepContext",
    "StepFunction",
    "load_saga",
    "pending_sagas",
]


async def load_saga(client: Any, saga_id: str) -> SagaRecord | None:
    """The stored state of saga ``saga_id`` (None if there is none)."""
    return await _load(client, saga_id)


async def pending_sagas(client: Any, name: str | None = None) -> list[SagaRecord]:
    """Sagas that did not end (running, compensating, failed), oldest first;
    only those called ``name`` when given. Resume each with :meth:`Saga.resume`."""
    return await _pending(client, name)
