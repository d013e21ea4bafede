"""Results built from what a node sent: shapes, duplicate columns, RETURNING rows, previews.

Whatever a node puts in a RESPONSE, building a result either works or raises
ProtocolError with a short message; ``repr`` and ``_preview`` never raise.
"""

from __future__ import annotations

from typing import Any

import attrs
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdb_client import ExecuteResult, QueryResult, Row
from qdb_client import results as results_module
from qdb_client.errors import InvalidArgument, ProtocolError
from qdb_client.protocol.codec import decode_body
from qdb_client.results import _preview

HUGE = 10**5000  # str() refuses it: more than 4300 digits


class ReprRaises:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


class ReprHuge:
    def __repr__(self) -> str:
        return "x" * 10**6


def _cycle() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


def _deep(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


HOSTILE = [
    HUGE,
    -HUGE,
    2**1100,
    [HUGE] * 3,
    {"columns": HUGE},
    {"k": {"k": HUGE}},
    _cycle(),
    _deep(10_000),
    list(range(100_000)),
    {str(i): i for i in range(100_000)},
    "x" * 10**6,
    b"\xff" * 10**6,
    bytearray(b"ab"),
    ReprRaises(),
    [ReprRaises()],
    ReprHuge(),
    float("nan"),
    float("-inf"),
    (1,),
    frozenset({1, 2}),
    {1, 2},
    None,
    True,
]


# ------------------------------------------------------------------ preview


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__)
def test_preview_is_total_and_bounded(value: Any) -> None:
    text = _preview(value)
    assert isinstance(text, str)
    assert len(text) <= 203
    assert len(_preview(value, 20)) <= 23


def test_preview_shows_small_values_as_repr() -> None:
    for value in [1, -3, 2**64, 1.5, "ab", b"\x00", [1, "a"], {"a": [1, None]}, (1,), (1, 2)]:
        assert _preview(value) == repr(value)
    assert _preview(HUGE) == "<integer of 16610 bits>"
    assert _preview(_cycle()) == "[[...]]"
    assert "repr failed" in _preview(ReprRaises())


@settings(max_examples=100, deadline=None)
@given(
    value=st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.integers(-3, 3).map(lambda k: k * 10**5000 + k),  # beyond str()'s limit
            st.floats(),
            st.text(),
            st.binary(),
        ),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=30,
    )
)
def test_preview_never_raises(value: Any) -> None:
    assert len(_preview(value)) <= 203


# ------------------------------------------------------------- query shapes

MALFORMED_QUERY_RESULTS = [
    None,
    [],
    "rows",
    HUGE,
    {},
    {"columns": HUGE},
    {"columns": HUGE, "rows": []},
    {"columns": ["a"], "rows": HUGE},
    {"columns": ["a"]},
    {"rows": [[1]]},
    {"columns": "a", "rows": [["x"]]},
    {"columns": [1], "rows": []},
    {"columns": [HUGE], "rows": []},
    {"columns": ["a"], "rows": [[HUGE, HUGE]]},
    {"columns": ["a"], "rows": [1]},
    {"columns": ["a"], "rows": [(1,)]},
    {"columns": ["a"], "rows": [[]]},
    {"columns": ["a"], "rows": [[1], [1, 2]]},
    {"columns": ["a"], "rows": [ReprRaises()]},
    {"columns": ["a"] * 100_000, "rows": [[1]]},
]


@pytest.mark.parametrize("result", MALFORMED_QUERY_RESULTS, ids=lambda r: type(r).__name__)
def test_malformed_query_results_are_protocol_errors(result: Any) -> None:
    with pytest.raises(ProtocolError, match="malformed query result") as info:
        QueryResult.from_wire(result)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize(
    "result",
    [
        *MALFORMED_QUERY_RESULTS,
        {"columns": ["a"], "rows": [[1]], "types": ["TEXT", "TEXT"]},
        {"columns": ["a"], "rows": [[1]], "types": "TEXT"},
        {"columns": ["a"], "rows": [[1]], "types": [1]},
        {"columns": ["a"], "rows": [[1]], "types": [["TEXT"]]},
        {"columns": ["a"], "rows": [[1]], "types": ["T" * 65]},
        {"columns": ["a", "b"], "rows": [[1, 2]], "types": ["TEXT"]},
    ],
    ids=lambda r: type(r).__name__,
)
def test_a_shape_seen_before_is_still_checked_in_full(result: Any) -> None:
    # Results whose columns and types were seen before skip re-checking them:
    # what differs from the shape seen must still be refused.
    for seen in (
        {"columns": ["a"], "rows": [[1]]},
        {"columns": ["a"], "rows": [[1]], "types": ["TEXT"]},
        {"columns": ["a", "b"], "rows": [[1, 2]]},
    ):
        QueryResult.from_wire(seen)
    assert results_module._Columns.cached(["a"]) is not None
    with pytest.raises(ProtocolError, match="malformed query result"):
        QueryResult.from_wire(result)


