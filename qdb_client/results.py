"""Results of statements: rows of a query, counts (and returned rows) of an execute.

Results are built from what a node sent, so every shape is checked: a
malformed result is a :class:`~qdb_client.errors.ProtocolError`, whatever
the node sent (and the message describing it is short, whatever its size).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeGuard, overload

import attrs

from ._preview import preview as _preview
from .errors import InvalidArgument, ProtocolError, UnexpectedRowCount

__all__ = ["ExecuteResult", "QueryResult", "Row"]

#: ``rows_affected`` is a u64 count (docs/protocol.md section 10).
_MAX_COUNT = 2**64 - 1
#: ``last_insert_id`` is an SQL integer: signed 64-bit.
_MIN_ID, _MAX_ID = -(2**63), 2**63 - 1


class _Columns:
    """Column names of a result and the position of each name's first column.

    Shared by every row of one result.
    """

    __slots__ = ("index", "names", "untyped")

    def __init__(self, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(names)
        self.index: dict[str, int] = {}
        for position, name in enumerate(self.names):
            self.index.setdefault(name, position)  # a duplicated name: its first column
        #: The ``types`` of a result that reports none: None for each column.
        self.untyped: tuple[None, ...] = (None,) * len(self.names)

    @staticmethod
    def cached(names: list[Any]) -> _Columns | None:
        """The shared columns already made for ``names`` (names once checked to be
        text), or None: not seen, too big to keep, or not even hashable."""
        try:
            return _SHARED_COLUMNS.get(tuple(names))
        except Exception:  # a name that can't be hashed (a list, a tag around one): not columns
            return None

    @classmethod
    def shared(cls, names: list[str]) -> _Columns:
        """The columns of a result from a node: results of the same statement share
        one. Only small shapes are kept (at most 64 names, 4096 characters, 512
        shapes; when full the cache starts again), so a cached shape never holds
        much memory after its results are gone."""
        if len(names) > _MAX_SHARED_NAMES or sum(map(len, names)) > _MAX_SHARED_CHARS:
            return cls(names)
        key = tuple(names)
        columns = _SHARED_COLUMNS.get(key)
        if columns is None:
            if len(_SHARED_COLUMNS) >= _MAX_SHARED_COLUMNS:
                _SHARED_COLUMNS.clear()
            columns = _SHARED_COLUMNS[key] = cls(key)
        return columns


_SHARED_COLUMNS: dict[tuple[str, ...], _Columns] = {}
_MAX_SHARED_COLUMNS = 512
_MAX_SHARED_NAMES = 64
_MAX_SHARED_CHARS = 4096

#: ``types`` of results already checked (as for the columns: small shapes only).
_CHECKED_TYPES: dict[tuple[str | None, ...], tuple[str | None, ...]] = {}


def _remember_types(types: tuple[str | None, ...]) -> None:
    """Keep checked ``types`` (of columns that are kept) so the next result skips the check."""
    if len(_CHECKED_TYPES) >= _MAX_SHARED_COLUMNS:
        _CHECKED_TYPES.clear()
    _CHECKED_TYPES[types] = types


def _cached_types(types: Any, columns: list[Any]) -> tuple[str | None, ...] | None:
    """The checked tuple for ``types`` if the same were checked before and they
    fit ``columns``, else None."""
    if type(types) is not list or len(types) != len(columns):
        return None
    try:
        return _CHECKED_TYPES.get(tuple(types))
    except Exception:  # unhashable (cbor2's tags raise RuntimeError): not types anyway
        return None


class Row(Sequence[Any]):
    """One row: index by position (``row[0]``) or by column name (``row["name"]``).

    Compares equal to another Row or to a tuple/list with the same values.

    A result may name two columns alike (``SELECT 1 AS a, 2 AS a``): every
    column is still there by position, ``row["a"]`` is the first column
    named ``a``, :meth:`keys` lists every name in order (duplicates
    included), :meth:`as_dict` keeps the first value of a duplicated name,
    and ``repr`` shows every column.
    """

    __slots__ = ("_columns", "_values")

    def __init__(
        self, values: Iterable[Any], columns: Iterable[str] | Mapping[str, int] | _Columns
    ) -> None:
        self._values: tuple[Any, ...] = tuple(values)
        if isinstance(columns, _Columns):
            self._columns = columns
        elif isinstance(columns, Mapping):
            # The older form: a name -> position index.
            ordered = sorted(columns.items(), key=lambda item: item[1])
            self._columns = _Columns(name for name, _ in ordered)
        else:
            self._columns = _Columns(columns)

    @overload
    def __getitem__(self, key: int | str) -> Any: ...

    @overload
    def __getitem__(self, key: slice) -> tuple[Any, ...]: ...

    def __getitem__(self, key: int | str | slice) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._columns.index[key]]
            except (KeyError, IndexError):
                raise KeyError(
                    f"no column {_preview(key, 80)}; columns are"
                    f" {_preview(list(self._columns.names))}"
                ) from None
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
        names = self._columns.names
        fields = [
            f"{names[i][:80] if i < len(names) else i}={_preview(value)}"
            for i, value in enumerate(self._values)
        ]
        return f"Row({', '.join(fields)})"

    def keys(self) -> list[str]:
        """Every column name, in order (a duplicated name appears each time)."""
        return list(self._columns.names)

    def as_dict(self) -> dict[str, Any]:
        """The row as ``{column: value}``; a duplicated name keeps its first column's value."""
        values = self._values
        return {name: values[i] for name, i in self._columns.index.items() if i < len(values)}


