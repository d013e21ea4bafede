"""Call-site arguments of statements: SQL text, parameters, batches, row lists.

Checked before anything is sent (InvalidArgument naming what is wrong) and
put in their wire form; shared by the client and its transactions.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import trio

from .errors import InvalidArgument, QdbError
from .values import prepare_params

__all__ = [
    "Params",
    "Statement",
    "batch_args",
    "checkpointed",
    "chunks",
    "executemany_args",
    "expect_rows",
    "statement_args",
]

#: Statement parameters: positional (sequence) or named (mapping), or None.
Params = Sequence[Any] | Mapping[str, Any] | None
#: A batch entry: SQL text, ``(sql, params)`` or ``{"sql": ..., "params": ...}``.
Statement = str | tuple[str, Params] | Mapping[str, Any]

P = ParamSpec("P")
T = TypeVar("T")
#: The largest count the protocol carries (u64).
_U64_MAX = 2**64 - 1


def checkpointed(method: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Make every path of an async public method a trio checkpoint.

    Calls that fail argument checks would otherwise raise without ever
    yielding, which breaks the trio convention callers rely on.
    """

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except QdbError:
            await trio.lowlevel.checkpoint()
            raise

    return wrapper


def statement_args(sql: str, params: Params) -> dict[str, Any]:
    if not isinstance(sql, str):
        raise InvalidArgument(f"sql must be a string, not {type(sql).__name__}")
    args: dict[str, Any] = {"sql": sql}
    if params is not None:
        args["params"] = prepare_params(params)
    return args


def batch_args(statements: Iterable[Statement]) -> dict[str, Any]:
    if isinstance(statements, (str, bytes)) or not isinstance(statements, Iterable):
        raise InvalidArgument(
            "batch takes a list of statements (SQL text, (sql, params) or"
            f" {{'sql': ..., 'params': ...}}), not {type(statements).__name__}"
        )
    return {"statements": [_batch_entry(item) for item in statements]}


def executemany_args(sql: str, rows: Iterable[Params]) -> dict[str, Any]:
    if not isinstance(sql, str):
        raise InvalidArgument(f"sql must be a string, not {type(sql).__name__}")
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise InvalidArgument("executemany takes an iterable of parameter rows")
    prepared = []
    for index, row in enumerate(rows):
        try:
            prepared.append(prepare_params(row if row is not None else ()))
        except InvalidArgument as exc:
            raise InvalidArgument(f"row {index}: {exc}") from exc
    return {"sql": sql, "rows": prepared}


def chunks(args: dict[str, Any], fits: Callable[[dict[str, Any]], bool]) -> list[list[Any]]:
    """The rows of ``args`` cut into runs that each fit one frame."""
    rows = args["rows"]
    out: list[list[Any]] = []
    start = 0
    size = max(1, len(rows))
    while start < len(rows):
        size = min(size, len(rows) - start)
        while size > 1 and not fits({"sql": args["sql"], "rows": rows[start : start + size]}):
            size //= 2
        out.append(rows[start : start + size])
        start += size
    return out


def expect_rows(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise InvalidArgument(
            f"expect_rows must be an integer from 0 to 2**64-1, not {value!r:.40}"
        )
    return value


def _batch_entry(item: Statement) -> dict[str, Any]:
    if isinstance(item, str):
        return statement_args(item, None)
    if isinstance(item, tuple) and len(item) == 2:
        return statement_args(item[0], item[1])
    if isinstance(item, Mapping) and "sql" in item:
        return statement_args(item["sql"], item.get("params"))
    raise InvalidArgument(
        f"batch entries are SQL text, (sql, params) or {{'sql', 'params'}}, not {item!r:.80}"
    )