#: An unknown tag around embedded JSON: the JSON decodes to a list, so the tag
#: can't be hashed, and hashing it raises RuntimeError (not TypeError).
UNHASHABLE_TAG = cbor2.CBORTag(4000, cbor2.CBORTag(262, b"[1]"))


@pytest.mark.parametrize(
    "wire",
    [
        {"columns": [UNHASHABLE_TAG], "rows": []},
        {"columns": ["a"], "rows": [], "types": [UNHASHABLE_TAG]},
    ],
    ids=["column", "type"],
)
def test_a_name_or_type_that_cannot_be_hashed_is_a_protocol_error(wire: dict) -> None:
    # The shapes seen before are looked up by hashing what the node sent.
    QueryResult.from_wire({"columns": ["a"], "rows": [], "types": ["INTEGER"]})
    result = decode_body(cbor2.dumps(wire))  # as a connection decodes the reply
    with pytest.raises(ProtocolError, match="malformed query result"):
        QueryResult.from_wire(result)


def test_a_shape_seen_before_builds_the_same_result() -> None:
    wire = {"columns": ["id", "name"], "rows": [[1, "ada"], [2, None]], "types": ["INTEGER", None]}
    first = QueryResult.from_wire(wire)
    again = QueryResult.from_wire(wire)  # the shape is known now
    assert results_module._Columns.cached(["id", "name"]) is not None
    assert results_module._cached_types(["INTEGER", None], ["id", "name"]) == ("INTEGER", None)
    for result in (first, again):
        assert result.columns == ("id", "name")
        assert result.types == ("INTEGER", None)
        assert [tuple(row) for row in result] == [(1, "ada"), (2, None)]
        assert result[1]["name"] is None and result[0]["id"] == 1
    untyped = QueryResult.from_wire({"columns": ["id", "name"], "rows": []})
    assert untyped.types == (None, None) and len(untyped) == 0


def test_huge_column_count_is_a_protocol_error_not_a_value_error() -> None:
    """The original report: ``{"columns": 10**5000}`` raised ValueError from repr."""
    with pytest.raises(ProtocolError):
        QueryResult.from_wire({"columns": 10**5000})
    with pytest.raises(ProtocolError):
        ExecuteResult.from_wire({"columns": 10**5000})
    with pytest.raises(ProtocolError):
        ExecuteResult.from_wire({"rows_affected": 10**5000})


def test_huge_values_in_rows_are_values() -> None:
    result = QueryResult.from_wire({"columns": ["big"], "rows": [[HUGE]]})
    assert result.scalar() == HUGE
    assert "16610 bits" in repr(result[0])  # repr works too


# --------------------------------------------------------- duplicate names


def test_duplicate_column_names() -> None:
    """``SELECT 1 AS a, 2 AS a``: every column stays, the name finds the first."""
    result = QueryResult.from_wire({"columns": ["a", "a"], "rows": [[1, 2]]})
    row = result[0]
    assert result.columns == ("a", "a")
    assert row["a"] == 1
    assert (row[0], row[1]) == (1, 2)
    assert row.keys() == ["a", "a"]
    assert row.as_dict() == {"a": 1}
    assert repr(row) == "Row(a=1, a=2)"
    assert len(row) == 2 and list(row) == [1, 2]


