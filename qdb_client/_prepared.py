"""Prepared statements: parsed once per node session, sent by id afterwards.

``stmt = await client.prepare(sql)`` asks a node to prepare the statement
and learns its parameters (how many, their names) and result columns;
``await stmt.query(params)`` / ``await stmt.execute(params)`` then check the
parameters before anything is sent, and go through the request pipeline like
any call (retries, breakers, deadlines, idempotency keys).

A statement id belongs to one connection's session, so the driver keeps one
id per connection: the first call on a connection sends the text with
``prepare: true`` and the node answers with the id along with the result (no
extra round trip); later calls there send the id. On another node, after a
reconnect, or when the node forgot it (``UNPREPARED``), the text goes again:
re-preparing is transparent, as in the Cassandra driver. docs/protocol.md
section 10.3 is the contract.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._arguments import Params, checkpointed, expect_rows
from .errors import InvalidArgument, ProtocolError
from .results import ExecuteResult, QueryResult
from .values import prepare_params

if TYPE_CHECKING:
    from ._transport import Connection

__all__ = ["PreparedStatement"]

#: Ids remembered per statement (connections come and go; a bounded map).
_MAX_IDS = 64


class PreparedStatement:
    """A statement prepared on the cluster; create it with ``await client.prepare(sql)``.

    ``sql`` is its text; ``params`` the number of its parameters; ``names``
    their names when it uses named (``:name``) parameters; ``columns`` its
    result columns (None for a statement without rows).
    """

    def __init__(
        self,
        client: Any,
        sql: str,
        *,
        params: int,
        names: Sequence[str],
        columns: Sequence[str] | None,
    ) -> None:
        self._client = client
        self.sql = sql
        self.params = params
        self.names: tuple[str, ...] = tuple(names)
        self.columns: tuple[str, ...] | None = tuple(columns) if columns is not None else None
        #: Statement id per connection serial.
        self._ids: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"PreparedStatement({self.sql!r:.60}, params={self.params})"

    @checkpointed
    async def query(self, params: Params = None, *, timeout: float | None = None) -> QueryResult:
        """Run the (read-only) statement with ``params``; its rows (see ``Client.query``)."""
        call = _PreparedCall(self, self._check(params))
        return await self._client._call(
            "query", call.args, timeout, read_only=True, parse=call.parse_query
        )

    @checkpointed
    async def execute(
        self,
        params: Params = None,
        *,
        timeout: float | None = None,
        idempotency_key: str | bool = True,
        expect_rows: int | None = None,
    ) -> ExecuteResult:
        """Run the statement with ``params``; its counts (see ``Client.execute``)."""
        call = _PreparedCall(self, self._check(params), expect=expect_rows)
        return await self._client._call(
            "execute", call.args, timeout, idempotency_key=idempotency_key, parse=call.parse_execute
        )

    def _check(self, params: Params) -> Any:
        wire = prepare_params(params)
        if not wire:
            wire = None  # an empty list or map: no parameters
        if self.names:
            if not isinstance(wire, dict) or set(wire) != set(self.names):
                raise InvalidArgument(
                    f"the statement takes named parameters {sorted(self.names)},"
                    f" not {sorted(wire) if isinstance(wire, dict) else 'positional ones'}"
                )
        else:
            count = 0 if wire is None else len(wire)
            if isinstance(wire, dict) or count != self.params:
                raise InvalidArgument(
                    f"the statement takes {self.params} positional parameter(s), not"
                    f" {'named ones' if isinstance(wire, dict) else count}"
                )
        return wire

    def _remember(self, connection: Connection, stmt_id: Any) -> None:
        if isinstance(stmt_id, int) and not isinstance(stmt_id, bool) and stmt_id > 0:
            if len(self._ids) >= _MAX_IDS:
                self._ids.pop(next(iter(self._ids)))
            self._ids[connection.serial] = stmt_id


class _PreparedCall:
    """One call of a prepared statement: its arguments depend on the connection
    the pipeline picks (an id there, or the text to prepare)."""

    __slots__ = ("_connection", "_expect", "_params", "_statement", "_tries")

    def __init__(self, statement: PreparedStatement, params: Any, expect: int | None = None):
        self._statement = statement
        self._params = params
        self._expect = expect_rows(expect) if expect is not None else None
        self._connection: Connection | None = None
        self._tries = 0

    def args(self, connection: Connection) -> dict[str, Any]:
        """The request's arguments on ``connection``."""
        self._tries += 1
        self._connection = connection
        statement = self._statement
        stmt_id = statement._ids.get(connection.serial)
        out: dict[str, Any]
        if stmt_id is not None and self._tries == 1:
            out = {"stmt": stmt_id}
        else:
            # New here, or an earlier try failed (UNPREPARED among others): send the text.
            statement._ids.pop(connection.serial, None)
            out = {"sql": statement.sql, "prepare": True}
        if self._params is not None:
            out["params"] = self._params
        if self._expect is not None:
            out["expect_rows"] = self._expect
        return out

    def _learn(self, result: Any) -> Any:
        if isinstance(result, Mapping) and "stmt" in result and self._connection is not None:
            self._statement._remember(self._connection, result["stmt"])
        return result

    def parse_query(self, result: Any) -> QueryResult:
        return QueryResult.from_wire(self._learn(result))

    def parse_execute(self, result: Any) -> ExecuteResult:
        return ExecuteResult.from_wire(self._learn(result))


def _names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(c, str) for c in value)


def from_prepare_reply(client: Any, sql: str, reply: Any) -> PreparedStatement:
    """The statement a ``prepare`` RESPONSE describes (ProtocolError if malformed)."""
    if not isinstance(reply, Mapping):
        raise ProtocolError("malformed prepare result from node: expected a map")
    params, names, columns = reply.get("params"), reply.get("names", []), reply.get("columns")
    if (
        isinstance(params, bool)
        or not isinstance(params, int)
        or not 0 <= params <= 32766
        or not isinstance(names, list)
        or not all(isinstance(n, str) and 0 < len(n) <= 256 for n in names)
        or len(names) not in (0, params)
        or len(set(names)) != len(names)
        or not (
            columns is None
            or (isinstance(columns, list) and all(isinstance(c, str) for c in columns))
        )
    ):
        raise ProtocolError("malformed prepare result from node")
    return PreparedStatement(client, sql, params=params, names=names, columns=columns)
