"""Typed values on the node, without a node: binding, reading back, the raw-tag request
decoder, statement descriptions and the session's prepared statements.

(qdb_client.testing.typed, .wire, .decltypes, .prepared; the whole trip through a
node is tests/integration/test_typed_values.py.)
"""

from __future__ import annotations

import datetime
import decimal
import sqlite3
import uuid
from pathlib import Path

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdb_client.protocol import BadMessage, Hello, ProtocolConnection, Request, Role, Welcome
from qdb_client.protocol.codec import decode_body
from qdb_client.protocol.messages import encode_message
from qdb_client.testing._failure import RequestFailed
from qdb_client.testing.decltypes import ProbeError, StatementProbe, named, scan_parameters
from qdb_client.testing.idempotency import request_hash
from qdb_client.testing.prepared import PreparedStatements
from qdb_client.testing.typed import (
    BadValue,
    Tagged,
    TypedParam,
    bind_value,
    converters,
    type_name,
)
from qdb_client.testing.wire import NodeProtocol, decode_raw_request
from qdb_client.values import Json, check_value

UTC = datetime.UTC


def tagged(value: object) -> Tagged:
    """What the node's decoder makes of the driver's wire form of ``value``."""
    raw = decode_raw_request(cbor2.dumps({"args": {"v": check_value(value, "v")}}))
    assert raw is not None
    found = raw["args"]["v"]
    assert isinstance(found, Tagged)
    return found


# ------------------------------------------------------------------- binding


@pytest.mark.parametrize(
    ("value", "tag", "text"),
    [
        (datetime.datetime(2026, 12, 1, 9, 30, tzinfo=UTC), 0, "2026-12-01T09:30:00+00:00"),
        (datetime.date(2026, 2, 3), 1004, "2026-02-03"),
        (datetime.time(17, 30, 0, 250), 1008, "17:30:00.000250"),
        (decimal.Decimal("12.50"), 4, "12.50"),
        (decimal.Decimal("-0.001"), 4, "-0.001"),
        (decimal.Decimal("1E+3"), 4, "1000"),
        (decimal.Decimal("1E+200"), 4, "1E+200"),  # beyond positional notation: still exact
        (
            uuid.UUID("A1B2C3D4-0000-4000-8000-00000000000F"),
            37,
            "a1b2c3d4-0000-4000-8000-00000000000f",
        ),
        (Json({"b": [1, None]}), 262, '{"b": [1, null]}'),
        (Json("text"), 262, '"text"'),
    ],
)
def test_a_typed_parameter_binds_as_its_text(value, tag, text):
    bound = bind_value(tagged(value))
    assert bound == TypedParam(tag, text)
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT ?, typeof(?)", (bound, bound)).fetchone() == (text, "text")


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_a_decimal_is_stored_exactly(value):
    assert decimal.Decimal(bind_value(tagged(value)).text) == value


def test_plain_values_bind_as_they_are_and_others_are_refused():
    for plain in (None, True, 1.5, "x", b"\x00", -(2**63), 2**63 - 1):
        assert bind_value(plain) is plain
    refusals = [
        ([1], "untagged array"),
        ({"a": 1}, "untagged map"),
        (2**63, "64 bits"),
        (Tagged(0, "2026-01-01T00:00:00"), "no offset"),
        (Tagged(1, 0), "tag 1"),
        (Tagged(262, b"[1,"), "does not parse"),
        (Tagged(262, b"Infinity"), "does not parse"),
        (Tagged(262, "[1]"), "byte string"),
        (Tagged(37, b"\x00" * 15), "16 bytes"),
        (Tagged(4, [1, True]), "two integers"),
        (Tagged(4, [10**7, 1]), "two integers"),  # an exponent no one needs
        (Tagged(1004, "2026-1-1"), "YYYY-MM-DD"),
        (Tagged(1008, "10:00+01:00"), "no time zone"),
        ({1, 2}, "can't be bound"),
    ]
    for value, reason in refusals:
        with pytest.raises(BadValue, match=reason):
            bind_value(value)


def test_a_typed_parameter_is_its_own_request_for_idempotency():
    as_decimal = request_hash(
        "execute", ["SELECT ?", (bind_value(tagged(decimal.Decimal("1.5"))),)]
    )
    as_text = request_hash("execute", ["SELECT ?", ("1.5",)])
    again = request_hash("execute", ["SELECT ?", (TypedParam(4, "1.5"),)])
    assert as_decimal != as_text and as_decimal == again


