"""Method arguments as a test node checks them: types, counts, statements and parameters.

Every check raises :class:`~._failure.RequestFailed` INVALID_REQUEST naming
what is wrong, before anything is executed. Parameters are checked one by
one (:func:`~.typed.bind_value`): a refused one is named in
``details.parameter`` (its index, or its name for named parameters), with
``details.statement_index`` in a batch and ``details.row_index`` in an
``executemany``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..protocol import ErrorCode
from ._failure import RequestFailed
from .storage import Params, Statement
from .typed import BadValue, bind_value

__all__ = [
    "MAX_U64",
    "REQUIRED",
    "arg",
    "expect_rows_arg",
    "non_negative",
    "params_arg",
    "rows_arg",
    "sql_args",
    "statements_arg",
]

REQUIRED: Any = object()
#: The largest count the protocol carries.
MAX_U64 = 2**64 - 1


def arg(
    args: Mapping[str, Any], key: str, types: type | tuple[type, ...], default: Any = REQUIRED
) -> Any:
    """``args[key]`` if it has one of ``types`` (bool is no int); ``default`` when
    absent or null; INVALID_REQUEST otherwise (or when required and absent)."""
    if key not in args or args[key] is None:
        if default is REQUIRED:
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


def non_negative(args: Mapping[str, Any], key: str, default: Any = REQUIRED) -> Any:
    """An integer argument within 0 .. 2**64-1 (a ``uint``)."""
    value = arg(args, key, int, default)
    if value is not None and not 0 <= value <= MAX_U64:
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST, f"argument {key!r} must be an integer from 0 to 2**64-1"
        )
    return value


def expect_rows_arg(args: Mapping[str, Any], where: str = "") -> int | None:
    """The optional ``expect_rows`` (a uint) of a statement."""
    if "expect_rows" not in args:
        return None
    try:
        return non_negative(args, "expect_rows", None)
    except RequestFailed as exc:
        exc.message = f"{where}{exc.message}"
        raise


def _bound(value: Any, where: str, name: int | str, details: dict[str, Any]) -> Any:
    try:
        return bind_value(value)
    except BadValue as exc:
        shown = f"parameter {name!r}" if isinstance(name, str) else f"parameter {name}"
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST,
            f"{where}{shown}: {exc}",
            details={**details, "parameter": name},
        ) from None


def params_arg(raw: Any, where: str = "", details: dict[str, Any] | None = None) -> Params:
    """Statement parameters as the node binds them: () for none (absent, null,
    ``[]`` and ``{}`` are the same request), a tuple (positional) or a dict (named)."""
    context = details or {}
    if raw is None or (isinstance(raw, (list, dict)) and not raw):
        return ()
    if isinstance(raw, list):
        return tuple(_bound(v, where, i, context) for i, v in enumerate(raw))
    if isinstance(raw, dict):
        if not all(isinstance(k, str) for k in raw):
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST, f"{where}parameter names must be text", details=context
            )
        return {k: _bound(v, where, k, context) for k, v in raw.items()}
    raise RequestFailed(
        ErrorCode.INVALID_REQUEST, f"{where}'params' must be a list or a map", details=context
    )


def sql_args(args: Mapping[str, Any], index: int | None = None) -> Statement:
    """``(sql, params)`` of one statement (of a batch when ``index`` is given)."""
    where = "" if index is None else f"statement {index}: "
    details = {} if index is None else {"statement_index": index}
    sql = args.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise RequestFailed(
            ErrorCode.INVALID_REQUEST, f"{where}'sql' must be non-empty text", details=details
        )
    return sql, params_arg(args.get("params"), where, details)


def statements_arg(args: Mapping[str, Any]) -> tuple[list[Statement], list[int | None] | None]:
    """A batch's statements, and their expected row counts (None when none has one)."""
    raw = arg(args, "statements", list)
    statements: list[Statement] = []
    expects: list[int | None] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"statement {index} must be a map with 'sql' and 'params'",
                details={"statement_index": index},
            )
        statements.append(sql_args(item, index))
        try:
            expects.append(expect_rows_arg(item, f"statement {index}: "))
        except RequestFailed as exc:
            exc.details["statement_index"] = index
            raise
    return statements, (expects if any(e is not None for e in expects) else None)


def rows_arg(args: Mapping[str, Any]) -> list[Params]:
    """An ``executemany``'s parameter rows, each checked like ``params``."""
    raw = arg(args, "rows", list)
    rows: list[Params] = []
    for index, row in enumerate(raw):
        if row is not None and not isinstance(row, (list, dict)):
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"row {index}: parameters must be a list or a map",
                details={"row_index": index},
            )
        rows.append(params_arg(row, f"row {index}: ", {"row_index": index}))
    return rows
