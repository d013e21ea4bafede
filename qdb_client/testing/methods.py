"""The methods a test node answers: data methods and, in test mode, ``control.*``.

Data methods (:mod:`.handlers`: ``ping``, ``execute``, ``query``, ``batch``,
``executemany``, ``begin``, ``commit``, ``rollback``, ``prepare``,
``unprepare``) pass through the node's faults first: a matching
``fail_next`` rule is consumed when the request arrives, the configured
latency is slept (bounded by the request deadline), then the rule's error is
raised or the method runs; a ``drop_after_commit`` rule, checked once a
method executed successfully, makes the connection drop instead of replying.
Control methods, and every request of the control tool itself, are never
subject to faults.

Handlers see a :class:`~.context.MethodContext`, built by the connection:
what they use of the node and of the connection, and nothing else. This
module knows neither the node nor the connection classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from ..protocol import ErrorCode, Request
from ._failure import RequestFailed
from .arguments import arg as _arg
from .arguments import non_negative as _non_negative
from .arguments import sql_args as _sql_args
from .context import Call, MethodContext, Outcome
from .handlers import DATA_METHODS

__all__ = [
    "CONTROL_METHODS",
    "DATA_METHODS",
    "Call",
    "MethodContext",
    "Outcome",
    "is_control_method",
    "run_method",
]

logger = logging.getLogger("qdb_client.testing")

#: ``(sql, params)`` of one statement's arguments (kept here for its users).
sql_args = _sql_args


def is_control_method(method: str) -> bool:
    """Whether ``method`` is in the ``control.`` namespace."""
    return method.startswith("control.")


# ---------------------------------------------------------- control methods

ControlHandler = Callable[[MethodContext, Mapping[str, Any]], Outcome]


def _faults_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:
        raise RequestFailed(ErrorCode.INVALID_REQUEST, str(exc)) from exc


def _fail_next(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    methods = _arg(args, "methods", list, None)
    _faults_call(
        ctx.faults.fail_next,
        _non_negative(args, "count"),
        _arg(args, "code", (str, int), "UNAVAILABLE"),
        message=_arg(args, "message", str, None),
        methods=methods,
        retry_after_ms=_non_negative(args, "retry_after_ms", None),
    )
    return Outcome(ctx.faults.describe())


def _drop_after_commit(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    _faults_call(
        ctx.faults.drop_after_commit,
        _non_negative(args, "count"),
        methods=_arg(args, "methods", list, None),
    )
    return Outcome(ctx.faults.describe())


def _add_latency(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    method = _arg(args, "method", str)
    _faults_call(ctx.faults.add_latency, method, _non_negative(args, "ms") / 1000)
    return Outcome(ctx.faults.describe())


def _stop_pings(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    ctx.faults.stop_pings(_arg(args, "enabled", bool, True))
    return Outcome(ctx.faults.describe())


def _drop_connections(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    count = ctx.count_other_connections()
    return Outcome({"dropped": count}, after_reply=ctx.drop_other_connections)


def _refuse_connections(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    enabled = _arg(args, "enabled", bool, True)
    try:
        ctx.faults.refuse_connections(enabled)
    except OSError as exc:
        raise RequestFailed(ErrorCode.INTERNAL, f"cannot listen again: {exc}") from exc
    return Outcome(ctx.faults.describe())


def _stats(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    return Outcome(ctx.statistics())


def _reset(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    try:
        ctx.faults.reset()
    except OSError as exc:
        raise RequestFailed(ErrorCode.INTERNAL, f"cannot listen again: {exc}") from exc
    return Outcome(ctx.faults.describe())


def _shutdown(ctx: MethodContext, args: Mapping[str, Any]) -> Outcome:
    grace = _non_negative(args, "grace_ms", 5000) / 1000
    return Outcome({"shutting_down": True}, after_reply=lambda: ctx.start_shutdown(grace))


#: Method name -> handler, for methods answered only in test mode.
CONTROL_METHODS: dict[str, ControlHandler] = {
    "control.fail_next": _fail_next,
    "control.drop_after_commit": _drop_after_commit,
    "control.add_latency": _add_latency,
    "control.stop_pings": _stop_pings,
    "control.drop_connections": _drop_connections,
    "control.refuse_connections": _refuse_connections,
    "control.stats": _stats,
    "control.reset": _reset,
    "control.shutdown": _shutdown,
}


# ----------------------------------------------------------------- dispatch


async def run_method(ctx: MethodContext, request: Request, deadline: float) -> Outcome | None:
    """Run ``request`` and return its outcome.

    None means the node plays dead (``ping`` while pings are stopped): the
    caller sends no reply at all and holds the request until ``deadline``.
    Raises :class:`RequestFailed` for every structured error.
    """
    method = request.method
    args = request.args
    if ctx.test_mode and method in CONTROL_METHODS:
        await trio.lowlevel.checkpoint()
        return CONTROL_METHODS[method](ctx, args)
    handler = DATA_METHODS.get(method)
    if handler is None:
        logger.warning(
            "%s: unknown method %r (request %d from %s)",
            ctx.node_id,
            method,
            request.request_id,
            ctx.peer,
        )
        raise RequestFailed(
            ErrorCode.METHOD_NOT_FOUND, f"no method named {method!r}", details={"method": method}
        )
    call = Call(
        args,
        deadline,
        idem_key=request.idempotency_key,
        scope=ctx.scope,
        counted=not ctx.is_control_client,
        request_id=request.request_id,
    )
    if ctx.is_control_client:  # the control tool neither sees nor consumes faults
        return await handler(ctx, call)
    faults = ctx.faults
    failure = faults.take_failure(method)
    delay = faults.latency_for(method)
    if delay:
        with trio.move_on_at(deadline) as waited:
            await trio.sleep(delay)
        if waited.cancelled_caught:
            raise RequestFailed(
                ErrorCode.TIMEOUT,
                "request deadline passed during injected latency; it was not executed",
                details={"executed": False},
            )
    if failure is not None:
        raise failure
    if method == "ping" and faults.pings_stopped:
        return None  # a hung node: never answer
    outcome = await handler(ctx, call)
    if not outcome.replayed and faults.take_drop_after_commit(method):
        return attrs.evolve(outcome, drop_connection=True)
    return outcome
