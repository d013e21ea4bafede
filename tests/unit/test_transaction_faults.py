"""Transaction faults through the client against scripted nodes, in virtual time.

Review 10's findings, as the driver now behaves: a statement whose outcome is
unknown (cancelled after it was sent, timed out, corrupted reply) breaks the
transaction; commit failures are told apart (refused and not applied, not
written at all, written with the reply lost or unusable: asked again with the
same key and answered from the stored outcome); run_in_transaction's timeout
bounds the commit; GOAWAY before the commit is retryable; one transaction is
used by one task at a time; nesting is refused per client only; a remembered
write conflict keeps its class; errors say whether they were sent; the
transaction's timeout bounds the pool lease; statements count in the
bulkhead; TransactionEnded events and statistics()["transactions"]; the
methods checkpoint when they refuse their arguments.

The scripted nodes are tests/unit/test_transactions.py's ``TxNodes``, staged
through its hooks.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client import events as qdb_events
from qdb_client.errors import (
    BulkheadFull,
    ConstraintViolation,
    InvalidArgument,
    MessageError,
    OutcomeUnknown,
    QdbError,
    RequestTimeout,
    SqlError,
    TransactionAborted,
    WriteConflict,
)
from qdb_client.protocol import ErrorCode, GoAway, Request, Response, encode_message

from .fake_network import FakeNetwork
from .fake_peer import FakeNode
from .test_transactions import EXACT, Hook, TxNodes


async def corrupted_reply(node: FakeNode, request: Request, result: Any) -> None:
    frame = bytearray(encode_message(Response(request.request_id, result)))
    frame[-1] ^= 0xFF  # the body's last byte: the frame arrives, its CBOR is bad
    await node.send_raw(bytes(frame))


def first_only(hook: Hook) -> Hook:
    """``hook`` for the first request it sees; the ordinary node afterwards."""
    used = []

    async def once(node: FakeNode, request: Request) -> bool:
        if used:
            return False
        used.append(request)
        return await hook(node, request)

    return once


@pytest.fixture
def nodes(network: FakeNetwork) -> TxNodes:
    state = TxNodes()
    for address in ("a:1", "b:2"):
        network.handlers[address] = state.handle
    return state


def tx_stats(client: qdb_client.Client) -> dict[str, int]:
    return client.statistics()["transactions"]


def counted(**nonzero: int) -> dict[str, int]:
    """statistics()["transactions"] with these counts, the others 0."""
    names = ("aborted", "begun", "commits_recovered", "committed", "outcome_unknown")
    return {name: 0 for name in (*names, "rolled_back")} | nonzero


def facts(error: QdbError) -> tuple[bool, bool, bool]:
    return (error.retryable, error.maybe_applied, error.request_sent)


# ------------------------------------------------ 1: unknown statement outcomes


@pytest.mark.parametrize("fault", ["cancelled", "timed out", "corrupted"])
async def test_a_statement_of_unknown_outcome_aborts_the_transaction(nodes, autojump_clock, fault):
    async def corrupt(node: FakeNode, request: Request) -> bool:
        nodes.open[request.args["tx"]].append(request)  # it ran; its reply is lost
        await corrupted_reply(node, request, {"rows_affected": 1, "last_insert_id": None})
        return True

    if fault == "corrupted":
        nodes.hooks["execute"] = corrupt
    else:
        nodes.statement_delay = 1.0  # the node runs it anyway
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(TransactionAborted) as info:
            async with client.transaction() as tx:
                if fault == "cancelled":
                    with trio.move_on_after(0.5) as scope:
                        await tx.execute("UPDATE t SET v = v + 1")
                    assert scope.cancelled_caught
                else:
                    raised = RequestTimeout if fault == "timed out" else MessageError
                    with pytest.raises(raised) as statement:
                        await tx.execute("UPDATE t SET v = v + 1", timeout=0.5)
                    assert facts(statement.value)[1:] == (False, True)
                # The transaction can't be trusted: later statements are refused.
                with pytest.raises(TransactionAborted) as later:
                    await tx.execute("INSERT INTO t VALUES (2)")
        assert facts(later.value)[1:] == (False, False)
        assert facts(info.value) == (fault != "cancelled", False, False)
        if fault == "cancelled":
            assert "cancelled after it was sent" in str(info.value)
        assert nodes.methods() == ["begin", "execute", "rollback"]
        assert tx.id not in nodes.committed and nodes.open == {}
        assert tx_stats(client) == counted(begun=1, aborted=1)


# ------------------------------------------------ 2, 20: commit failures


@pytest.mark.parametrize(
    ("code", "raised", "retryable"),
    [
        (ErrorCode.OVERLOADED, TransactionAborted, True),
        (ErrorCode.CONSTRAINT_VIOLATION, ConstraintViolation, False),
    ],
)
async def test_a_commit_refused_unapplied_rolls_back(
    nodes, autojump_clock, code, raised, retryable
):
    async def refuse(node: FakeNode, request: Request) -> bool:
        await node.fail(request, code, "not now", details={"executed": False})
        return True

    nodes.hooks["commit"] = refuse
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(raised) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
        error = info.value
        assert type(error) is raised and error.retryable is retryable
        assert (error.maybe_applied, error.request_sent) == (False, True)
        ((_, commit),) = nodes.commits()
        assert error.idempotency_key == commit.idempotency_key is not None
        assert nodes.methods() == ["begin", "execute", "commit", "rollback"]
        assert nodes.committed == {} and nodes.open == {}


@pytest.mark.parametrize(
    "fault", ["corrupted", "INTERNAL", "malformed", "connection closed", "silence"]
)
async def test_a_commit_whose_reply_is_lost_is_answered_from_the_stored_outcome(
    nodes, autojump_clock, fault
):
    async def commit(node: FakeNode, request: Request) -> bool:
        nodes.store(request)  # it committed; then its reply is lost
        if fault == "corrupted":
            await corrupted_reply(node, request, {"committed": True})
        elif fault == "INTERNAL":
            await node.fail(request, ErrorCode.INTERNAL, "disk hiccup after the commit")
        elif fault == "malformed":
            await node.reply(request, {"committed": False})
        elif fault == "silence":
            while await node.receive() is not None:
                pass  # no reply, until the client gives up on it at half time
        else:
            await node.stream.aclose()
        return True

    nodes.hooks["commit"] = first_only(commit)
    got: list[Any] = []
    async with qdb_client.open_client(["a:1", "b:2"], listeners=[got.append], **EXACT) as client:
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES (1)")
        (first_node, first), (_, ask) = nodes.commits()
        assert ask.idempotency_key == first.idempotency_key
        assert nodes.keys == {first.idempotency_key: tx.id}  # answered from it, applied once
        assert [r.args["sql"] for r in nodes.committed[tx.id]] == ["INSERT INTO t VALUES (1)"]
        await trio.testing.wait_all_tasks_blocked()
        assert first_node.finished  # the connection with the lost reply was closed
        assert tx_stats(client) == counted(begun=1, committed=1, commits_recovered=1)
        ended = [e for e in got if isinstance(e, qdb_events.TransactionEnded)]
        assert [(e.tx, e.outcome) for e in ended] == [(tx.id, "committed")]


@pytest.mark.parametrize(
    "reply", [{"committed": False}, {"committed": 1}, {"rolled_back": True}, "garbage", None, []]
)
async def test_a_commit_reply_other_than_committed_true_is_never_taken_as_committed(
    nodes, autojump_clock, reply
):
    async def answer(node: FakeNode, request: Request) -> bool:
        await node.reply(request, reply)  # to the commit and to every ask
        return True

    nodes.hooks["commit"] = answer
    async with qdb_client.open_client("a:1", request_timeout=2.0, **EXACT) as client:
        with pytest.raises(OutcomeUnknown) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
        error = info.value
        assert (error.maybe_applied, error.request_sent) == (True, True)
        keys = {r.idempotency_key for _, r in nodes.commits()}
        assert keys == {error.idempotency_key} and len(nodes.commits()) > 1
        assert tx_stats(client)["outcome_unknown"] == 1 and tx_stats(client)["committed"] == 0
        assert tx.id not in nodes.committed


async def test_a_lost_commit_the_cluster_did_not_apply_is_transaction_aborted(
    nodes, autojump_clock
):
    async def lost_unapplied(node: FakeNode, request: Request) -> bool:
        nodes.open.pop(request.args["tx"])  # rolled back there, nothing stored
        await node.fail(request, ErrorCode.INTERNAL, "crashed before the commit")
        return True

    nodes.hooks["commit"] = first_only(lost_unapplied)
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        with pytest.raises(TransactionAborted) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
        error = info.value
        assert facts(error) == (True, False, True)
        keys = [r.idempotency_key for _, r in nodes.commits()]
        assert len(keys) == 2 and keys[0] == keys[1] == error.idempotency_key
        assert tx.id not in nodes.committed


async def test_a_commit_nobody_answers_is_asked_again_at_half_time_then_unknown_on_time(
    nodes, autojump_clock
):
    closed: list[float] = []

    async def stall(node: FakeNode, request: Request) -> bool:
        while await node.receive() is not None:
            pass  # no reply; wait for the client to close the connection
        closed.append(trio.current_time())
        return True

    nodes.hooks["commit"] = stall
    async with qdb_client.open_client("a:1", request_timeout=3.0, **EXACT) as client:
        with pytest.raises(OutcomeUnknown) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                exited = trio.current_time()
        assert trio.current_time() - exited == pytest.approx(3.0)
        error = info.value
        assert (error.maybe_applied, error.request_sent) == (True, True)
        # The first wait took half the time; then its connection was closed
        # and the cluster asked with the same key, until the deadline.
        first, ask = nodes.commits()
        assert error.idempotency_key == first[1].idempotency_key == ask[1].idempotency_key
        await trio.testing.wait_all_tasks_blocked()
        assert closed[0] == pytest.approx(exited + 1.5)
        assert client.statistics()["nodes"][0]["connections"]["leased"] == 0


# ------------------------------------------------ 3: run_in_transaction's deadline


@pytest.mark.parametrize("commit_takes", [2.0, None])  # replies late / never
async def test_run_in_transaction_timeout_bounds_the_commit_and_its_ask(
    nodes, autojump_clock, commit_takes
):
    async def slow(node: FakeNode, request: Request) -> bool:
        if commit_takes is None:
            await trio.sleep_forever()
        await trio.sleep(commit_takes)
        return False  # then commits as usual

    nodes.hooks["commit"] = slow

    async def fn(tx) -> str:
        await trio.sleep(0.25)
        await tx.execute("INSERT INTO t VALUES (1)")
        return "ok"

    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        started = trio.current_time()
        with pytest.raises(OutcomeUnknown) as info:
            await client.run_in_transaction(fn, timeout=1.0)
        assert trio.current_time() - started == pytest.approx(1.0)
        assert (info.value.maybe_applied, info.value.request_sent) == (True, True)


# ------------------------------------------------ 6, 7: commits never written


async def test_a_commit_never_written_is_transaction_aborted_not_outcome_unknown(
    network: FakeNetwork, nodes, autojump_clock
):
    async with qdb_client.open_client("a:1", request_timeout=1.0, **EXACT) as client:
        with pytest.raises(TransactionAborted) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                await network.kill("a:1")
                await trio.sleep(0.1)  # the client sees the connection close
        error = info.value
        assert facts(error) == (True, False, False)
        assert "commit" not in nodes.methods() and tx.id not in nodes.committed
        assert tx_stats(client)["aborted"] == 1


async def test_goaway_before_the_commit_is_retryable_and_run_again(
    network: FakeNetwork, nodes, autojump_clock
):
    runs: list[str] = []

    async def fn(tx) -> int:
        runs.append(tx.id)
        await tx.execute("INSERT INTO t VALUES (1)")
        if len(runs) == 1:
            (node,) = [n for n, r in nodes.seen if r.method == "begin"]
            await node.send(GoAway(reason="shutdown", last_request_id=2**32))
            await trio.sleep(0.1)
        return len(runs)

    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        assert await client.run_in_transaction(fn) == 2
        with pytest.raises(TransactionAborted) as info:
            async with client.transaction() as tx:
                begun = [n for n, r in nodes.seen if r.method == "begin"][-1]
                await begun.send(GoAway(reason="shutdown", last_request_id=2**32))
                await trio.sleep(0.1)
        assert (info.value.retryable, info.value.request_sent) == (True, False)
        assert list(nodes.committed) == [runs[1]] and tx.id not in nodes.committed
        assert len(nodes.commits()) == 1


# ------------------------------------------------ 13, 14, 15: use and nesting


async def test_a_second_task_using_the_transaction_meanwhile_is_refused(nodes, autojump_clock):
    refused: list[InvalidArgument] = []
    async with qdb_client.open_client("a:1", **EXACT) as client:
        async with client.transaction() as tx:
            nodes.statement_delay = 1.0

            async def second() -> None:
                try:
                    await tx.execute("INSERT INTO t VALUES (2)")
                except InvalidArgument as exc:
                    refused.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(tx.execute, "INSERT INTO t VALUES (1)")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(second)
            nodes.statement_delay = 0.0
            await tx.execute("INSERT INTO t VALUES (3)")  # not broken by the refusal
        (error,) = refused
        assert "another operation is in progress" in str(error)
        sent = [r.args["sql"] for r in nodes.committed[tx.id]]
        assert sent == ["INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (3)"]


async def test_transactions_of_two_clients_may_be_open_at_once_in_one_task(nodes, autojump_clock):
    async with (
        qdb_client.open_client("a:1", **EXACT) as one,
        qdb_client.open_client("b:2", **EXACT) as two,
    ):
        async with one.transaction() as tx1:
            async with two.transaction() as tx2:
                await tx2.execute("INSERT INTO t VALUES (2)")
                with pytest.raises(InvalidArgument, match="nest"):
                    async with one.transaction():
                        pytest.fail("nested on the same client")
            await tx1.execute("INSERT INTO t VALUES (1)")
        assert set(nodes.committed) == {tx1.id, tx2.id}


async def test_a_task_started_inside_a_transaction_block_opens_its_own(nodes, autojump_clock):
    """trio copies the context into tasks started in the block: they are other
    tasks all the same, with transactions of their own, during the parent's
    transaction and after it; nesting inside the child's is still refused."""
    parent_done = trio.Event()
    own_ids: list[str] = []

    async with qdb_client.open_client("a:1", **EXACT) as client:

        async def worker(after_the_parent: bool) -> None:
            if after_the_parent:
                await parent_done.wait()
            async with client.transaction() as own:
                await own.execute("INSERT INTO t VALUES (2)")
                with pytest.raises(InvalidArgument, match="nest"):
                    async with client.transaction():
                        pytest.fail("nested in the child's own transaction")
            own_ids.append(own.id)

        async with trio.open_nursery() as nursery:
            async with client.transaction() as tx:
                nursery.start_soon(worker, False)
                nursery.start_soon(worker, True)
                await trio.testing.wait_all_tasks_blocked()
                await tx.execute("INSERT INTO t VALUES (1)")
            parent_done.set()
        assert len(own_ids) == 2
        assert set(nodes.committed) == {tx.id, *own_ids}