def _check_rows(result: Mapping[str, Any], what: str) -> tuple[list[str], list[list[Any]]]:
    """``columns`` (a list of text) and ``rows`` (lists of that length) of a result."""
    columns = result.get("columns")
    rows = result.get("rows")
    if not (isinstance(columns, list) and all(isinstance(name, str) for name in columns)):
        raise ProtocolError(
            f"malformed {what} result from node: 'columns' must be a list of text,"
            f" got {_preview(columns)}"
        )
    if not isinstance(rows, list):
        raise ProtocolError(
            f"malformed {what} result from node: 'rows' must be a list, got {_preview(rows)}"
        )
    width = len(columns)
    for number, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == width):
            raise ProtocolError(
                f"malformed {what} result from node: row {number} must be a list of one"
                f" value per column ({width}), got {_preview(row)}"
            )
    return columns, rows


class QueryResult(Sequence[Row]):
    """Rows returned by :meth:`Client.query`, with their ``columns``.

    ``columns`` lists every column name in order, duplicates included (see
    :class:`Row`); ``types`` the declared type of each column (its first word
    in upper case, e.g. ``"TIMESTAMP"``), or None where the node can't say
    (an expression, or a node that does not report types).
    """

    __slots__ = ("columns", "rows", "types")

    def __init__(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        types: Sequence[str | None] | None = None,
    ) -> None:
        shared = _Columns(columns)
        self.columns: tuple[str, ...] = shared.names
        self.rows: list[Row] = [Row(values, shared) for values in rows]
        self.types: tuple[str | None, ...] = (
            tuple(types) if types is not None else (None,) * len(self.columns)
        )

    @classmethod
    def from_wire(cls, result: Any) -> QueryResult:
        """Build from a ``query`` RESPONSE result, checking its shape (else ProtocolError)."""
        if type(result) is dict:
            # The common reply: columns and types seen before (so already checked),
            # rows of the right width.
            columns = result.get("columns")
            rows = result.get("rows")
            if type(columns) is list and type(rows) is list:
                shared = _Columns.cached(columns)
                if shared is not None:
                    types = result.get("types")
                    kinds = shared.untyped if types is None else _cached_types(types, columns)
                    if kinds is not None:
                        built = _checked_rows(rows, len(columns), shared)
                        if built is not None:
                            made = cls.__new__(cls)
                            made.columns = shared.names
                            made.rows = built
                            made.types = kinds
                            return made
        return cls._from_wire_checked(result)

    @classmethod
    def _from_wire_checked(cls, result: Any) -> QueryResult:
        """:meth:`from_wire` checking every part (and raising for a bad one)."""
        if not isinstance(result, dict):
            raise ProtocolError(
                f"malformed query result from node: expected a map, got {_preview(result)}"
            )
        columns, rows = _check_rows(result, "query")
        types = result.get("types")
        if types is not None and not (
            isinstance(types, list)
            and len(types) == len(columns)
            and all(t is None or (isinstance(t, str) and len(t) <= 64) for t in types)
        ):
            raise ProtocolError(f"malformed query result from node: bad types {_preview(types)}")
        result = cls.__new__(cls)
        shared = _Columns.shared(columns)
        result.columns = shared.names
        result.rows = _rows(rows, shared)
        result.types = tuple(types) if types is not None else shared.untyped
        if types is not None and shared is _Columns.cached(columns):
            _remember_types(result.types)
        return result

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
        return f"QueryResult(columns={_preview(list(self.columns))}, rows={len(self.rows)})"

    def scalar(self) -> Any:
        """The first column of the first row (None when there are no rows)."""
        return self.rows[0][0] if self.rows else None

    def first(self) -> Row | None:
        """The first row, or None when there are no rows."""
        return self.rows[0] if self.rows else None

    def one(self) -> Row:
        """The only row; :class:`~qdb_client.errors.UnexpectedRowCount` unless
        there is exactly one."""
        if len(self.rows) != 1:
            raise UnexpectedRowCount(
                f"expected exactly one row, got {len(self.rows)}", count=len(self.rows)
            )
        return self.rows[0]

    def as_dicts(self) -> list[dict[str, Any]]:
        """Every row as ``{column: value}`` (a duplicated name keeps its first value)."""
        return [row.as_dict() for row in self.rows]


