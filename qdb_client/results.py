"""Results of statements: rows of a query, counts of an execute."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import attrs

from .errors import ProtocolError

__all__ = ["ExecuteResult", "QueryResult", "Row"]


class Row(Sequence[Any]):
    """One row: index by position (``row[0]``) or by column name (``row["name"]``).

    Compares equal to another Row or to a tuple/list with the same values.
    """

    __slots__ = ("_index", "_values")

    def __init__(self, values: tuple[Any, ...], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    @overload
    def __getitem__(self, key: int | str) -> Any: ...

    @overload
    def __getitem__(self, key: slice) -> tuple[Any, ...]: ...

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key]]
            except KeyError:
                raise KeyError(f"no column {key!r}; columns are {list(self._index)}") from None
        return self._values[key]

    def __len__(self) -> int:
        return len(self._values)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Row):
            return self._values == other._values
        if isinstance(other, (tuple, list)):
            return self._values == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={value!r}" for name, value in zip(self._index, self._values, strict=True)
        )
        return f"Row({fields})"

    def keys(self) -> list[str]:
        """The column names, in order."""
        return list(self._index)

    def as_dict(self) -> dict[str, Any]:
        """The row as ``{column: value}``."""
        return dict(zip(self._index, self._values, strict=True))


class QueryResult(Sequence[Row]):
    """Rows returned by :meth:`Client.query`, with their ``columns``."""

    __slots__ = ("columns", "rows")

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.columns: tuple[str, ...] = tuple(columns)
        index = {name: i for i, name in enumerate(self.columns)}
        self.rows: list[Row] = [Row(tuple(values), index) for values in rows]

    @classmethod
    def from_wire(cls, result: Any) -> QueryResult:
        """Build from a ``query`` RESPONSE result, checking its shape."""
        if not (
            isinstance(result, dict)
            and isinstance(result.get("columns"), list)
            and all(isinstance(name, str) for name in result["columns"])
            and isinstance(result.get("rows"), list)
            and all(
                isinstance(row, list) and len(row) == len(result["columns"])
                for row in result["rows"]
            )
        ):
            raise ProtocolError(f"malformed query result from node: {_preview(result)}")
        return cls(result["columns"], result["rows"])

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...

    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        return self.rows[index]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"QueryResult(columns={list(self.columns)}, rows={len(self.rows)})"

    def scalar(self) -> Any:
        """The first column of the first row (None when there are no rows)."""
        return self.rows[0][0] if self.rows else None


@attrs.frozen
class ExecuteResult:
    """Outcome of one statement run by :meth:`Client.execute` or in a batch."""

    rows_affected: int
    last_insert_id: int | None

    @classmethod
    def from_wire(cls, result: Any) -> ExecuteResult:
        """Build from an ``execute`` RESPONSE result, checking its shape."""
        if not (
            isinstance(result, dict)
            and isinstance(result.get("rows_affected"), int)
            and (
                result.get("last_insert_id") is None
                or isinstance(result.get("last_insert_id"), int)
            )
        ):
            raise ProtocolError(f"malformed execute result from node: {_preview(result)}")
        return cls(result["rows_affected"], result.get("last_insert_id"))


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