async def test_a_begin_sent_and_never_answered_says_it_was_sent(nodes, autojump_clock):
    """The transaction's one budget covers select, lease and begin: when it runs
    out after the begin was written, the error says so, and the connection
    (which may hold a transaction on the node) is closed."""

    async def silent(node: FakeNode, request: Request) -> bool:
        return True  # never answers

    nodes.hooks["begin"] = first_only(silent)
    async with qdb_client.open_client("a:1", **EXACT) as client:
        started = trio.current_time()
        with pytest.raises(RequestTimeout) as info:
            async with client.transaction(timeout=1.0):
                pytest.fail("the begin was never answered")
        assert trio.current_time() - started == pytest.approx(1.0)
        assert facts(info.value)[1:] == (False, True)
        assert "begin on a:1 did not complete within 1 s" in str(info.value)
        (begun_on,) = [n for n, r in nodes.seen if r.method == "begin"]
        await trio.testing.wait_all_tasks_blocked()
        assert begun_on.finished
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES (1)")
        assert tx.id in nodes.committed


async def test_a_write_conflict_caught_in_the_block_comes_out_as_itself(nodes, autojump_clock):
    nodes.conflicts = 1
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(WriteConflict) as info:
            async with client.transaction() as tx:
                with pytest.raises(WriteConflict):
                    await tx.execute("UPDATE accounts SET n = n - 1")
                with pytest.raises(WriteConflict) as again:
                    await tx.execute("UPDATE accounts SET n = n + 1")
        for error in (again.value, info.value):
            assert type(error) is WriteConflict and error.name == "WRITE_CONFLICT"
            assert facts(error) == (True, False, False)
            assert error.message == "write lock held"
        assert tx.id not in nodes.committed and "commit" not in nodes.methods()