# ------------------------------------------------------------------ reading


def test_type_names_are_the_first_word_upper_cased():
    assert type_name("timestamp with time zone") == "TIMESTAMP"
    assert type_name("NUMERIC(10,2)") == "NUMERIC"
    assert type_name("decimal (10, 2)") == "DECIMAL"
    assert type_name(None) is None and type_name("") is None
    assert len(type_name("x" * 500) or "") == 64


def test_stored_values_come_back_by_declared_type():
    decls = ["TIMESTAMP", "DATE", "TIME", "DECIMAL(10,2)", "UUID", "JSON", "TEXT", None]
    convert = converters(decls)
    assert convert is not None and convert[-2:] == [None, None]
    stored = [
        "2026-12-01T09:30:00+05:30",
        "2026-02-03",
        "17:30:00",
        12.5,
        "a1b2c3d4-0000-4000-8000-00000000000f",
        '{"a": [1]}',
        "plain",
        "plain",
    ]
    back = [c(v) if c else v for c, v in zip(convert, stored, strict=True)]
    wire = decode_body(cbor2.dumps(back))  # as the driver reads them
    assert wire[0] == datetime.datetime(
        2026, 12, 1, 9, 30, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))
    )
    assert wire[1:3] == [datetime.date(2026, 2, 3), datetime.time(17, 30)]
    assert str(wire[3]) == "12.50"  # REAL 12.5 padded to the declared scale
    assert wire[4] == uuid.UUID("a1b2c3d4-0000-4000-8000-00000000000f")
    assert wire[5:] == [{"a": [1]}, "plain", "plain"]


def test_values_that_do_not_parse_come_back_as_stored():
    decls = ["TIMESTAMP", "TIMESTAMP", "DATE", "TIME", "NUMERIC", "NUMERIC", "UUID", "JSON"]
    stored = ["2026-12-01T09:30:00", "soon", "20260203", "noon", "ten", b"\x01", "a1b2", "{x"]
    convert = converters(decls)
    assert convert is not None
    assert [c(v) for c, v in zip(convert, stored, strict=True) if c] == stored
    assert converters(["TEXT", None, "INTEGER"]) is None  # nothing to convert: no work per row


def test_a_decimal_read_as_a_number_is_padded_only_when_exact():
    [to_decimal] = converters(["DECIMAL(10,2)"]) or [None]
    assert to_decimal is not None
    assert str(to_decimal(100)) == "100.00"
    assert str(to_decimal(1.234)) == "1.234"  # more places than declared: never rounded
    assert str(to_decimal("7.5")) == "7.5"  # text is exact as it is
    [plain] = converters(["NUMERIC"]) or [None]
    assert plain is not None and str(plain(2.5)) == "2.5"


# ------------------------------------------------------------ request decoder


def test_the_raw_decoder_keeps_tags_and_decodes_bignums():
    body = cbor2.dumps(
        {"args": {"p": [cbor2.CBORTag(262, b"[1]"), [1], 2**70, cbor2.CBORTag(99, "x")]}}
    )
    raw = decode_raw_request(body)
    assert raw == {"args": {"p": [Tagged(262, b"[1]"), [1], 2**70, Tagged(99, "x")]}}
    assert decode_raw_request(cbor2.dumps([1])) is None  # not a map
    assert decode_raw_request(cbor2.dumps({"a": cbor2.CBORTag(28, 1)})) is None  # shared
    assert decode_raw_request(body + b"\x00") is None  # trailing bytes


def _opened() -> NodeProtocol:
    proto = NodeProtocol(max_frame_size=1 << 20)
    client = ProtocolConnection(Role.CLIENT)
    proto.receive_data(client.send(Hello(versions=(1,))))
    assert isinstance(proto.next_event(), Hello)
    proto.send(
        Welcome(
            version=1,
            node_id="n",
            session_id="s",
            max_frame_size=1 << 20,
            max_in_flight=8,
            idle_timeout_ms=1000,
        )
    )
    return proto