def _checked_rows(rows: list[Any], width: int, columns: _Columns) -> list[Row] | None:
    """:func:`_rows` checking each row (a list of ``width`` values) as it goes;
    None at the first that is not (the caller then checks it all again, to say why)."""
    new = Row.__new__
    out = []
    for values in rows:
        if type(values) is not list or len(values) != width:
            return None
        row = new(Row)
        row._values = tuple(values)
        row._columns = columns
        out.append(row)
    return out


def _rows(rows: list[list[Any]], columns: _Columns) -> list[Row]:
    """Rows already checked (lists of one value per column) sharing ``columns``."""
    new = Row.__new__
    out = []
    for values in rows:
        row = new(Row)
        row._values = tuple(values)
        row._columns = columns
        out.append(row)
    return out


def _to_columns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidArgument(f"columns must be a sequence of names, not {_preview(value)}")
    names = tuple(value)
    if not all(isinstance(name, str) for name in names):
        raise InvalidArgument(f"columns must be names (text), not {_preview(names)}")
    return names


def _to_rows(value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgument(f"rows must be a sequence of rows, not {_preview(value)}")
    return list(value)


@attrs.frozen(repr=False)
class ExecuteResult:
    """Outcome of one statement run by :meth:`Client.execute` or in a batch.

    ``rows_affected`` and ``last_insert_id`` are the statement's counts. A
    statement with a ``RETURNING`` clause (``INSERT/UPDATE/DELETE ...
    RETURNING``) also carries the rows it returned: ``columns`` (a tuple of
    names) and ``rows`` (a list of :class:`Row`, as in
    :class:`QueryResult`); both are empty otherwise. Iterating an
    ExecuteResult, ``len()`` and indexing go over those rows. An
    ExecuteResult is always true, even without rows (as it was before it
    could carry any), so ``if result:`` keeps its meaning. Rows with
    duplicate column names behave as described in :class:`Row`.
    """

    rows_affected: int
    last_insert_id: int | None
    columns: tuple[str, ...] = attrs.field(default=(), converter=_to_columns)
    rows: list[Row] = attrs.field(factory=list, converter=_to_rows, hash=False)

    def __attrs_post_init__(self) -> None:
        width = len(self.columns)
        if self.rows and not all(
            isinstance(row, Row) and row._columns.names == self.columns and len(row) == width
            for row in self.rows
        ):
            shared = _Columns(self.columns)
            rows = []
            for row in self.rows:
                values = tuple(row) if isinstance(row, (Row, list, tuple)) else None
                if values is None or len(values) != len(shared.names):
                    raise InvalidArgument(
                        f"each row must be a sequence of {len(shared.names)} values"
                        f" (one per column), not {_preview(row)}"
                    )
                rows.append(Row(values, shared))
            object.__setattr__(self, "rows", rows)

    @classmethod
    def from_wire(cls, result: Any) -> ExecuteResult:
        """Build from an ``execute`` RESPONSE result, checking its shape (else ProtocolError).

        ``rows_affected`` must be a count (0..2**64-1), ``last_insert_id``
        null or a signed 64-bit integer; ``columns`` and ``rows`` come
        together or not at all.
        """
        if cls is ExecuteResult and type(result) is dict:
            # The common reply of a write: two counts, no rows. Checked here, the
            # fields are set directly, without the converters and checks of
            # __init__ (a subclass goes through its own __init__, below).
            affected = result.get("rows_affected")
            last_id = result.get("last_insert_id")
            if (
                type(affected) is int
                and 0 <= affected <= _MAX_COUNT
                and (last_id is None or (type(last_id) is int and _MIN_ID <= last_id <= _MAX_ID))
                and "columns" not in result
                and "rows" not in result
            ):
                plain = object.__new__(ExecuteResult)
                set_field = object.__setattr__
                set_field(plain, "rows_affected", affected)
                set_field(plain, "last_insert_id", last_id)
                set_field(plain, "columns", ())
                set_field(plain, "rows", [])
                return plain
        return cls._from_wire_checked(result)

    @classmethod
    def _from_wire_checked(cls, result: Any) -> ExecuteResult:
        """:meth:`from_wire` checking every part (and raising for a bad one)."""
        if not isinstance(result, dict):
            raise ProtocolError(
                f"malformed execute result from node: expected a map, got {_preview(result)}"
            )
        affected = result.get("rows_affected")
        if not (_is_int(affected) and 0 <= affected <= _MAX_COUNT):
            raise ProtocolError(
                "malformed execute result from node: 'rows_affected' must be a count"
                f" (0..2**64-1), got {_preview(affected)}"
            )
        last_id = result.get("last_insert_id")
        if last_id is not None and not (_is_int(last_id) and _MIN_ID <= last_id <= _MAX_ID):
            raise ProtocolError(
                "malformed execute result from node: 'last_insert_id' must be null or a"
                f" signed 64-bit integer, got {_preview(last_id)}"
            )
        if "columns" not in result and "rows" not in result:
            return cls(affected, last_id)
        columns, rows = _check_rows(result, "execute")
        shared = _Columns(columns)
        return cls(affected, last_id, shared.names, [Row(values, shared) for values in rows])

    @classmethod
    def batch_from_wire(cls, result: Any) -> list[ExecuteResult]:
        """Build the results of a ``batch`` RESPONSE (``{"results": [...]}``), or ProtocolError."""
        if not (isinstance(result, dict) and isinstance(result.get("results"), list)):
            raise ProtocolError(f"malformed batch result from node: {_preview(result)}")
        return [cls.from_wire(item) for item in result["results"]]

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return True

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...

    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        return self.rows[index]

    def __repr__(self) -> str:
        text = f"ExecuteResult(rows_affected={_preview(self.rows_affected)}"
        text += f", last_insert_id={_preview(self.last_insert_id)}"
        if self.columns or self.rows:
            text += f", columns={_preview(list(self.columns))}, rows={len(self.rows)}"
        return text + ")"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