# ------------------------------------------------ 16, 17: facts and bounds


async def test_errors_of_begin_statements_and_commit_say_they_were_sent(nodes, autojump_clock):
    async def overloaded(node: FakeNode, request: Request) -> bool:
        await node.fail(request, ErrorCode.OVERLOADED, "busy")
        return True

    async with qdb_client.open_client("a:1", **EXACT) as client:
        async with client.transaction() as tx:
            with pytest.raises(SqlError) as statement:
                await tx.execute("fail please")
        nodes.hooks["begin"] = first_only(overloaded)
        with pytest.raises(QdbError) as begin:
            async with client.transaction():
                pytest.fail("must not begin")
        for error in (statement.value, begin.value):
            assert (error.request_sent, error.maybe_applied) == (True, False)
        assert begin.value.name == "OVERLOADED"
        assert tx.id in nodes.committed


@pytest.mark.parametrize("waiting_for", ["the leased connection", "a connect", "a node"])
async def test_transaction_timeout_bounds_node_selection_and_the_lease(
    network: FakeNetwork, nodes, autojump_clock, waiting_for
):
    async with qdb_client.open_client("a:1", max_connections=1, **EXACT) as client:
        release = trio.Event()

        async def holder(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with client.transaction():
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery:
            if waiting_for == "the leased connection":
                await nursery.start(holder)
            elif waiting_for == "a connect":
                await network.kill("a:1")
                network.handlers["a:1"] = "hang"  # reconnecting never completes
                await trio.sleep(0.01)
            else:
                client.mark_node_unhealthy("a:1")
            started = trio.current_time()
            with pytest.raises(RequestTimeout) as info:
                async with client.transaction(timeout=0.5):
                    pytest.fail("no connection was free")
            took = trio.current_time() - started
            release.set()
        assert took == pytest.approx(0.5)
        assert facts(info.value)[1:] == (False, False)
        assert nodes.methods().count("begin") == (waiting_for == "the leased connection")


# ------------------------------------------------ 19: bulkhead, events, statistics


async def test_transaction_statements_count_in_the_bulkhead(nodes, autojump_clock):
    release = trio.Event()

    async def hold(node: FakeNode, request: Request) -> bool:
        if "tx" in request.args:
            return False
        await release.wait()
        await node.reply(request, {"columns": [], "rows": []})
        return True

    nodes.hooks["query"] = hold
    async with qdb_client.open_client("a:1", max_concurrent_requests=1, **EXACT) as client:
        async with client.transaction() as tx:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.query, "SELECT 1")  # takes the one place
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(BulkheadFull):
                    await tx.execute("INSERT INTO t VALUES (1)")
                release.set()
            nodes.statement_delay = 1.0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tx.execute, "INSERT INTO t VALUES (2)")
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(BulkheadFull):
                    await client.query("SELECT 2")
        assert [r.args["sql"] for r in nodes.committed[tx.id]] == ["INSERT INTO t VALUES (2)"]