def test_duplicates_among_other_columns_keep_order() -> None:
    result = QueryResult.from_wire(
        {"columns": ["x", "a", "y", "a", "x"], "rows": [[1, 2, 3, 4, 5]]}
    )
    row = result[0]
    assert row.keys() == ["x", "a", "y", "a", "x"]
    assert row.as_dict() == {"x": 1, "a": 2, "y": 3}
    assert list(row.as_dict()) == ["x", "a", "y"]
    assert (row["x"], row["a"], row["y"]) == (1, 2, 3)
    assert repr(row) == "Row(x=1, a=2, y=3, a=4, x=5)"
    with pytest.raises(KeyError, match="no column 'z'"):
        row["z"]


def test_row_compares_and_hashes_by_values() -> None:
    a = QueryResult(["a", "b"], [[1, 2]])[0]
    assert a == (1, 2)
    assert a == [1, 2]
    assert a == Row((1, 2), ["x", "y"])
    assert hash(a) == hash((1, 2))


def test_row_accepts_the_older_index_form() -> None:
    row = Row((1, 2), {"a": 0, "b": 1})
    assert row.keys() == ["a", "b"] and row["b"] == 2


# ------------------------------------------------------ execute results


def test_execute_result_is_backwards_compatible() -> None:
    result = ExecuteResult(1, None)
    assert result == ExecuteResult(1, None)
    assert result != ExecuteResult(2, None)
    assert hash(result) == hash(ExecuteResult(1, None))
    assert (result.rows_affected, result.last_insert_id) == (1, None)
    assert result.columns == () and result.rows == []
    assert len(result) == 0 and list(result) == []
    assert bool(result)  # true as before, although it has no rows
    assert repr(result) == "ExecuteResult(rows_affected=1, last_insert_id=None)"
    assert ExecuteResult.from_wire({"rows_affected": 3, "last_insert_id": 42}) == ExecuteResult(
        3, 42
    )
    assert ExecuteResult.from_wire({"rows_affected": 0}) == ExecuteResult(0, None)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.rows_affected = 2  # type: ignore[misc]


def test_execute_result_with_returning_rows() -> None:
    wire = {
        "rows_affected": 2,
        "last_insert_id": 8,
        "columns": ["id", "name"],
        "rows": [[7, "ada"], [8, "grace"]],
    }
    result = ExecuteResult.from_wire(wire)
    assert result.columns == ("id", "name")
    assert all(isinstance(row, Row) for row in result.rows)
    assert type(result.rows[0]) is type(QueryResult(["a"], [[1]])[0])
    assert len(result) == 2
    assert [row["name"] for row in result] == ["ada", "grace"]
    assert result[1].as_dict() == {"id": 8, "name": "grace"}
    assert result == ExecuteResult(2, 8, ("id", "name"), [[7, "ada"], [8, "grace"]])
    assert result == ExecuteResult(2, 8, columns=["id", "name"], rows=[(7, "ada"), (8, "grace")])
    assert result != ExecuteResult(2, 8)
    assert hash(result) == hash(ExecuteResult(2, 8, ("id", "name"), [[7, "ada"], [8, "grace"]]))
    assert "rows=2" in repr(result)


def test_execute_result_returning_no_rows() -> None:
    result = ExecuteResult.from_wire({"rows_affected": 0, "columns": ["id"], "rows": []})
    assert result.columns == ("id",) and result.rows == [] and len(result) == 0


def test_execute_result_returning_duplicate_names() -> None:
    result = ExecuteResult.from_wire(
        {"rows_affected": 1, "columns": ["a", "a"], "rows": [[1, 2]], "last_insert_id": None}
    )
    assert result[0]["a"] == 1 and result[0].keys() == ["a", "a"]


MALFORMED_EXECUTE_RESULTS = [
    None,
    [],
    {},
    {"rows_affected": "1"},
    {"rows_affected": True},
    {"rows_affected": -1},
    {"rows_affected": 2**64},
    {"rows_affected": HUGE},
    {"rows_affected": 1.0},
    {"rows_affected": 1, "last_insert_id": "7"},
    {"rows_affected": 1, "last_insert_id": True},
    {"rows_affected": 1, "last_insert_id": 2**63},
    {"rows_affected": 1, "last_insert_id": -HUGE},
    {"rows_affected": 1, "columns": ["a"]},
    {"rows_affected": 1, "rows": [[1]]},
    {"rows_affected": 1, "columns": "a", "rows": [[1]]},
    {"rows_affected": 1, "columns": [1], "rows": [[1]]},
    {"rows_affected": 1, "columns": ["a"], "rows": [[1, 2]]},
    {"rows_affected": 1, "columns": ["a"], "rows": [1]},
    {"rows_affected": 1, "columns": ["a"], "rows": HUGE},
    {"rows_affected": 1, "columns": HUGE, "rows": []},
    {"rows_affected": 1, "columns": None, "rows": None},
]