def test_node_protocol_hands_requests_their_raw_tags():
    proto = _opened()
    plain = Request(1, "query", {"sql": "SELECT ?", "params": [1]}, deadline_ms=50)
    json_param = Request(2, "query", {"sql": "SELECT ?", "params": [cbor2.CBORTag(262, b"[1]")]})
    naive = Request(
        3, "query", {"sql": "SELECT ?", "params": [cbor2.CBORTag(0, "2026-01-01T00:00")]}
    )
    bad_envelope = Request(4, "query", {})
    for message in (plain, json_param, naive):
        proto.receive_data(encode_message(message))
    proto.receive_data(encode_message(bad_envelope)[:-4] + b"\x00\x00\x00\x00")  # bad CRC
    assert proto.next_event() == plain
    assert proto.next_event().args["params"] == [Tagged(262, b"[1]")]
    # The codec refuses tag 0 without an offset; the node still gets the request.
    rebuilt = proto.next_event()
    assert isinstance(rebuilt, Request) and rebuilt.request_id == 3
    assert rebuilt.args["params"] == [Tagged(0, "2026-01-01T00:00")]
    assert isinstance(proto.next_event(), BadMessage)  # in step after a bad frame too
    proto.receive_data(encode_message(Request(5, "ping", {})))
    assert proto.next_event() == Request(5, "ping", {})


# --------------------------------------------------------------- descriptions


def test_scanning_parameters_skips_strings_names_and_comments():
    assert scan_parameters("SELECT ?, '?', \"?\", [?], `?` -- ?\n /* ? */ , ?") == (2, (None, None))
    assert scan_parameters("SELECT ?3, ?") == (4, (None, None, "?3", None))
    assert scan_parameters("SELECT :a, @b, $c, :a") == (3, (":a", "@b", "$c"))
    assert named([":a", "@b"]) == ["a", "b"] and named([None]) == [] and named([":a", None]) is None


@pytest.fixture
def probe(tmp_path: Path):
    path = str(tmp_path / "db.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, at TIMESTAMP, n NUMERIC(4, 1))")
    found = StatementProbe(path)
    if not found.available:
        pytest.skip("no SQLite library reachable through ctypes here")
    yield conn, found
    found.close()
    conn.close()


def test_the_probe_describes_columns_and_parameters(probe):
    conn, found = probe
    described = found.describe("SELECT id, at, n * 2 AS twice FROM t WHERE id = :id")
    assert described.columns == ("id", "at", "twice")
    assert described.decltypes == ("INTEGER", "TIMESTAMP", None)
    assert (described.param_count, described.param_names) == (1, (":id",))
    returning = found.describe("INSERT INTO t (at) VALUES (?) RETURNING n")
    assert returning.decltypes == ("NUMERIC(4, 1)",) and returning.param_count == 1
    assert found.describe("SELECT 1; SELECT 2").rest.strip() == "SELECT 2"
    for broken in ("SELECT * FROM missing", "SELEC 1", "   "):
        with pytest.raises(ProbeError):
            found.describe(broken)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)  # nothing ran


def test_the_probe_sees_schema_changes_and_caches_by_schema_version(probe):
    conn, found = probe
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    first = found.describe("SELECT * FROM t", version)
    assert found.cached("SELECT * FROM t", version) is first
    conn.execute("ALTER TABLE t ADD COLUMN d DATE")
    newer = conn.execute("PRAGMA schema_version").fetchone()[0]
    assert found.cached("SELECT * FROM t", newer) is None
    assert found.describe("SELECT * FROM t", newer).decltypes[-1] == "DATE"


# ---------------------------------------------------------- prepared statements


def test_prepared_statements_are_kept_least_recently_used_first():
    kept = PreparedStatements(limit=2)
    a = kept.add("SELECT 1", 0)
    b = kept.add("SELECT ?", 1)
    assert kept.add("SELECT 1", 0) is a  # the same text keeps its id
    assert kept.get(a.id) is a  # a is now the most recently used
    c = kept.add("SELECT :x", 1, ["x"])
    assert (a.id, b.id, c.id) == (1, 2, 3) and len(kept) == 2 and kept.evicted == 1
    with pytest.raises(RequestFailed) as gone:
        kept.get(b.id)
    assert gone.value.code.value == "UNPREPARED"
    assert kept.remove(a.id) and not kept.remove(a.id)
    assert kept.add("SELECT ?", 1).id == 4  # ids are never reused


def test_calls_by_id_are_checked_against_the_statement():
    kept = PreparedStatements()
    positional = kept.add("SELECT ?, ?", 2)
    positional.check((1, 2))
    named_one = kept.add("SELECT :a", 1, ["a"])
    named_one.check({"a": 1})
    for statement, params in [
        (positional, (1,)),
        (positional, {"a": 1}),
        (named_one, {"b": 1}),
        (named_one, (1,)),
    ]:
        with pytest.raises(RequestFailed) as wrong:
            statement.check(params)
        assert wrong.value.code.value == "INVALID_REQUEST"