async def test_every_transaction_ending_is_an_event_and_counted(
    network: FakeNetwork, nodes, autojump_clock
):
    got: list[Any] = []
    async with qdb_client.open_client(
        "a:1", request_timeout=1.0, listeners=[got.append], **EXACT
    ) as client:
        async with client.transaction() as committed:
            await trio.sleep(0.25)
        with pytest.raises(KeyError):
            async with client.transaction() as rolled_back:
                await trio.sleep(0.5)
                raise KeyError("application bug")
        with pytest.raises(TransactionAborted):
            async with client.transaction() as aborted:
                nodes.open.pop(aborted.id)  # the node rolled it back
        nodes.lose_commit_reply = True
        with pytest.raises(OutcomeUnknown):
            async with client.transaction() as unknown:
                await unknown.execute("INSERT INTO t VALUES (1)")
                network.handlers["a:1"] = "refuse"
        ended = [e for e in got if isinstance(e, qdb_events.TransactionEnded)]
        assert [(e.tx, e.node, e.outcome) for e in ended] == [
            (committed.id, "a:1", "committed"),
            (rolled_back.id, "a:1", "rolled back"),
            (aborted.id, "a:1", "aborted"),
            (unknown.id, "a:1", "outcome unknown"),
        ]
        # The last: asked again until the commit's deadline (request_timeout) passed.
        assert [e.duration for e in ended] == pytest.approx([0.25, 0.5, 0.0, 1.0])
        assert tx_stats(client) == counted(
            begun=4, committed=1, rolled_back=1, aborted=1, outcome_unknown=1
        )


# ------------------------------------------------ 18: checkpoints


async def test_transaction_methods_checkpoint_when_they_refuse_their_arguments(
    nodes, autojump_clock
):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        async with client.transaction() as tx:
            calls = [
                lambda: tx.execute(1),
                lambda: tx.execute("UPDATE t SET v = 1", expect_rows=-1),
                lambda: tx.query(None),
                lambda: tx.batch("not a list"),
                lambda: tx.executemany("INSERT INTO t VALUES (?)", None),
            ]
            for call in calls:
                with trio.testing.assert_checkpoints(), pytest.raises(InvalidArgument):
                    await call()
        with trio.testing.assert_checkpoints(), pytest.raises(InvalidArgument):
            await client.run_in_transaction(pytest.fail, retries=-1)
        with trio.testing.assert_checkpoints(), pytest.raises(InvalidArgument, match="over"):
            await tx.execute("SELECT 1")
