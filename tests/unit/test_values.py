"""Typed values at the call site and on the wire; the result helpers.

Pure: values are checked and encoded by ``qdb_client.values`` and decoded by
the protocol codec, with no node. (The round trip through a node, SQLite
storage and declared types included, is in
``tests/integration/test_typed_values.py``.)
"""

from __future__ import annotations

import datetime
import decimal
import math
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

import qdb_client
from qdb_client.errors import InvalidArgument, UnexpectedRowCount
from qdb_client.protocol.codec import decode_body, encode_body
from qdb_client.results import QueryResult
from qdb_client.values import Json, check_value, prepare_params

UTC = datetime.UTC

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

supported = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.datetimes(
        timezones=st.sampled_from([UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30))])
    ),
    st.dates(),
    st.times(),
    st.decimals(allow_nan=False, allow_infinity=False, places=6),
    st.uuids(),
)


@given(value=supported)
def test_every_supported_value_round_trips_the_wire_with_its_type(value):
    wire = check_value(value, "parameter 0")
    back = decode_body(encode_body({"v": wire}))["v"]
    assert type(back) is type(value)
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(back)
    else:
        assert back == value


@given(value=json_values)
def test_json_values_round_trip_through_the_embedded_json_tag(value):
    back = decode_body(encode_body({"v": check_value(Json(value), "p")}))["v"]
    assert back == value


def test_byte_likes_are_bytes_on_the_wire():
    assert check_value(bytearray(b"ab"), "p") == b"ab"
    assert check_value(memoryview(b"cd"), "p") == b"cd"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (2**63, "64 bits"),
        (-(2**63) - 1, "64 bits"),
        (datetime.datetime(2026, 1, 1), "time zone"),
        (decimal.Decimal("NaN"), "finite"),
        (decimal.Decimal("Infinity"), "finite"),
        ([1, 2], "Json"),
        ({"a": 1}, "Json"),
        ((1,), "Json"),
        ({1, 2}, "Json"),
        (1 + 2j, "can't be bound"),
        (object(), "can't be bound"),
        (datetime.time(1, tzinfo=UTC), "time zone"),
        (Json({1, 2}), "no JSON form"),
        (Json(float("nan")), "no JSON form"),
    ],
)
def test_unsupported_values_are_invalid_arguments_naming_the_parameter(value, fragment):
    with pytest.raises(InvalidArgument, match=fragment) as info:
        prepare_params([None, value])
    assert "parameter 1" in str(info.value)


def test_named_parameters_are_checked_and_named():
    assert prepare_params({"when": datetime.date(2026, 12, 1)}) == {
        "when": datetime.date(2026, 12, 1)
    }
    with pytest.raises(InvalidArgument, match="'bad'"):
        prepare_params({"bad": [1]})
    with pytest.raises(InvalidArgument, match="str names"):
        prepare_params({1: 2})


async def test_a_bad_value_is_refused_before_anything_is_sent(network, autojump_clock):
    from .fake_network import echo

    network.handlers["a:1"] = echo
    async with qdb_client.open_client("a:1", heartbeat_interval=1000.0) as client:
        sent_before = client.statistics()["attempts"]
        with pytest.raises(InvalidArgument):
            await client.execute("INSERT INTO t VALUES (?)", [uuid.uuid4, 1])
        with pytest.raises(InvalidArgument):
            await client.query("SELECT ?", [datetime.datetime.now()])
        assert client.statistics()["attempts"] == sent_before


# ------------------------------------------------------------------ results


def test_first_one_and_as_dicts():
    result = QueryResult(["id", "name"], [[1, "ada"], [2, "bob"]], ["INTEGER", "TEXT"])
    assert result.first() == (1, "ada") and result.types == ("INTEGER", "TEXT")
    assert result.as_dicts() == [{"id": 1, "name": "ada"}, {"id": 2, "name": "bob"}]
    with pytest.raises(UnexpectedRowCount) as info:
        result.one()
    assert info.value.count == 2
    single = QueryResult(["n"], [[7]])
    assert single.one()["n"] == 7 and single.types == (None,)
    empty = QueryResult(["n"], [])
    assert empty.first() is None and empty.scalar() is None
    with pytest.raises(UnexpectedRowCount):
        empty.one()


def test_types_from_the_wire_are_checked():
    ok = QueryResult.from_wire({"columns": ["a"], "rows": [[1]], "types": ["TIMESTAMP"]})
    assert ok.types == ("TIMESTAMP",)
    for bad in (["A", "B"], [1], "TEXT"):
        with pytest.raises(qdb_client.ProtocolError):
            QueryResult.from_wire({"columns": ["a"], "rows": [[1]], "types": bad})