@pytest.mark.parametrize("result", MALFORMED_EXECUTE_RESULTS, ids=lambda r: type(r).__name__)
def test_malformed_execute_results_are_protocol_errors(result: Any) -> None:
    with pytest.raises(ProtocolError, match="malformed execute result") as info:
        ExecuteResult.from_wire(result)
    assert len(str(info.value)) < 400


def test_execute_result_constructor_checks_rows() -> None:
    with pytest.raises(InvalidArgument):
        ExecuteResult(1, None, ("a",), [[1, 2]])
    with pytest.raises(InvalidArgument):
        ExecuteResult(1, None, "ab", [])
    with pytest.raises(InvalidArgument):
        ExecuteResult(1, None, ("a",), [5])
    with pytest.raises(InvalidArgument):
        ExecuteResult(1, None, (1,), [])  # type: ignore[arg-type]


def test_query_result_repr_is_bounded() -> None:
    result = QueryResult(["c"] * 10_000, [])
    assert len(repr(result)) < 300


def test_batch_results_from_wire() -> None:
    """For ``Client.batch``: its own check formatted the result with ``!r``, which
    raises ValueError for a huge integer; this helper never does."""
    wire = {"results": [{"rows_affected": 1, "last_insert_id": 3}, {"rows_affected": 0}]}
    assert ExecuteResult.batch_from_wire(wire) == [ExecuteResult(1, 3), ExecuteResult(0, None)]
    for bad in [None, {"results": HUGE}, {"results": None}, {"x": [HUGE]}, [HUGE]]:
        with pytest.raises(ProtocolError, match="malformed batch result"):
            ExecuteResult.batch_from_wire(bad)
    with pytest.raises(ProtocolError, match="malformed execute result"):
        ExecuteResult.batch_from_wire({"results": [{"rows_affected": HUGE}]})


def test_results_of_one_statement_share_their_columns_but_big_shapes_are_not_kept():
    small = {"columns": ["id", "name"], "rows": [[1, "ada"]], "types": None}
    first, second = QueryResult.from_wire(small), QueryResult.from_wire(small)
    assert first[0]._columns is second[0]._columns
    assert first[0]["name"] == "ada" and first[0] == Row((1, "ada"), ["id", "name"])
    # Long names (an expression column is named by its SQL text) are not
    # cached: they would stay in memory after every result holding them is gone.
    wide = ["x" * 5000]
    big = QueryResult.from_wire({"columns": wide, "rows": [[1]]})
    assert tuple(wide) not in results_module._SHARED_COLUMNS
    assert big[0][wide[0]] == 1
    many = [f"c{i}" for i in range(65)]
    QueryResult.from_wire({"columns": many, "rows": []})
    assert tuple(many) not in results_module._SHARED_COLUMNS


def test_an_execute_reply_without_rows_builds_the_same_result_as_the_constructor():
    wire = ExecuteResult.from_wire({"rows_affected": 3, "last_insert_id": None})
    made = ExecuteResult(3, None)
    assert wire == made and hash(wire) == hash(made) and repr(wire) == repr(made)
    assert (wire.columns, wire.rows, len(wire), bool(wire)) == ((), [], 0, True)
    other = ExecuteResult.from_wire({"rows_affected": 0, "last_insert_id": 7})
    assert other.rows is not wire.rows  # each result its own (empty) list
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        wire.rows_affected = 4  # type: ignore[misc]


def test_an_execute_reply_for_a_subclass_goes_through_the_subclass():
    @attrs.frozen(repr=False)
    class Noted(ExecuteResult):
        note: str = "x"

    noted = Noted.from_wire({"rows_affected": 1, "last_insert_id": 2})
    assert noted == Noted(1, 2) and noted.note == "x"
