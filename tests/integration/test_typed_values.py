"""Typed values through a real node: stored in SQLite, read back by declared type (10.1).

The driver's side (what it sends, what it refuses) is tests/unit/test_values.py;
here every typed value makes the whole trip: call site, CBOR tag, the node's
text in SQLite, the column's declared type, the tag back, the Python value.
"""

from __future__ import annotations

import datetime
import decimal
import math
import uuid
from typing import Any

import cbor2
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qdb_client
from qdb_client import Json
from qdb_client.errors import InvalidArgument
from qdb_client.protocol import Error
from qdb_client.testing import QdbNode

from ..common.raw_client import raw_client

FAST = {"heartbeat_interval": 60.0, "slow_start": 0.0, "discover_members": False}
UTC = datetime.UTC
OFFSETS = [UTC, datetime.timezone(datetime.timedelta(hours=5, minutes=30))]
OFFSETS.append(datetime.timezone(datetime.timedelta(hours=-8)))

#: (column, declared type, the ``types`` entry, values of it)
COLUMNS: list[tuple[str, str, str, st.SearchStrategy[Any]]] = [
    (
        "ts",
        "TIMESTAMP WITH TIME ZONE",
        "TIMESTAMP",
        st.datetimes(timezones=st.sampled_from(OFFSETS)),
    ),
    ("dt", "DATETIME", "DATETIME", st.datetimes(timezones=st.sampled_from(OFFSETS))),
    ("d", "DATE", "DATE", st.dates()),
    ("t", "TIME", "TIME", st.times()),
    # NUMERIC affinity: SQLite keeps a number (15 significant digits); the node pads
    # it back to the declared scale.
    (
        "amount",
        "DECIMAL(20, 6)",
        "DECIMAL",
        st.decimals(min_value=-(10**8), max_value=10**8, places=6),
    ),
    # TEXT affinity (the declaration names TEXT): the decimal's text is kept exactly.
    ("exact", "DECIMAL TEXT", "DECIMAL", st.decimals(allow_nan=False, allow_infinity=False)),
    ("u", "UUID", "UUID", st.uuids()),
    (
        "j",
        "JSON",
        "JSON",
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**53), 2**53)
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(max_size=10),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ).map(Json),
    ),
    ("i", "INTEGER", "INTEGER", st.integers(-(2**63), 2**63 - 1)),
    ("r", "REAL", "REAL", st.floats(allow_nan=False)),
    ("s", "TEXT", "TEXT", st.text(max_size=20)),
    ("b", "BLOB", "BLOB", st.binary(max_size=20)),
]
CREATE = "CREATE TABLE IF NOT EXISTS typed (id INTEGER PRIMARY KEY, {})".format(
    ", ".join(f"{name} {declared}" for name, declared, _, _ in COLUMNS)
)
NAMES = ", ".join(name for name, _, _, _ in COLUMNS)
INSERT = f"INSERT INTO typed ({NAMES}) VALUES ({', '.join('?' * len(COLUMNS))})"
rows_strategy = st.lists(
    st.tuples(*(values for _, _, _, values in COLUMNS)), min_size=1, max_size=5
)


def same(sent: Any, back: Any) -> bool:
    """Equal as the protocol promises: the same instant and offset, the same number."""
    if isinstance(sent, Json):
        return back == sent.value
    if isinstance(sent, datetime.datetime):
        return (
            type(back) is datetime.datetime
            and back == sent
            and (back.utcoffset() == sent.utcoffset())
        )
    if isinstance(sent, decimal.Decimal):
        return type(back) is decimal.Decimal and back == sent
    if isinstance(sent, float) and math.isinf(sent):
        return back == sent
    return type(back) is type(sent) and back == sent


async def test_every_typed_value_round_trips_through_a_node(node: QdbNode):
    address = node.address

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(rows=rows_strategy)
    def check(rows: list[tuple[Any, ...]]) -> None:
        async def run() -> None:
            async with qdb_client.open_client(address, **FAST) as client:
                await client.execute(CREATE)
                await client.execute("DELETE FROM typed")
                assert await client.executemany(INSERT, [list(row) for row in rows]) == len(rows)
                result = await client.query(f"SELECT {NAMES} FROM typed ORDER BY id")
                assert result.types == tuple(type_name for _, _, type_name, _ in COLUMNS)
                assert len(result.rows) == len(rows)
                for sent_row, back_row in zip(rows, result.rows, strict=True):
                    for (name, _, _, _), sent, back in zip(
                        COLUMNS, sent_row, back_row, strict=True
                    ):
                        assert same(sent, back), (name, sent, back)
                amount = result.rows[0][[c[0] for c in COLUMNS].index("amount")]
                assert amount.as_tuple().exponent == -6  # the declared scale

        trio.run(run)

    await trio.to_thread.run_sync(check)


async def test_returning_rows_and_batches_are_typed_too(node: QdbNode):
    async with qdb_client.open_client(node.address, **FAST) as client:
        await client.execute("CREATE TABLE ev (id UUID PRIMARY KEY, at TIMESTAMP, body JSON)")
        key, at = uuid.uuid4(), datetime.datetime(2026, 12, 1, 9, 30, tzinfo=OFFSETS[1])
        inserted = await client.execute(
            "INSERT INTO ev VALUES (?, ?, ?) RETURNING id, at, body, 1 + 1 AS two",
            [key, at, Json({"k": [1, 2]})],
        )
        assert tuple(inserted.rows[0]) == (key, at, {"k": [1, 2]}, 2)
        [result] = await client.batch([("SELECT id FROM ev WHERE at = ?", [at])])
        assert tuple(result.rows[0]) == (key,)


