"""OpenTelemetry instrumentation: a span per attempt and metrics, from the client's events.

Optional (``pip install 'qdb_client[otel]'``, which brings
``opentelemetry-api``; configure an SDK as usual)::

    import qdb_client.otel

    async with qdb_client.open_client(hosts) as client:
        qdb_client.otel.instrument(client)       # global tracer/meter providers

:func:`instrument` adds a listener to ``client.events`` (the same events as
``open_client(listeners=...)``, :mod:`qdb_client.events`). Every attempt
becomes one CLIENT span, from ``RequestStarted`` to ``RequestSucceeded`` or
``RequestFailed``, named after the method (``query``, ``execute``,
``batch``) and carrying the database semantic conventions: ``db.system`` =
``"qdb"``, ``db.operation.name``, ``server.address``, ``server.port``, plus
``qdb.attempt``, ``qdb.request_id``, ``qdb.connection_id``; a failed
attempt sets ``error.type`` (the error class), ``qdb.outcome`` (its kind in
the outcome table) and ``qdb.retried``, with status ERROR. An attempt that
failed before it was sent (circuit open, no node) is a span of no duration.
Spans are children of the caller's current span (the listener runs in the
caller's task and context). A caller that cancels its own call leaves no
failure event: that attempt's span ends, with ``qdb.outcome`` =
``"cancelled"``, when the same task starts another attempt or goes away.

Events carry no SQL. With ``record_statement=True``, the statement text
(``db.query.text``) is recorded only for calls made inside
``with qdb_client.otel.statement(sql):``, the caller's cooperation, since
the driver never puts SQL into its events.

Metrics (meter ``qdb_client``): ``db.client.operation.duration`` (histogram,
seconds, per attempt, with ``error.type`` on failures),
``qdb.client.retries``, ``qdb.client.breaker.transitions`` (attribute
``qdb.breaker.state``), ``qdb.client.idempotent_replays``,
``qdb.saga.compensations`` and ``qdb.saga.completions`` (attribute
``qdb.saga.status``).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator
from typing import Any

import trio

from . import events as ev
from ._version import __version__

__all__ = ["DB_SYSTEM", "QdbInstrumentation", "instrument", "statement"]

#: ``db.system`` of every span and metric.
DB_SYSTEM = "qdb"

_statement: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "qdb_client_otel_statement", default=None
)


@contextlib.contextmanager
def statement(sql: str) -> Iterator[None]:
    """Calls made inside this block record ``sql`` as ``db.query.text`` (only
    when instrumented with ``record_statement=True``)."""
    token = _statement.set(sql)
    try:
        yield
    finally:
        _statement.reset(token)


def _api() -> tuple[Any, Any]:
    try:
        from opentelemetry import metrics, trace
    except ImportError as exc:
        raise ImportError(
            "qdb_client.otel needs opentelemetry-api: install the extra with"
            " pip install 'qdb_client[otel]'"
        ) from exc
    return trace, metrics


def _server(node: str) -> dict[str, Any]:
    host, sep, port = node.rpartition(":")
    if not sep or not port.isdigit():
        return {"server.address": node} if node else {}
    return {"server.address": host.strip("[]"), "server.port": int(port)}


class QdbInstrumentation:
    """The listener :func:`instrument` installs; callable with one event."""

    def __init__(
        self,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        record_statement: bool = False,
    ) -> None:
        trace, metrics = _api()
        self._trace = trace
        self.record_statement = record_statement
        self._tracer = trace.get_tracer("qdb_client", __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter("qdb_client", __version__, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "db.client.operation.duration", unit="s", description="Duration of each attempt."
        )
        self._retries = meter.create_counter("qdb.client.retries", description="Retries.")
        self._breaker = meter.create_counter(
            "qdb.client.breaker.transitions", description="Circuit breaker state changes."
        )
        self._replays = meter.create_counter(
            "qdb.client.idempotent_replays", description="Writes answered from a stored outcome."
        )
        self._compensations = meter.create_counter(
            "qdb.saga.compensations", description="Saga steps compensated."
        )
        self._sagas = meter.create_counter("qdb.saga.completions", description="Sagas ended.")
        # The open span of each task's current attempt, and its finalizer.
        self._open: weakref.WeakKeyDictionary[Any, tuple[Any, weakref.finalize]] = (
            weakref.WeakKeyDictionary()
        )
        self._client: Any = None

    def __call__(self, event: ev.Event) -> None:
        handler = _HANDLERS.get(type(event).__name__)
        if handler is not None:
            handler(self, event)

    def uninstrument(self) -> None:
        """Stop listening to the client this was installed on."""
        if self._client is not None:
            bus = self._client.events
            bus.listeners = tuple(listener for listener in bus.listeners if listener is not self)
            self._client = None

    # -------------------------------------------------------------- spans

    def _started(self, event: ev.RequestStarted) -> None:
        task = _task()
        self._abandon(task)
        attributes = self._attributes(event.method, event.node)
        attributes.update(
            {
                "qdb.attempt": event.attempt,
                "qdb.request_id": event.request_id,
                "qdb.connection_id": event.connection_id,
            }
        )
        sql = _statement.get()
        if self.record_statement and sql is not None:
            attributes["db.query.text"] = sql
        span = self._tracer.start_span(
            event.method, kind=self._trace.SpanKind.CLIENT, attributes=attributes
        )
        if task is not None:
            self._open[task] = (span, weakref.finalize(task, _end_cancelled, span))

    def _succeeded(self, event: ev.RequestSucceeded) -> None:
        span = self._take(_task())
        if span is not None:
            span.end()
        self._duration.record(event.duration, self._attributes(event.method, event.node))

    def _failed(self, event: ev.RequestFailed) -> None:
        span = self._take(_task())
        if span is None:  # the attempt never reached a node
            attributes = self._attributes(event.method, event.node)
            attributes["qdb.attempt"] = event.attempt
            span = self._tracer.start_span(
                event.method, kind=self._trace.SpanKind.CLIENT, attributes=attributes
            )
        error_type = event.error.split(":", 1)[0] or event.outcome
        span.set_attribute("error.type", error_type)
        span.set_attribute("qdb.outcome", event.outcome)
        span.set_attribute("qdb.retried", event.retried)
        span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, event.error))
        span.end()
        attributes = self._attributes(event.method, event.node)
        attributes["error.type"] = error_type
        self._duration.record(event.duration, attributes)

    def _take(self, task: Any) -> Any:
        entry = self._open.pop(task, None) if task is not None else None
        if entry is None:
            return None
        span, finalizer = entry
        finalizer.detach()
        return span

    def _abandon(self, task: Any) -> None:
        """End the span of an attempt of ``task`` that its caller cancelled."""
        span = self._take(task)
        if span is not None:
            _end_cancelled(span)

    def _attributes(self, method: str, node: str) -> dict[str, Any]:
        return {"db.system": DB_SYSTEM, "db.operation.name": method, **_server(node)}

    # ------------------------------------------------------------ metrics

    def _retry(self, event: ev.RetryScheduled) -> None:
        self._retries.add(1, {"db.system": DB_SYSTEM, "db.operation.name": event.method})

    def _breaker_moved(self, event: ev.BreakerStateChanged) -> None:
        self._breaker.add(1, {"db.system": DB_SYSTEM, "qdb.breaker.state": event.state})

    def _replay(self, event: ev.IdempotentReplay) -> None:
        self._replays.add(1, {"db.system": DB_SYSTEM, "db.operation.name": event.method})

    def _compensated(self, event: Any) -> None:
        self._compensations.add(1, {"qdb.saga.name": event.name})

    def _saga_ended(self, event: Any) -> None:
        self._sagas.add(1, {"qdb.saga.name": event.name, "qdb.saga.status": event.status})


_HANDLERS: dict[str, Any] = {
    "RequestStarted": QdbInstrumentation._started,
    "RequestSucceeded": QdbInstrumentation._succeeded,
    "RequestFailed": QdbInstrumentation._failed,
    "RetryScheduled": QdbInstrumentation._retry,
    "BreakerStateChanged": QdbInstrumentation._breaker_moved,
    "IdempotentReplay": QdbInstrumentation._replay,
    "SagaCompensated": QdbInstrumentation._compensated,
    "SagaCompleted": QdbInstrumentation._saga_ended,
}


def _task() -> Any:
    try:
        return trio.lowlevel.current_task()
    except RuntimeError:
        return None


def _end_cancelled(span: Any) -> None:
    if span.is_recording():
        span.set_attribute("qdb.outcome", "cancelled")
        span.end()


def instrument(
    client: Any,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    record_statement: bool = False,
) -> QdbInstrumentation:
    """Trace every attempt of ``client`` and record its metrics (providers default
    to OpenTelemetry's global ones); returns the listener
    (``.uninstrument()`` removes it)."""
    instrumentation = QdbInstrumentation(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        record_statement=record_statement,
    )
    bus = client.events
    bus.listeners = (*bus.listeners, instrumentation)
    instrumentation._client = client
    return instrumentation
