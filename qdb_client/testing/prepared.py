"""Prepared statements of one session (docs/protocol.md section 10.3).

A session (one client connection) keeps the statements it prepared under
ids it issued (1, 2, 3...), at most ``max_prepared`` of them: preparing one
more drops the least recently used. Preparing a text the session already
holds returns its id again. An id the session does not know (never issued,
unprepared, or dropped) is UNPREPARED, and the client sends the text again.

A statement is kept with what its preparation found: the number of its
parameters and, when every one is named (``:name``, ``@name``, ``$name``),
their names as a client gives them (without the sigil). A call by id is
checked against them (INVALID_REQUEST before anything runs); SQLite checks
a call by text.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..protocol import ErrorCode
from ._failure import RequestFailed

__all__ = ["DEFAULT_MAX_PREPARED", "PreparedStatement", "PreparedStatements"]

#: Statements a session keeps unless the node is configured otherwise.
DEFAULT_MAX_PREPARED = 256


@attrs.frozen
class PreparedStatement:
    """One statement of a session: its ``id``, text, parameter count and names
    (empty for positional parameters), and result columns (None: no rows)."""

    id: int
    sql: str
    params: int
    names: tuple[str, ...] = ()
    columns: tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        """The ``prepare`` result for this statement."""
        return {
            "stmt": self.id,
            "params": self.params,
            "names": list(self.names),
            "columns": list(self.columns) if self.columns is not None else None,
        }

    def check(self, params: Sequence[Any] | Mapping[str, Any]) -> None:
        """INVALID_REQUEST unless ``params`` (as bound) fit this statement."""
        if self.names:
            if not isinstance(params, Mapping) or set(params) != set(self.names):
                given = sorted(params) if isinstance(params, Mapping) else "positional ones"
                raise RequestFailed(
                    ErrorCode.INVALID_REQUEST,
                    f"statement {self.id} takes named parameters {sorted(self.names)}, not {given}",
                    details={"stmt": self.id},
                )
            return
        count = len(params)
        if (isinstance(params, Mapping) and params) or count != self.params:
            shown = "named ones" if isinstance(params, Mapping) and params else count
            raise RequestFailed(
                ErrorCode.INVALID_REQUEST,
                f"statement {self.id} takes {self.params} positional parameter(s), not {shown}",
                details={"stmt": self.id},
            )


class PreparedStatements:
    """The prepared statements of one session, least recently used first."""

    def __init__(self, limit: int = DEFAULT_MAX_PREPARED) -> None:
        self.limit = limit
        self._by_id: collections.OrderedDict[int, PreparedStatement] = collections.OrderedDict()
        self._by_sql: dict[str, int] = {}
        self._next_id = 1
        #: Statements dropped to stay within :attr:`limit`.
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def add(
        self,
        sql: str,
        params: int,
        names: Sequence[str] = (),
        columns: Sequence[str] | None = None,
    ) -> PreparedStatement:
        """Keep ``sql`` (or refresh it if kept already) and return it with its id."""
        known = self._by_sql.get(sql)
        if known is not None:
            self._by_id.move_to_end(known)
            return self._by_id[known]
        kept = tuple(columns) if columns is not None else None
        statement = PreparedStatement(self._next_id, sql, params, tuple(names), kept)
        self._next_id += 1
        self._by_id[statement.id] = statement
        self._by_sql[sql] = statement.id
        while len(self._by_id) > self.limit:
            _, dropped = self._by_id.popitem(last=False)
            del self._by_sql[dropped.sql]
            self.evicted += 1
        return statement

    def get(self, stmt_id: int) -> PreparedStatement:
        """The statement ``stmt_id`` (now the most recently used); UNPREPARED if unknown."""
        statement = self._by_id.get(stmt_id)
        if statement is None:
            raise RequestFailed(
                ErrorCode.UNPREPARED,
                f"statement {stmt_id} is not prepared in this session: send its text again",
                details={"stmt": stmt_id},
            )
        self._by_id.move_to_end(stmt_id)
        return statement

    def remove(self, stmt_id: int) -> bool:
        """Forget ``stmt_id``; False if it was not known."""
        statement = self._by_id.pop(stmt_id, None)
        if statement is None:
            return False
        del self._by_sql[statement.sql]
        return True
