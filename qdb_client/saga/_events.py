"""Events of the saga helper, for the client's listeners and the ``qdb_client.saga`` logger.

They go through ``client.events.emit``, like the driver's own events
(:mod:`qdb_client.events`): to every listener of ``open_client(listeners=...)``
and as one log line each. ``event_type`` is the name seed 003 publishes them
under (``saga.started``, ...).

======================  ====================  ====================================
event                   logger                level
======================  ====================  ====================================
SagaStarted             qdb_client.saga       INFO
SagaStepCompleted       qdb_client.saga       DEBUG
SagaCompensated         qdb_client.saga       INFO
SagaCompleted           qdb_client.saga       INFO (WARNING when compensated/failed)
======================  ====================  ====================================
"""

from __future__ import annotations

import logging
from typing import ClassVar

import attrs

from ..events import Event

__all__ = [
    "SAGA_EVENTS",
    "SagaCompensated",
    "SagaCompleted",
    "SagaEvent",
    "SagaStarted",
    "SagaStepCompleted",
]


class SagaEvent(Event):
    """Base of the saga events: ``saga_id`` and ``name`` say which saga."""

    logger_name: ClassVar[str] = "qdb_client.saga"
    #: The event's name in seed 003's catalogue (``saga.started``...).
    event_type: ClassVar[str] = "saga"
    saga_id: str
    name: str


@attrs.frozen
class SagaStarted(SagaEvent):
    """A saga started (``resumed``: it was picked up again by ``Saga.resume``);
    ``steps`` are its declared step names, in order."""

    event_type: ClassVar[str] = "saga.started"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.INFO
    at: float
    saga_id: str
    name: str
    steps: tuple[str, ...]
    resumed: bool = False


@attrs.frozen
class SagaStepCompleted(SagaEvent):
    """The action of step ``step`` (number ``index``, from 0) completed and was recorded."""

    event_type: ClassVar[str] = "saga.step_completed"
    at: float
    saga_id: str
    name: str
    step: str
    index: int


@attrs.frozen
class SagaCompensated(SagaEvent):
    """The compensation of step ``step`` completed (after ``retries`` failed tries)."""

    event_type: ClassVar[str] = "saga.compensated"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.INFO
    at: float
    saga_id: str
    name: str
    step: str
    retries: int


@attrs.frozen
class SagaCompleted(SagaEvent):
    """The saga ended: ``status`` is ``completed`` (every step ran), ``compensated``
    (a step failed and every completed step was undone) or ``failed`` (a
    compensation failed even after its retries; ``Saga.resume`` tries again).
    ``failed_step`` and ``error`` (class and message) say what went wrong."""

    event_type: ClassVar[str] = "saga.completed"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.WARNING
    at: float
    saga_id: str
    name: str
    status: str
    completed_steps: tuple[str, ...]
    compensated_steps: tuple[str, ...]
    failed_step: str | None
    error: str | None

    @property
    def level(self) -> int:
        return logging.INFO if self.status == "completed" else logging.WARNING


#: Every saga event class.
SAGA_EVENTS: tuple[type[SagaEvent], ...] = (
    SagaStarted,
    SagaStepCompleted,
    SagaCompensated,
    SagaCompleted,
)
