"""The methods a test node answers: data methods and, in test mode, ``control.*``.

Data methods (``ping``, ``execute``, ``query``, ``batch``) pass through the
node's faults first: a matching ``fail_next`` rule is consumed when the
request arrives, the configured latency is slept (bounded by the request
deadline), then the rule's error is raised or the method runs; a
``drop_after_commit`` rule, checked once a method executed successfully,
makes the connection drop instead of replying. Control methods, and every
request of the control tool itself, are never subject to faults.

Writes carrying an idempotency key (REQUEST ``idem_key``) are executed at
most once per key (:mod:`.idempotency`); reads ignore the key.

Handlers see a :class:`MethodContext`, built by the connection: what they
use of the node and of the connection, and nothing else. This module knows
neither the node nor the connection classes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from ..protocol import ErrorCode, Request
from ._failure import RequestFailed
from .faults import Faults
from .idempotency import IdempotencyKey, KeyedOutcome, KeyedResult, check_key, request_hash
from .stats import NodeStatistics
from .storage import Params, Statement, Storage

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

_REQUIRED: Any = object()
_MIN_INT, _MAX_INT = -(2**63), 2**63 - 1


@attrs.frozen
class MethodContext:
    """What a method handler may use: the node's parts and the caller's identity.

    ``scope`` is the authenticated user ("" without credentials), which
    idempotency keys are stored under; ``is_control_client``: the caller is
    the control tool (exempt from faults, left out of the statistics).
    The callables are the node actions control methods need:
    ``drop_other_connections`` / ``count_other_connections`` spare the
    caller's own connection; ``start_shutdown(grace)``; ``statistics()``.
    ``max_frame`` is the largest frame the client accepts (its HELLO
    ``max_frame``): no result may be larger.
    """

    node_id: str
    storage: Storage
    faults: Faults
    stats: NodeStatistics
    test_mode: bool
    scope: str
    is_control_client: bool
    #: Who is calling (``host:port``), for log lines.
    peer: str
    drop_other_connections: Callable[[], int]
    count_other_connections: Callable[[], int]
    start_shutdown: Callable[[float], None]
    statistics: Callable[[], dict[str, Any]]
    max_frame: int | None = None


@attrs.frozen
class Outcome:
    """A method's result, and what to do once the RESPONSE has been written.

    ``replayed``: the result is a keyed write's stored one (nothing ran).
    ``drop_connection``: close the connection abruptly instead of replying.
    ``applied``: a write that took effect (executed and committed, or
    replayed), so an ERROR sent instead of its RESPONSE says ``executed``.
    """

    result: Any
    after_reply: Callable[[], None] | None = None
    replayed: bool = False
    drop_connection: bool = False
    applied: bool = False


@attrs.frozen
class Call:
    """One data request as its handler sees it.

    ``scope`` is the authenticated user ("" without credentials), which
    idempotency keys are stored under; ``counted`` is False for the control
    tool, whose traffic stays out of the statistics.
    """

    args: Mapping[str, Any]
    deadline: float
    idem_key: str | None = None
    scope: str = ""
    counted: bool = True


def is_control_method(method: str) -> bool:
    """Whether ``method`` is in the ``control.`` namespace."""
    return method.startswith("control.")


# ---------------------------------------------------------------- arguments


def _arg(
    args: Mapping[str, Any], key: str, types: type | tuple[type, ...], default: Any = _REQUIRED
):
    if key not in args or args[key] is None:
        if default is _REQUIRED:
            raise RequestFailed(ErrorCode.INVALID_REQUEST, f"missing argument {key!r}")
        return default
    value = args[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (
        isinstance(value, bool) and bool not in allowed and int in allowed
    ):
        names = " or ".join(t.__name__ for t in allowed)
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"argument {key!r} must be {names}, not {type(value).__name__}",
        )
    return value


def _non_negative(args: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = _arg(args, key, int, default)
    if value is not None and value < 0:
        raise RequestFailed(ErrorCode.INVALID_REQUEST, f"argument {key!r} must not be negative")
    return value


def _check_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return value
    if isinstance(value, int):
        if not _MIN_INT <= value <= _MAX_INT:
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST, f"{where}: integer {value} does not fit in 64 bits"
            )
        return value
    raise RequestFailed(
        ErrorCode.INVALID_REQUEST,
        f"{where}: a {type(value).__name__} can't be bound"
        " (use null, bool, int, float, text or bytes)",
    )


def _sql_args(args: Mapping[str, Any], index: int | None = None) -> Statement:
    where = "" if index is None else f"statement {index}: "
    try:
        sql = args.get("sql")
        if not isinstance(sql, str) or not sql.strip():
            raise RequestFailed(ErrorCode.INVALID_REQUEST, f"{where}'sql' must be non-empty text")
        raw = args.get("params")
        params: Params
        if raw is None or (isinstance(raw, (list, dict)) and not raw):
            params = ()  # absent, null and empty params are the same request (8.5)
        elif isinstance(raw, list):
            params = tuple(_check_value(v, f"{where}parameter {i}") for i, v in enumerate(raw))
        elif isinstance(raw, dict):
            if not all(isinstance(k, str) for k in raw):
                raise RequestFailed(
                    ErrorCode.INVALID_REQUEST, f"{where}parameter names must be text"
                )
            params = {k: _check_value(v, f"{where}parameter {k!r}") for k, v in raw.items()}
        else:
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST, f"{where}'params' must be a list or a map"
            )
    except RequestFailed as exc:
        if index is not None:
            exc.details["statement_index"] = index
        raise
    return sql, params


# ------------------------------------------------------------- data methods

DataHandler = Callable[[MethodContext, Call], Awaitable[Outcome]]


async def _ping(ctx: MethodContext, call: Call) -> Outcome:
    return Outcome({"node_id": ctx.node_id})


async def _execute(ctx: MethodContext, call: Call) -> Outcome:
    key = None if call.idem_key is None else check_key(call.idem_key)
    sql, params = _sql_args(call.args)
    deadline, limit = call.deadline, ctx.max_frame
    if key is None:
        result = await ctx.storage.execute(sql, params, deadline=deadline, result_limit=limit)
        return Outcome(result, applied=True)
    idem = IdempotencyKey(key, request_hash("execute", [sql, params]), call.scope)
    keyed = await ctx.storage.execute_keyed(
        sql, params, idem, deadline=deadline, result_limit=limit
    )
    return _keyed_outcome(ctx, call, keyed)


async def _query(ctx: MethodContext, call: Call) -> Outcome:
    sql, params = _sql_args(call.args)  # a read: any idem_key is ignored
    result = await ctx.storage.query(
        sql, params, deadline=call.deadline, result_limit=ctx.max_frame
    )
    return Outcome(result)


async def _batch(ctx: MethodContext, call: Call) -> Outcome:
    key = None if call.idem_key is None else check_key(call.idem_key)
    raw = _arg(call.args, "statements", list)
    statements = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"statement {index} must be a map with 'sql' and 'params'",
                details={"statement_index": index},
            )
        statements.append(_sql_args(item, index))
    deadline, limit = call.deadline, ctx.max_frame
    if key is None:
        result = await ctx.storage.batch(statements, deadline=deadline, result_limit=limit)
        return Outcome(result, applied=True)
    idem = IdempotencyKey(key, request_hash("batch", statements), call.scope)
    keyed = await ctx.storage.batch_keyed(statements, idem, deadline=deadline, result_limit=limit)
    return _keyed_outcome(ctx, call, keyed)


def _keyed_outcome(ctx: MethodContext, call: Call, keyed: KeyedResult) -> Outcome:
    stats = ctx.stats
    if keyed.outcome is KeyedOutcome.STORED:
        if call.counted:
            stats.idempotent_stored += 1
        return Outcome(keyed.result, applied=True)
    if keyed.outcome is KeyedOutcome.REPLAYED:
        if call.counted:
            stats.idempotent_hits += 1
        logger.debug("%s: replayed the stored result of key %r", ctx.node_id, call.idem_key)
        return Outcome(keyed.result, replayed=True, applied=True)
    if call.counted:
        stats.idempotent_conflicts += 1
    raise RequestFailed(ErrorCode.CONFLICT, "idempotency key reused for a different request")


#: Method name -> handler, for methods every node answers.
DATA_METHODS: dict[str, DataHandler] = {
    "ping": _ping,
    "execute": _execute,
    "query": _query,
    "batch": _batch,
}


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
