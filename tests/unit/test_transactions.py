"""Transactions through the client against scripted nodes, in virtual time.

``TxNodes`` plays the node side of docs/protocol.md section 10.2 well enough
to stage every path: begin, statements with ``tx``, commit (keyed, its
outcome stored cluster-wide), rollback, a lost connection, a lost commit
reply, write conflicts. The real node's behaviour is tested in
``tests/integration/test_transactions.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import (
    InvalidArgument,
    OutcomeUnknown,
    SqlError,
    TransactionAborted,
    WriteConflict,
)
from qdb_client.protocol import ErrorCode, Request

from .fake_network import FakeNetwork
from .fake_peer import FakeNode

EXACT = {
    "retry_jitter": "none",
    "reconnect_jitter": 0.0,
    "slow_start": 0.0,
    "random_seed": 7,
    "heartbeat_interval": 1000.0,
}


#: A per-method hook of TxNodes: True when it answered the request itself.
Hook = Callable[[FakeNode, Request], Awaitable[bool]]


class TxNodes:
    """Transactions of every scripted node; commits stored under their keys."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.open: dict[str, list[Request]] = {}
        self.committed: dict[str, list[Request]] = {}
        self.keys: dict[str, str] = {}  # idempotency key -> tx id committed under it
        self.log: list[tuple[str, str]] = []
        #: Set to make the next commit's reply be lost (connection dropped after commit).
        self.lose_commit_reply = False
        #: Write conflicts to answer before letting statements through.
        self.conflicts = 0
        #: Statements whose SQL contains this fail with SQL_ERROR.
        self.failing_sql = "fail"
        #: method -> hook(node, request), run first (see Hook).
        self.hooks: dict[str, Hook] = {}
        #: Seconds every statement of a transaction takes on the node.
        self.statement_delay = 0.0
        #: (scripted node, request) of every request, in arrival order.
        self.seen: list[tuple[FakeNode, Request]] = []

    def methods(self) -> list[str]:
        return [method for method, _ in self.log]

    def commits(self) -> list[tuple[FakeNode, Request]]:
        return [(n, r) for n, r in self.seen if r.method == "commit"]

    def store(self, request: Request) -> None:
        """Commit ``request``'s transaction and store its outcome under its key."""
        tx = request.args["tx"]
        self.committed[tx] = self.open.pop(tx)
        self.keys[request.idempotency_key] = tx

    async def handle(self, node: FakeNode, request: Request) -> None:
        self.seen.append((node, request))
        self.log.append((request.method, request.args.get("tx", "")))
        try:
            hook = self.hooks.get(request.method)
            if hook is None or not await hook(node, request):
                await self._answer(node, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client closed the connection meanwhile

    async def _answer(self, node: FakeNode, request: Request) -> None:
        args = request.args
        method = request.method
        if method == "begin":
            tx = f"tx-{next(self.ids)}"
            self.open[tx] = []
            await node.reply(request, {"tx": tx})
        elif method in ("execute", "query", "batch", "executemany") and "tx" in args:
            tx = args["tx"]
            if self.statement_delay:
                await trio.sleep(self.statement_delay)
            if tx not in self.open:
                await node.fail(request, ErrorCode.TX_ABORTED, "no such transaction")
            elif self.conflicts:
                self.conflicts -= 1
                del self.open[tx]
                await node.fail(request, ErrorCode.WRITE_CONFLICT, "write lock held")
            elif self.failing_sql in str(args.get("sql", "")):
                await node.fail(request, ErrorCode.SQL_ERROR, "bad statement")
            else:
                self.open[tx].append(request)
                if method == "query":
                    await node.reply(request, {"columns": ["n"], "rows": [[len(self.open[tx])]]})
                elif method == "executemany":
                    await node.reply(request, {"rows_affected": len(args["rows"])})
                else:
                    await node.reply(request, {"rows_affected": 1, "last_insert_id": None})
        elif method == "commit":
            key = request.idempotency_key
            tx = args["tx"]
            if key in self.keys:
                await node.reply(request, {"committed": True})  # the stored outcome
            elif tx in self.open:
                self.committed[tx] = self.open.pop(tx)
                self.keys[key] = tx
                if self.lose_commit_reply:
                    self.lose_commit_reply = False
                    await node.stream.aclose()
                    return
                await node.reply(request, {"committed": True})
            else:
                await node.fail(
                    request, ErrorCode.TX_ABORTED, "rolled back", details={"executed": False}
                )
        elif method == "rollback":
            self.open.pop(args["tx"], None)
            await node.reply(request, {"rolled_back": True})
        else:
            await node.reply(request, {"rows_affected": 0, "last_insert_id": None})


@pytest.fixture
def nodes(network: FakeNetwork) -> TxNodes:
    state = TxNodes()
    for address in ("a:1", "b:2"):
        network.handlers[address] = state.handle
    return state


async def test_statements_run_in_the_transaction_and_the_block_commits(nodes, autojump_clock):
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES (1)")
            assert (await tx.query("SELECT count(*) FROM t")).scalar() == 2
            assert await tx.executemany("INSERT INTO t VALUES (?)", [[2], [3]]) == 2
        assert tx.id in nodes.committed and len(nodes.committed[tx.id]) == 3
        commit = [r for r in nodes.log if r[0] == "commit"]
        assert commit == [("commit", tx.id)]
        assert list(nodes.keys.values()) == [tx.id]  # committed with an idempotency key


async def test_an_exception_in_the_block_rolls_back_and_comes_out_as_itself(nodes, autojump_clock):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(KeyError):
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                raise KeyError("application bug")
        assert ("rollback", tx.id) in nodes.log and tx.id not in nodes.committed


async def test_a_cancelled_block_rolls_back_shielded(nodes, autojump_clock):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with trio.move_on_after(1.0):
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                await trio.sleep_forever()
        assert ("rollback", tx.id) in nodes.log and not nodes.open


async def test_a_failed_statement_does_not_end_the_transaction(nodes, autojump_clock):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        async with client.transaction() as tx:
            with pytest.raises(SqlError) as info:
                await tx.execute("fail please")
            assert not info.value.maybe_applied
            await tx.execute("INSERT INTO t VALUES (1)")
        assert len(nodes.committed[tx.id]) == 1


async def test_a_lost_connection_aborts_the_transaction_retryably(
    network: FakeNetwork, nodes, autojump_clock
):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(TransactionAborted) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                await network.nodes_at("a:1")[-1].stream.aclose()
                await tx.execute("INSERT INTO t VALUES (2)")
        assert info.value.retryable and not info.value.maybe_applied
        assert "lost" in str(info.value)
        assert tx.id not in nodes.committed


async def test_a_lost_commit_reply_is_answered_from_the_stored_outcome(
    network: FakeNetwork, nodes, autojump_clock
):
    """The commit's reply is lost after it committed: the commit is asked again
    with its key (on any node) and answered from the stored outcome: no error,
    applied once."""
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        nodes.lose_commit_reply = True
        async with client.transaction() as tx:
            await tx.execute("INSERT INTO t VALUES (1)")
        commits = [r for r in nodes.log if r[0] == "commit"]
        assert len(commits) == 2 and len(nodes.committed) == 1


async def test_a_commit_the_cluster_rolled_back_is_transaction_aborted(
    network: FakeNetwork, nodes, autojump_clock
):
    async with qdb_client.open_client(["a:1", "b:2"], **EXACT) as client:
        with pytest.raises(TransactionAborted) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                nodes.open.pop(tx.id)  # the node rolled it back (idle timeout, say)
        assert not info.value.maybe_applied and info.value.executed is False


async def test_a_commit_no_node_can_answer_is_outcome_unknown_with_its_key(
    network: FakeNetwork, nodes, autojump_clock
):
    async with qdb_client.open_client("a:1", request_timeout=1.0, **EXACT) as client:
        nodes.lose_commit_reply = True
        with pytest.raises(OutcomeUnknown) as info:
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO t VALUES (1)")
                network.handlers["a:1"] = "refuse"  # the node goes away with the reply
        error = info.value
        assert error.maybe_applied and error.request_sent
        assert nodes.keys[error.idempotency_key] == tx.id


async def test_transactions_do_not_nest(nodes, autojump_clock):
    async with qdb_client.open_client("a:1", **EXACT) as client, client.transaction():
        with pytest.raises(InvalidArgument, match="nest"):
            async with client.transaction():
                pytest.fail("a nested transaction must not begin")


async def test_run_in_transaction_runs_again_after_a_write_conflict(nodes, autojump_clock):
    runs = 0

    async def transfer(tx) -> str:
        nonlocal runs
        runs += 1
        await tx.execute("UPDATE accounts SET n = n - 1 WHERE id = 1")
        return "done"

    async with qdb_client.open_client("a:1", **EXACT) as client:
        nodes.conflicts = 2
        started = trio.current_time()
        assert await client.run_in_transaction(transfer) == "done"
        assert runs == 3 and len(nodes.committed) == 1
        assert trio.current_time() - started == pytest.approx(0.1 + 0.2)  # the backoff
        nodes.conflicts = 5
        with pytest.raises(WriteConflict):
            await client.run_in_transaction(transfer, retries=1)


async def test_executemany_too_big_for_one_frame_goes_in_chunks_in_one_transaction(
    nodes, autojump_clock
):
    async with qdb_client.open_client("a:1", max_frame_size=8192, **EXACT) as client:
        rows = [[f"row-{n}-" + "x" * 100] for n in range(300)]
        assert await client.executemany("INSERT INTO t VALUES (?)", rows) == 300
        (committed,) = nodes.committed.values()
        assert len(committed) > 1 and sum(len(r.args["rows"]) for r in committed) == 300
