"""The saga runner: steps forward, compensations backward, state in the database.

See the package docstring (:mod:`qdb_client.saga`) and docs/observability.md
for the contract; this module is the engine.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._policies import Backoff
from ..metrics import reliability_of
from . import _store
from ._events import SagaCompensated, SagaCompleted, SagaStarted, SagaStepCompleted
from ._store import SagaError, SagaRecord

if TYPE_CHECKING:
    from .._client import Client

__all__ = [
    "DEFAULT_COMPENSATION_BACKOFF",
    "MAX_COMPENSATION_RETRIES",
    "Saga",
    "SagaResult",
    "Step",
    "StepContext",
    "StepFunction",
]

logger = logging.getLogger("qdb_client.saga")

#: Retries of a failing compensation before the saga is marked failed (seed 003).
MAX_COMPENSATION_RETRIES = 3
#: Sleeps between compensation tries: 0.1, 0.2, 0.4 s ... (at most 5 s), +-10%.
DEFAULT_COMPENSATION_BACKOFF = Backoff(initial=0.1, maximum=5.0, multiplier=2.0)


@attrs.frozen
class StepContext:
    """What a step's action or compensation is called with.

    ``phase`` is ``"action"`` or ``"compensation"``; ``attempt`` counts the
    tries of this phase in this process (from 1); ``result`` is, for a
    compensation, what the step's action returned, in its JSON form (as the
    database stores it, so the same before and after a restart: tuples are
    lists, mapping keys are text). ``idempotency_key`` is the same in every process and
    every try of this step's phase: pass it to ``client.execute`` and a step
    run again after a crash applies its write once.
    """

    client: Client
    saga_id: str
    saga_name: str
    step: str
    index: int
    phase: str
    attempt: int = 1
    result: Any = None

    @property
    def idempotency_key(self) -> str:
        """``saga:<saga id>:<step index>:do`` (action) or ``...:undo`` (compensation)."""
        suffix = "do" if self.phase == "action" else "undo"
        return f"saga:{self.saga_id}:{self.index}:{suffix}"


#: An action or a compensation: an async callable taking a StepContext.
StepFunction = Callable[[StepContext], Awaitable[Any]]


@attrs.frozen
class Step:
    """One step: ``action`` runs forward, ``compensation`` (if any) undoes it."""

    name: str
    action: StepFunction
    compensation: StepFunction | None = None


def _as_step(step: Any) -> Step:
    """``step`` as a :class:`Step`: one already, or a ``(name, action)`` or
    ``(name, action, compensation)`` tuple; SagaError for anything else."""
    if isinstance(step, Step):
        return step
    if isinstance(step, tuple) and len(step) in (2, 3):
        return Step(*step)
    raise SagaError(
        f"a step is a Step or a (name, action[, compensation]) tuple, not {step!r:.100}"
    )


@attrs.frozen(kw_only=True)
class SagaResult:
    """How a saga ended (seed 003's fields first).

    ``status``: ``completed``, ``compensated`` or ``failed``.
    ``completed_steps``: steps whose action completed, in order (also those
    compensated since). ``compensated_steps``: steps undone, in compensation
    order (the reverse). ``compensation_retries``: failed compensation tries
    that were retried. ``failed_step``/``error``: the step whose action
    failed and what it raised (class and message), or the compensation that
    gave up. ``results``: what each completed action returned.
    """

    saga_id: str
    name: str
    status: str
    completed_steps: tuple[str, ...]
    compensated_steps: tuple[str, ...]
    compensation_retries: int
    failed_step: str | None
    error: str | None
    results: dict[str, Any]

    @classmethod
    def from_record(cls, record: SagaRecord) -> SagaResult:
        """The result a stored saga state stands for."""
        return cls(
            saga_id=record.saga_id,
            name=record.name,
            status=record.status,
            completed_steps=tuple(record.completed_steps),
            compensated_steps=tuple(record.compensated_steps),
            compensation_retries=record.compensation_retries,
            failed_step=record.failed_step,
            error=record.error,
            results=dict(record.results),
        )


class Saga:
    """A sequence of steps that either all complete or are compensated in reverse.

    ``saga = Saga(client, "order")``; ``saga.add_step(name, action,
    compensation)`` for each step; ``result = await saga.execute()``.
    ``max_compensation_retries`` (3) and ``backoff`` (0.1 s doubling, +-10%)
    govern the retries of a failing compensation; ``rng`` jitters them.
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        saga_id: str | None = None,
        max_compensation_retries: int = MAX_COMPENSATION_RETRIES,
        backoff: Backoff = DEFAULT_COMPENSATION_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise SagaError(f"a saga's name is non-empty text, not {name!r}")
        if isinstance(max_compensation_retries, bool) or not (
            isinstance(max_compensation_retries, int) and max_compensation_retries >= 0
        ):
            raise SagaError(
                f"max_compensation_retries is a count (>= 0), not {max_compensation_retries!r}"
            )
        self.client = client
        self.name = name
        self._id = _store.check_saga_id(saga_id) if saga_id is not None else uuid.uuid4().hex
        self.max_compensation_retries = max_compensation_retries
        self.backoff = backoff
        self._rng = rng or random.Random()
        self._steps: list[Step] = []
        self._started = False
        #: Names this object's writes in their idempotency keys.
        self._token = uuid.uuid4().hex[:16]

    @property
    def id(self) -> str:
        """The saga's id (its row in ``qdb_sagas``; what :meth:`resume` takes)."""
        return self._id

    @property
    def steps(self) -> tuple[Step, ...]:
        """The declared steps, in order."""
        return tuple(self._steps)

    def add_step(
        self, name: str, action: StepFunction, compensation: StepFunction | None = None
    ) -> Saga:
        """Declare the next step; returns the saga (so calls can be chained)."""
        if self._started:
            raise SagaError("steps can't be added to a saga that started")
        self._steps.append(_checked_step(Step(name, action, compensation), self._steps))
        return self

    async def execute(self) -> SagaResult:
        """Run every step in order; on a failing step compensate the completed
        ones in reverse. The state is stored in ``qdb_sagas`` before the first
        step and after each step and compensation. Errors of the database
        itself (a QdbError while storing the state) propagate: the saga can be
        resumed later, as after a crash."""
        if self._started:
            raise SagaError(f"saga {self._id!r} was executed already; use Saga.resume()")
        if not self._steps:
            raise SagaError("a saga needs at least one step")
        self._started = True
        record = SagaRecord(
            saga_id=self._id,
            name=self.name,
            status="running",
            steps=tuple(step.name for step in self._steps),
        )
        await _store.insert(self.client, record, self._token)
        self._emit(SagaStarted(trio.current_time(), self._id, self.name, record.steps))
        return await self._drive(record)

    @classmethod
    async def resume(
        cls,
        client: Client,
        saga_id: str,
        steps: Iterable[Step | tuple[Any, ...]],
        **options: Any,
    ) -> SagaResult:
        """Continue a saga stored by another run (after a crash, say) from where it stopped.

        ``steps`` are the saga's steps declared again, the same names in the
        same order (``Step`` objects or ``(name, action, compensation)``
        tuples): code can't be stored, so the application keeps its sagas'
        step lists where both the first run and the recovery find them.
        A running saga runs its next steps (the step that was in progress
        when it stopped runs again: use ``ctx.idempotency_key``); a
        compensating or failed one compensates what is left; an ended one
        returns its stored result. ``options`` as for :class:`Saga`.
        """
        checked: list[Step] = []  # bad input fails here, before any query
        for step in steps:
            checked.append(_checked_step(_as_step(step), checked))
        record = await _store.load(client, saga_id)
        if record is None:
            raise SagaError(f"no saga {saga_id!r} in {_store.TABLE}")
        saga = cls(client, record.name, saga_id=saga_id, **options)
        saga._steps.extend(checked)
        declared = tuple(step.name for step in saga._steps)
        if declared != record.steps:
            raise SagaError(
                f"saga {saga_id!r} ({record.name}) was stored with steps {list(record.steps)},"
                f" not {list(declared)}: declare the same steps in the same order"
            )
        saga._started = True
        if record.finished:
            await trio.lowlevel.checkpoint()
            return SagaResult.from_record(record)
        saga._emit(SagaStarted(trio.current_time(), saga_id, record.name, declared, True))
        return await saga._drive(record)

    # ---------------------------------------------------------------- engine

    async def _drive(self, record: SagaRecord) -> SagaResult:
        if record.status == "running":
            await self._forward(record)
        if record.status in ("compensating", "failed"):
            await self._backward(record)
        return self._finish(record)

    async def _forward(self, record: SagaRecord) -> None:
        """Run the steps not completed yet; on a failure, mark the saga compensating."""
        for index in range(len(record.completed_steps), len(self._steps)):
            step = self._steps[index]
            context = StepContext(self.client, self._id, self.name, step.name, index, "action")
            try:
                result = await step.action(context)
            except Exception as exc:
                logger.info("saga %s (%s): step %s failed: %r", self._id, self.name, step.name, exc)
                record.status = "compensating"
                record.failed_step = step.name
                record.error = _describe(exc)
                await _store.update(self.client, record, self._token)
                return
            record.completed_steps.append(step.name)
            record.results[step.name] = self._storable(step.name, result)
            if index == len(self._steps) - 1:
                record.status = "completed"
            await _store.update(self.client, record, self._token)
            self._emit(
                SagaStepCompleted(trio.current_time(), self._id, self.name, step.name, index)
            )
        if record.status == "running":  # stored as running with every step done
            record.status = "completed"
            await _store.update(self.client, record, self._token)

    async def _backward(self, record: SagaRecord) -> None:
        """Compensate the completed steps not compensated yet, last first."""
        metrics = reliability_of(self.client)
        record.status = "compensating"
        by_name = {step.name: (index, step) for index, step in enumerate(self._steps)}
        for name in reversed(record.completed_steps):
            index, step = by_name[name]
            if name in record.compensated_steps or step.compensation is None:
                continue
            retries = 0
            while True:
                context = StepContext(
                    self.client,
                    self._id,
                    self.name,
                    name,
                    index,
                    "compensation",
                    retries + 1,
                    record.results.get(name),
                )
                try:
                    await step.compensation(context)
                    break
                except Exception as exc:
                    if retries >= self.max_compensation_retries:
                        logger.warning(
                            "saga %s (%s): compensation of %s gave up after %d tries: %r",
                            self._id,
                            self.name,
                            name,
                            retries + 1,
                            exc,
                        )
                        record.status = "failed"
                        record.error = f"compensation of {name}: {_describe(exc)}"
                        await _store.update(self.client, record, self._token)
                        return
                    delay = self.backoff.delay(retries, self._rng)
                    retries += 1
                    record.compensation_retries += 1
                    metrics.record_compensation_retry()
                    await trio.sleep(delay)
            record.compensated_steps.append(name)
            metrics.record_compensation()
            await _store.update(self.client, record, self._token)
            self._emit(SagaCompensated(trio.current_time(), self._id, self.name, name, retries))
        record.status = "compensated"
        await _store.update(self.client, record, self._token)

    def _finish(self, record: SagaRecord) -> SagaResult:
        reliability_of(self.client).record_saga_end(record.status)
        result = SagaResult.from_record(record)
        self._emit(
            SagaCompleted(
                trio.current_time(),
                self._id,
                self.name,
                result.status,
                result.completed_steps,
                result.compensated_steps,
                result.failed_step,
                result.error,
            )
        )
        return result

    def _storable(self, step: str, result: Any) -> Any:
        """``result`` as JSON stores it, else None (with a warning).

        The stored image is also what this run hands on (to the compensation,
        to the result), so a compensation sees the same value whether it runs
        now or after :meth:`resume` (tuples become lists, keys become text).
        """
        try:
            image = json.loads(json.dumps(result))
        except (TypeError, ValueError):
            logger.warning(
                "saga %s (%s): the result of step %s is not JSON (%s); stored as null",
                self._id,
                self.name,
                step,
                type(result).__name__,
            )
            return None
        if image != result:
            logger.warning(
                "saga %s (%s): the result of step %s changes through JSON (%s);"
                " its JSON form is kept, as a resume would see it",
                self._id,
                self.name,
                step,
                type(result).__name__,
            )
        return image

    def _emit(self, event: Any) -> None:
        self.client.events.emit(event)


def _checked_step(step: Step, declared: list[Step]) -> Step:
    if not isinstance(step.name, str) or not step.name:
        raise SagaError(f"a step's name is non-empty text, not {step.name!r}")
    if any(other.name == step.name for other in declared):
        raise SagaError(f"step names must be unique within a saga: {step.name!r} is taken")
    if not callable(step.action) or (
        step.compensation is not None and not callable(step.compensation)
    ):
        raise SagaError(f"step {step.name!r}: action and compensation are async callables")
    return step


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]
