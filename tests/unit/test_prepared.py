"""Prepared statements through the client against scripted nodes, in virtual time.

The scripted node keeps one statement table per connection (its session), as
docs/protocol.md section 10.3 says a node does; the real node is tested in
``tests/integration/test_prepared.py``.
"""

from __future__ import annotations

import pytest

import qdb_client
from qdb_client.errors import InvalidArgument
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


class Sessions:
    """Statement ids per scripted connection; every request seen."""

    def __init__(self) -> None:
        self.tables: dict[int, dict[int, str]] = {}
        self.seen: list[dict] = []
        self.forget_next = False

    async def handle(self, node: FakeNode, request: Request) -> None:
        args = dict(request.args)
        self.seen.append({"method": request.method, **args})
        table = self.tables.setdefault(id(node), {})
        if request.method == "prepare":
            await node.reply(
                request, {"stmt": 99, "params": 2, "names": [], "columns": ["id", "name"]}
            )
            return
        if "stmt" in args:
            if self.forget_next or args["stmt"] not in table:
                self.forget_next = False
                await node.fail(request, ErrorCode.UNPREPARED, "no such statement")
                return
            sql = table[args["stmt"]]
        else:
            sql = args["sql"]
        result: dict = (
            {"columns": ["id", "name"], "rows": [[1, sql]]}
            if request.method == "query"
            else {"rows_affected": 1, "last_insert_id": None}
        )
        if args.get("prepare"):
            stmt_id = len(table) + 1
            table[stmt_id] = sql
            result["stmt"] = stmt_id
        await node.reply(request, result)


@pytest.fixture
def sessions(network: FakeNetwork) -> Sessions:
    state = Sessions()
    network.handlers["a:1"] = state.handle
    return state


async def test_the_text_goes_once_per_connection_then_the_id(
    network: FakeNetwork, sessions, autojump_clock
):
    sql = "SELECT id, name FROM users WHERE id = ? AND name = ?"
    async with qdb_client.open_client("a:1", **EXACT) as client:
        stmt = await client.prepare(sql)
        assert (stmt.params, stmt.names, stmt.columns) == (2, (), ("id", "name"))
        for _ in range(3):
            assert (await stmt.query([1, "ada"])).first() == (1, sql)
        sent = [r for r in sessions.seen if r["method"] == "query"]
        assert sent[0]["sql"] == sql and sent[0]["prepare"] is True
        assert [r.get("stmt") for r in sent[1:]] == [1, 1] and "sql" not in sent[1]
        # A new connection (another session): the text goes again there.
        await network.nodes_at("a:1")[0].stream.aclose()
        await stmt.query([1, "ada"])
        assert sessions.seen[-1]["sql"] == sql


async def test_an_id_the_node_forgot_is_prepared_again_at_once(sessions, autojump_clock):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        stmt = await client.prepare("INSERT INTO t VALUES (?, ?)")
        await stmt.execute([1, 2])
        sessions.forget_next = True
        await stmt.execute([3, 4])
        last = [r for r in sessions.seen if r["method"] == "execute"][-2:]
        assert "stmt" in last[0] and last[1]["prepare"] is True
        stats = client.statistics()
        assert stats["retries"] == 0 and stats["requeues"] == 1


async def test_wrong_parameters_fail_before_anything_is_sent(sessions, autojump_clock):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        stmt = await client.prepare("INSERT INTO t VALUES (?, ?)")
        before = len(sessions.seen)
        with pytest.raises(InvalidArgument, match="2 positional"):
            await stmt.execute([1])
        with pytest.raises(InvalidArgument, match="named"):
            await stmt.execute({"a": 1, "b": 2})
        assert len(sessions.seen) == before
