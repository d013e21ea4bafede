"""What streams and subscriptions hand to the application: pages of rows, change events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, overload

import attrs

from ..results import Row

__all__ = ["CHANGE_KINDS", "ChangeEvent", "PageIterator", "ResultPage"]

#: The kinds of change a subscription reports.
CHANGE_KINDS = frozenset({"insert", "update", "delete"})


class ResultPage(Sequence[Row]):
    """One page of a result stream (``async for page in rows.pages()``).

    A sequence of :class:`~qdb_client.Row` (``page.rows``); ``seq`` is its page
    number from 0 (the node's numbering, kept across resumes). The rows of a
    page that ``async for row in rows`` had begun are the rest of that page,
    with its ``seq``.
    """

    __slots__ = ("rows", "seq")

    def __init__(self, seq: int, rows: list[Row]) -> None:
        self.seq = seq
        self.rows = rows

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
        return f"ResultPage(seq={self.seq}, rows={len(self.rows)})"


class PageIterator:
    """``async for page in stream.pages()`` (a class, not a bare async generator)."""

    def __init__(self, next_page: Callable[[], Awaitable[ResultPage | None]]) -> None:
        self._next_page = next_page

    def __aiter__(self) -> PageIterator:
        return self

    async def __anext__(self) -> ResultPage:
        page = await self._next_page()
        if page is None:
            raise StopAsyncIteration
        return page


@attrs.frozen
class ChangeEvent:
    """One committed change of a subscribed table (``async for event in events``).

    ``kind`` is ``"insert"``, ``"update"`` or ``"delete"``; ``key`` the row's
    rowid; ``row`` the new row (insert, update) or the old one (delete), as
    ``{column: value}``, each value of the Python type a query of the column
    returns (docs/types.md); ``event_id`` its position in the cluster's change log:
    strictly increasing, in commit order, the same on every node.
    """

    kind: str
    table: str
    key: int
    row: Mapping[str, Any]
    event_id: int

    def __getitem__(self, column: str) -> Any:
        """``event["name"]`` is ``event.row["name"]``."""
        return self.row[column]


def rows_of(values: Sequence[Sequence[Any]], columns: Any) -> list[Row]:
    """Rows sharing one column index (``columns`` is a ``results._Columns``)."""
    return [Row(row, columns) for row in values]