async def test_change_events_carry_the_typed_values_a_query_returns(node: QdbNode):
    row = [
        datetime.datetime(2026, 12, 1, 9, 30, 15, 250000, tzinfo=OFFSETS[1]),
        datetime.datetime(2026, 12, 2, 18, 0, tzinfo=UTC),
        datetime.date(2026, 12, 3),
        datetime.time(7, 45, 30, 500),
        decimal.Decimal("1234.500000"),
        decimal.Decimal("3.14159265358979323846"),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        Json({"k": [1, 2.5, None, "x"]}),
        -(2**63),
        0.1,
        "text",
        b"\x00\xff",
    ]
    async with qdb_client.open_client(node.address, **FAST) as client:
        await client.execute(CREATE)
        async with client.subscribe("typed") as events:
            await client.execute(INSERT, row)
            with trio.fail_after(5.0):
                inserted = await events.__anext__()
            [queried] = (await client.query(f"SELECT {NAMES} FROM typed")).rows
            await client.execute("UPDATE typed SET s = 'changed' WHERE id = ?", [inserted.key])
            with trio.fail_after(5.0):
                updated = await events.__anext__()
    names = [name for name, _, _, _ in COLUMNS]
    for name, sent, back in zip(names, row, queried, strict=True):
        assert same(sent, back), (name, sent, back)
    for event in (inserted, updated):
        for name, sent in zip(names, row, strict=True):
            expected = "changed" if (event is updated and name == "s") else sent
            assert same(expected, event.row[name]), (event.kind, name, sent, event.row[name])


async def test_expressions_and_values_that_do_not_parse_come_back_as_stored(node: QdbNode):
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "CREATE TABLE m (d DATE, n NUMERIC, j JSON, x)"})
        await client.call(
            "execute", {"sql": "INSERT INTO m VALUES ('not a date', 'ten', '{oops', 5)"}
        )
        result = await client.call("query", {"sql": "SELECT d, n, j, x, d || '' AS e FROM m"})
        assert result == {
            "columns": ["d", "n", "j", "x", "e"],
            "rows": [["not a date", "ten", "{oops", 5, "not a date"]],
            "types": ["DATE", "NUMERIC", "JSON", None, None],
        }
        await client.call("execute", {"sql": "DELETE FROM m"})
        await client.call("execute", {"sql": "INSERT INTO m VALUES ('2026-02-03', 12.5, '[1]', 0)"})
        typed = await client.call("query", {"sql": "SELECT d, n, j FROM m"})
        assert typed["rows"] == [[datetime.date(2026, 2, 3), decimal.Decimal("12.5"), [1]]]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([1, 2], "untagged array"),
        ({"a": 1}, "untagged map"),
        (cbor2.CBORTag(0, "2026-01-01T00:00:00"), "no offset"),
        (cbor2.CBORTag(0, "yesterday"), "RFC 3339"),
        (cbor2.CBORTag(1, 1700000000), "tag 1"),
        (cbor2.CBORTag(262, b"{not json"), "does not parse"),
        (cbor2.CBORTag(262, b"NaN"), "does not parse"),
        (cbor2.CBORTag(1004, "2026-02-30"), "not a date"),
        (cbor2.CBORTag(37, b"short"), "16 bytes"),
        (cbor2.CBORTag(4, [0, 1.5]), "two integers"),
        (cbor2.CBORTag(1008, "25:00"), "time of day"),
        (cbor2.CBORTag(4242, "x"), "tag 4242"),
        (2**64, "64 bits"),
    ],
)
async def test_refused_values_name_the_parameter_and_run_nothing(node: QdbNode, value, reason):
    async with raw_client(node.address) as client:
        await client.call("execute", {"sql": "CREATE TABLE IF NOT EXISTS v (x)"})
        positional = await client.request(
            "execute", {"sql": "INSERT INTO v VALUES (?), (?)", "params": [1, value]}
        )
        assert isinstance(positional, Error) and positional.name == "INVALID_REQUEST"
        assert positional.details == {"parameter": 1} and reason in positional.message
        named = await client.request("query", {"sql": "SELECT :when", "params": {"when": value}})
        assert isinstance(named, Error) and named.details == {"parameter": "when"}
        batch = await client.request(
            "batch",
            {
                "statements": [
                    {"sql": "INSERT INTO v VALUES (1)"},
                    {"sql": "SELECT ?", "params": [value]},
                ]
            },
        )
        assert isinstance(batch, Error) and batch.details == {"statement_index": 1, "parameter": 0}
        many = await client.request(
            "executemany", {"sql": "INSERT INTO v VALUES (?)", "rows": [[1], [2], [value]]}
        )
        assert isinstance(many, Error) and many.details == {"row_index": 2, "parameter": 0}
        assert (await client.call("query", {"sql": "SELECT count(*) FROM v"}))["rows"] == [[0]]


async def test_the_driver_refuses_a_value_without_a_wire_form_before_sending(node: QdbNode):
    async with qdb_client.open_client(node.address, **FAST) as client:
        await client.execute("CREATE TABLE w (at TIMESTAMP)")
        before = node.statistics()["requests_by_method"].get("execute", 0)
        with pytest.raises(InvalidArgument):
            await client.execute("INSERT INTO w VALUES (?)", [datetime.datetime(2026, 1, 1)])
        assert node.statistics()["requests_by_method"]["execute"] == before
