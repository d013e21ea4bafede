"""The SQL a test node runs on one connection (qdb_client.testing.statements).

Plain sqlite3 connections, no node and no trio: RETURNING rows, the
INSERT detection behind ``last_insert_id`` (which must stay linear on any
input), read-only queries that leave their connection as they found it,
and the CANCEL checkpoints of a transaction (once it holds the lock, right
before COMMIT) that stop what SQLite's interrupt() would miss.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdb_client.testing._failure import RequestFailed
from qdb_client.testing.idempotency import SCHEMA, IdempotencyKey
from qdb_client.testing.jobs import Job
from qdb_client.testing.statements import (
    Control,
    Stopped,
    execute_one,
    is_insert,
    query_one,
    run_execute,
)
from qdb_client.testing.writes import run_batch, run_keyed, run_statements

#: What ``is_insert`` decides, as a regular expression: fine on short inputs. (The one
#: used before, ``/\*.*?\*/`` for a comment, was exponential on ``/**//**/...`` and,
#: by backtracking, let a comment end at any later ``*/``.)
REFERENCE = re.compile(
    r"^\s*(?:(?:--[^\n]*\n|/\*(?:[^*]|\*(?!/))*\*/)\s*)*(?:INSERT|REPLACE)\b", re.I
)


@pytest.fixture
def conn() -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(":memory:", isolation_level=None)
    connection.execute("create table t(id integer primary key, x)")
    yield connection
    connection.close()


# ---------------------------------------------------------- last_insert_id


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("insert into t values (1)", True),
        ("  \n\tINSERT into t values (1)", True),
        ("Replace into t values (1)", True),
        ("-- a comment\ninsert into t values (1)", True),
        ("/* a */ /* b */\n-- c\n  insert into t values (1)", True),
        ("/* unterminated insert", False),
        ("-- no newline insert", False),
        ("inserted", False),
        ("insert_x", False),
        ("update t set x = 1", False),
        ("with v as (select 1) insert into t select * from v", False),  # as before
        ("/**/*/insert", False),  # the comment ends at its first */
        ("/* a */ update t set x = '*/insert'", False),
        ("", False),
    ],
)
def test_is_insert_skips_whitespace_and_comments_only(sql: str, expected: bool):
    assert is_insert(sql) is expected


_PIECES = ["/*", "*/", "--", "\n", " ", "\t", "insert", "INSERT", "Replace", "x", "_", "é", "1"]


@settings(max_examples=500)
@given(st.lists(st.sampled_from(_PIECES), max_size=10).map("".join))
def test_is_insert_decides_like_a_regular_expression_would(sql: str):
    assert is_insert(sql) is bool(REFERENCE.match(sql))


def test_last_insert_id_only_for_the_insert_itself(conn: sqlite3.Connection):
    inserted = execute_one(conn, "insert into t(x) values (5)", ())
    assert inserted == {"rows_affected": 1, "last_insert_id": 1}
    # lastrowid still holds 1 here: an UPDATE must not report it.
    assert execute_one(conn, "update t set x = 6", ()) == {
        "rows_affected": 1,
        "last_insert_id": None,
    }
    nothing = execute_one(conn, "insert into t(x) select 1 where 0", ())
    assert nothing == {"rows_affected": 0, "last_insert_id": None}
    quoted = execute_one(conn, "/* a */ update t set x = '*/insert'", ())
    assert quoted == {"rows_affected": 1, "last_insert_id": None}


def test_statement_of_118_bytes_of_comments_completes(conn: sqlite3.Connection):
    execute_one(conn, "insert into t(x) values (1)", ())
    sql = "/**/" * 26 + " delete from t"
    assert len(sql) == 118
    assert execute_one(conn, sql, ()) == {"rows_affected": 1, "last_insert_id": None}


def test_statements_of_thousands_of_comments_complete(conn: sqlite3.Connection):
    comments = "/**/" * 20_000
    inserted = execute_one(conn, comments + "insert into t(x) values (1)", ())
    assert inserted == {"rows_affected": 1, "last_insert_id": 1}
    deleted = execute_one(conn, comments + "delete from t", ())
    assert deleted == {"rows_affected": 1, "last_insert_id": None}


# --------------------------------------------------------------- RETURNING


def test_execute_returns_the_rows_of_returning(conn: sqlite3.Connection):
    inserted = execute_one(conn, "insert into t(x) values (?), (?) returning id, x", ("a", b"\x00"))
    assert inserted == {
        "rows_affected": 2,
        "last_insert_id": 2,
        "columns": ["id", "x"],
        "rows": [[1, "a"], [2, b"\x00"]],
        "types": [None, None],  # no probe here (a bare connection): types unknown
    }
    assert list(inserted) == ["rows_affected", "last_insert_id", "columns", "rows", "types"]
    updated = execute_one(conn, "update t set x = x || '' where id = 1 returning x", ())
    assert updated == {
        "rows_affected": 1,
        "last_insert_id": None,
        "columns": ["x"],
        "rows": [["a"]],
        "types": [None],
    }
    none = execute_one(conn, "delete from t where id > 5 returning id", ())
    assert none == {
        "rows_affected": 0,
        "last_insert_id": None,
        "columns": ["id"],
        "rows": [],
        "types": [None],
    }


def test_results_without_rows_keep_exactly_their_two_keys(conn: sqlite3.Connection):
    for sql in ("insert into t(x) values (1)", "update t set x = 2", "create table u(y)"):
        assert list(execute_one(conn, sql, ())) == ["rows_affected", "last_insert_id"]


def test_batch_results_carry_returning_rows_per_statement(conn: sqlite3.Connection):
    results = run_statements(
        conn,
        [("insert into t(x) values (1) returning id", ()), ("update t set x = 2", ())],
    )
    assert results == {
        "results": [
            {
                "rows_affected": 1,
                "last_insert_id": 1,
                "columns": ["id"],
                "rows": [[1]],
                "types": [None],
            },
            {"rows_affected": 1, "last_insert_id": None},
        ]
    }


# ------------------------------------------------------------------- query


def _writable(conn: sqlite3.Connection) -> bool:
    """query_only is off and no authorizer refuses a pragma assignment."""
    if conn.execute("pragma query_only").fetchone() != (0,):
        return False
    conn.execute("pragma cache_size = -2000")
    return True


@pytest.mark.parametrize(
    "sql",
    [
        "insert into t(x) values (1) returning id",
        "pragma journal_mode = delete",
        "attach ':memory:' as m",
    ],
)
def test_query_refuses_a_write_before_running_it(conn: sqlite3.Connection, sql: str):
    with pytest.raises(RequestFailed) as failed:
        query_one(conn, sql, ())
    assert failed.value.code.value == "READ_ONLY"
    assert failed.value.details == {"executed": False}
    assert conn.execute("select count(*) from t").fetchone() == (0,)
    assert conn.execute("pragma database_list").fetchall() == [(0, "main", "")]
    assert _writable(conn)


def test_query_leaves_the_connection_writable_after_any_ending(conn: sqlite3.Connection):
    assert query_one(conn, "select 1 as one", ()) == {
        "columns": ["one"],
        "rows": [[1]],
        "types": [None],
    }
    assert _writable(conn)
    with pytest.raises(sqlite3.OperationalError):
        query_one(conn, "select * from missing", ())
    assert _writable(conn)
    with pytest.raises(sqlite3.ProgrammingError):
        query_one(conn, "select ?", (1, 2))
    assert _writable(conn)
    assert execute_one(conn, "insert into t(x) values (1)", ())["rows_affected"] == 1


class _InterruptedOnce(sqlite3.Connection):
    """A connection whose first ``fail_on`` statement raises SQLITE_INTERRUPT.

    Plays a cancel's ``interrupt()`` landing on the clean-up statement that
    follows the work, which it can: the two race.
    """

    fail_on = ""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql == self.fail_on:
            type(self).fail_on = ""
            raise sqlite3.OperationalError("interrupted")
        return super().execute(sql, *args)


def test_an_interrupt_racing_the_end_of_a_query_still_restores_the_connection():
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=_InterruptedOnce)
    _InterruptedOnce.fail_on = "PRAGMA query_only = OFF"
    assert query_one(conn, "select 1", ())["rows"] == [[1]]
    assert _InterruptedOnce.fail_on == ""  # it did hit
    assert _writable(conn)
    conn.close()


def test_an_interrupt_racing_the_rollback_of_a_job_still_rolls_back():
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=_InterruptedOnce)
    conn.execute("create table t(x)")

    def fails_in_a_transaction(c: sqlite3.Connection) -> None:
        c.execute("begin")
        c.execute("insert into t values (1)")
        raise sqlite3.OperationalError("interrupted")

    _InterruptedOnce.fail_on = "ROLLBACK"
    with pytest.raises(sqlite3.OperationalError):
        Job(conn, fails_in_a_transaction, budget=10.0).run()
    assert _InterruptedOnce.fail_on == ""
    assert not conn.in_transaction
    assert conn.execute("select count(*) from t").fetchone() == (0,)
    conn.close()


# ------------------------------------------------------- CANCEL checkpoints


def _cancelling(conn: sqlite3.Connection, control: Control) -> None:
    """``cancel()`` in SQL: a CANCEL arriving while a statement runs, too short to interrupt."""

    def cancel() -> int:
        control.cancelled = True
        return 1

    conn.create_function("cancel", 0, cancel)


@pytest.mark.parametrize("how", ["batch", "keyed", "returning"])
def test_a_cancel_during_a_short_transaction_stops_it_before_commit(
    conn: sqlite3.Connection, how: str
):
    for statement in SCHEMA:
        conn.execute(statement)
    control = Control()
    _cancelling(conn, control)
    write = "insert into t(x) select cancel() returning id"
    work = {
        "batch": lambda: run_batch(conn, [(write, ())], control),
        "keyed": lambda: run_keyed(
            conn,
            IdempotencyKey("k", b"h"),
            lambda c: execute_one(c, write, (), control),
            clock=lambda: 0.0,
            ttl=60.0,
            control=control,
        ),
        "returning": lambda: run_execute(conn, write, (), control),
    }[how]
    with pytest.raises(Stopped):
        Job(conn, lambda c: work(), budget=10.0, control=control).run()
    assert not conn.in_transaction
    assert conn.execute("select count(*) from t").fetchone() == (0,)
    assert conn.execute("select count(*) from qdb_idempotency").fetchone() == (0,)


def test_a_job_cancelled_before_it_started_runs_nothing(conn: sqlite3.Connection):
    control = Control()
    control.cancelled = True
    with pytest.raises(Stopped):
        Job(
            conn, lambda c: execute_one(c, "insert into t(x) values (1)", ()), 10.0, control=control
        ).run()
    assert conn.execute("select count(*) from t").fetchone() == (0,)


def test_a_job_that_changed_its_connection_hands_back_a_fresh_one(tmp_path):
    path = str(tmp_path / "db.sqlite3")
    first = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    control = Control()
    job = Job(
        first,
        lambda c: execute_one(c, "create temp table scratch(x)", (), control),
        10.0,
        control=control,
        reopen=lambda: sqlite3.connect(path, isolation_level=None),
    )
    job.run()
    assert control.connection_changed and job.conn is not first
    with pytest.raises(sqlite3.ProgrammingError):  # the changed one is closed
        first.execute("select 1")
    assert job.conn.execute("select count(*) from sqlite_temp_master").fetchone() == (0,)
    job.conn.close()
