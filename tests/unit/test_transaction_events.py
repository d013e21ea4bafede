"""A transaction's statements are requests too: each emits RequestStarted, then
RequestSucceeded or RequestFailed, as the pipeline's attempts do, so listeners,
logs and OpenTelemetry spans see the statements of a transaction.

Against tests/unit/test_transactions.py's scripted nodes, in virtual time.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio

import qdb_client
from qdb_client import events as qdb_events
from qdb_client._policies import OutcomeKind
from qdb_client.errors import ProtocolError, RequestTimeout, SqlError, TransactionAborted
from qdb_client.results import ExecuteResult

from .fake_network import FakeNetwork
from .test_transactions import EXACT, TxNodes

REQUEST_EVENTS = (qdb_events.RequestStarted, qdb_events.RequestSucceeded, qdb_events.RequestFailed)


@pytest.fixture
def nodes(network: FakeNetwork) -> TxNodes:
    state = TxNodes()
    network.handlers["a:1"] = state.handle
    return state


def request_events(got: list[Any]) -> list[Any]:
    return [e for e in got if isinstance(e, REQUEST_EVENTS)]


async def test_each_statement_is_started_then_succeeded_on_the_transactions_node(
    nodes, autojump_clock
):
    got: list[Any] = []
    async with qdb_client.open_client("a:1", listeners=[got.append], **EXACT) as client:
        async with client.transaction() as tx:
            await trio.sleep(0.5)
            got.clear()  # begin and the pipeline's own requests are not under test
            nodes.statement_delay = 0.25
            await tx.execute("INSERT INTO t VALUES (1)")
            await tx.query("SELECT n FROM t")
            nodes.statement_delay = 0.0
        events = request_events(got)
        assert [(type(e).__name__, e.method) for e in events] == [
            ("RequestStarted", "execute"),
            ("RequestSucceeded", "execute"),
            ("RequestStarted", "query"),
            ("RequestSucceeded", "query"),
        ]
        assert {(e.node, e.attempt) for e in events} == {(tx.node, 1)}
        started, succeeded = events[0], events[1]
        assert started.request_id == succeeded.request_id > 0
        [connection] = client._cluster.nodes[0].pool.connections()
        assert started.connection_id == connection.serial
        assert succeeded.duration == pytest.approx(0.25)
        assert succeeded.at - started.at == pytest.approx(0.25)


async def test_a_failed_statement_is_one_request_failed_never_retried(nodes, autojump_clock):
    got: list[Any] = []
    async with qdb_client.open_client("a:1", listeners=[got.append], **EXACT) as client:
        async with client.transaction() as tx:
            got.clear()
            with pytest.raises(SqlError):
                await tx.execute("this will fail")
            await tx.execute("INSERT INTO t VALUES (1)")  # the transaction goes on
        started, failed = request_events(got)[:2]
        assert isinstance(started, qdb_events.RequestStarted)
        assert isinstance(failed, qdb_events.RequestFailed)
        assert (failed.method, failed.node, failed.attempt) == ("execute", tx.node, 1)
        assert failed.request_id == started.request_id
        assert failed.outcome == OutcomeKind.REJECTED.value  # the statement was refused
        assert failed.error.startswith("SqlError: ")
        assert failed.retried is False


async def test_a_statement_that_outlasts_its_timeout_fails_with_the_deadline_outcome(
    nodes, autojump_clock
):
    got: list[Any] = []
    async with qdb_client.open_client("a:1", listeners=[got.append], **EXACT) as client:
        with pytest.raises(TransactionAborted):
            async with client.transaction() as tx:
                got.clear()
                nodes.statement_delay = 5.0
                with pytest.raises(RequestTimeout):
                    await tx.execute("INSERT INTO t VALUES (1)", timeout=1.0)
        [failed] = [e for e in got if isinstance(e, qdb_events.RequestFailed)]
        assert (failed.method, failed.node, failed.retried) == ("execute", tx.node, False)
        assert failed.outcome == OutcomeKind.DEADLINE_AFTER_SEND.value
        assert failed.duration == pytest.approx(1.0)
        assert failed.error.startswith("RequestTimeout: ")


async def test_a_cancelled_statement_reports_no_failure(nodes, autojump_clock):
    got: list[Any] = []
    async with qdb_client.open_client("a:1", listeners=[got.append], **EXACT) as client:
        with pytest.raises(TransactionAborted):
            async with client.transaction() as tx:
                got.clear()
                nodes.statement_delay = 5.0
                with trio.move_on_after(1.0):
                    await tx.execute("INSERT INTO t VALUES (1)")
        statement = [e for e in request_events(got) if e.method == "execute"]
        assert [type(e).__name__ for e in statement] == ["RequestStarted"]


async def test_no_listener_no_logging_builds_no_request_event(nodes, autojump_clock, monkeypatch):
    built: list[str] = []
    for cls in REQUEST_EVENTS:
        original = cls.__init__

        def counting(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> None:
            built.append(type(self).__name__)
            __original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    async with qdb_client.open_client("a:1", **EXACT) as client, client.transaction() as tx:
        await tx.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(SqlError):
            await tx.execute("this will fail")
    assert built == []


async def test_a_parsers_slip_is_a_malformed_reply_that_ends_the_statement(
    nodes, autojump_clock, monkeypatch
):
    """A result parser raising something other than a QdbError is the
    ProtocolError of a malformed reply, as in the pipeline: the statement ends
    with RequestFailed (its span is not left open) and the transaction is
    broken, retryable, not taken for a cancellation."""

    def slip(result: Any) -> Any:
        raise ValueError("a parser's oversight")

    got: list[Any] = []
    async with qdb_client.open_client("a:1", listeners=[got.append], **EXACT) as client:
        with pytest.raises(TransactionAborted) as aborted:
            async with client.transaction() as tx:
                got.clear()
                with monkeypatch.context() as patch:
                    patch.setattr(ExecuteResult, "from_wire", staticmethod(slip))
                    with pytest.raises(ProtocolError, match="unusable result"):
                        await tx.execute("INSERT INTO t VALUES (1)")
        statement = [e for e in request_events(got) if e.method == "execute"]
        assert [type(e).__name__ for e in statement] == ["RequestStarted", "RequestFailed"]
        assert statement[1].outcome == OutcomeKind.CORRUPT_REPLY.value
        assert aborted.value.retryable
        assert tx.id not in nodes.committed
