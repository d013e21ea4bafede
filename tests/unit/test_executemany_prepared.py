"""executemany, prepared statements and typed values through the client, in virtual time.

Review 10's findings, as the driver now behaves: chunked executemany (rows too
many for one frame) converts each row to its wire form once, so Json and time
values work; it checks the idempotency key and commits with the caller's key;
the chunking decision uses the smaller of our max_frame_size and every
connected node's WELCOME max_frame; executemany and prepare replies are
parsed inside the pipeline, so a malformed one is a corrupted reply (retried,
and for executemany maybe applied); PreparedStatement methods checkpoint when
they refuse their parameters, and take an empty list or map for a
parameterless statement; Json nested too deep and expect_rows above 2**64-1
are InvalidArgument before anything is sent; a prepare reply whose names
don't match its parameter count, or repeat or are empty, is a ProtocolError.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client import Json
from qdb_client.errors import InvalidArgument, ProtocolError, RetryExhausted
from qdb_client.protocol import Request, decode_body, encode_body
from qdb_client.values import prepare_params

from . import fake_peer
from .fake_network import FakeNetwork
from .fake_peer import FakeNode
from .test_transactions import EXACT, TxNodes

INSERT = "INSERT INTO t VALUES (?, ?)"
INSERT3 = "INSERT INTO t VALUES (?, ?, ?)"


async def prepare_parameterless(node: FakeNode, request: Request) -> bool:
    await node.reply(request, {"params": 0, "names": [], "columns": None})
    return True


@pytest.fixture
def nodes(network: FakeNetwork) -> TxNodes:
    state = TxNodes()
    state.hooks["prepare"] = prepare_parameterless
    network.handlers["a:1"] = state.handle
    return state


def sent(nodes: TxNodes, method: str | None = None) -> list[Request]:
    """The requests the nodes were sent (those of ``method``)."""
    return [r for _, r in nodes.seen if method in (None, r.method)]


def wire_rows(rows: list[list[Any]]) -> list[Any]:
    """The rows as a node decodes them, converted once."""
    return decode_body(encode_body({"rows": [prepare_params(row) for row in rows]}))["rows"]


def deep(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


# ------------------------------------------------ 8, 9, 10: chunked executemany


@pytest.mark.parametrize(
    "value",
    [
        lambda n: Json({"n": n, "pad": "x" * 100}),
        lambda n: datetime.time(12, n % 60, n % 60, 1000 * n),
    ],
    ids=["json", "time"],
)
async def test_chunked_executemany_sends_typed_values_converted_once(nodes, autojump_clock, value):
    rows = [[n, value(n), "x" * 100] for n in range(300)]
    async with qdb_client.open_client("a:1", max_frame_size=8192, **EXACT) as client:
        assert await client.executemany(INSERT3, rows) == 300
        (committed,) = nodes.committed.values()
        assert len(committed) > 1  # in chunks, in one transaction
        assert [row for r in committed for row in r.args["rows"]] == wire_rows(rows)


async def test_chunked_executemany_checks_the_key_and_commits_with_it(nodes, autojump_clock):
    rows = [[f"row-{n}-" + "x" * 100, n] for n in range(300)]
    async with qdb_client.open_client("a:1", max_frame_size=8192, **EXACT) as client:
        for bad in ("bad key!", "", "k" * 129, 42):
            with pytest.raises(InvalidArgument, match="idempotency_key"):
                await client.executemany(INSERT, rows, idempotency_key=bad)
        assert sent(nodes) == []  # refused before anything was sent
        assert await client.executemany(INSERT, rows, idempotency_key="order-42") == 300
        (commit,) = sent(nodes, "commit")
        assert commit.idempotency_key == "order-42"
        assert nodes.keys == {"order-42": commit.args["tx"]}
        assert len(nodes.committed[commit.args["tx"]]) > 1


async def test_executemany_chunks_to_the_smallest_frame_a_node_accepts(
    nodes, autojump_clock, monkeypatch
):
    node_limit = 64 * 1024
    welcome = fake_peer.Welcome

    def small_welcome(**fields: Any) -> Any:
        return welcome(**{**fields, "max_frame_size": node_limit})

    monkeypatch.setattr(fake_peer, "Welcome", small_welcome)
    rows = [[f"row-{n}-" + "x" * 100, n] for n in range(2000)]  # about 230 KB
    async with qdb_client.open_client("a:1", **EXACT) as client:  # ours: 1 MiB
        assert await client.executemany(INSERT, rows) == 2000
        chunks = sent(nodes, "executemany")
        assert len(chunks) > 1 and all("tx" in r.args for r in chunks)
        assert all(len(encode_body(dict(r.args))) < node_limit for r in chunks)
        assert sum(len(r.args["rows"]) for r in chunks) == 2000
        assert len(nodes.committed) == 1


# ------------------------------------------------ 11: replies parsed in the pipeline


async def test_a_malformed_executemany_reply_is_a_corrupted_one(network, autojump_clock):
    seen: list[Request] = []

    async def malformed(node: FakeNode, request: Request) -> None:
        seen.append(request)
        await node.reply(request, {"rows_affected": "lots"})

    network.handlers["a:1"] = malformed
    async with qdb_client.open_client("a:1", max_retries=2, **EXACT) as client:
        with pytest.raises(RetryExhausted) as info:
            await client.executemany(INSERT, [[1, 2], [3, 4]])
        error = info.value
        assert isinstance(error.last_error, ProtocolError)
        assert (error.maybe_applied, error.request_sent) == (True, True)
        assert len(seen) == len(error.attempts) == 3
        assert {r.idempotency_key for r in seen} == {error.idempotency_key} != {None}


async def test_a_malformed_executemany_reply_is_retried_with_its_key(network, autojump_clock):
    seen: list[Request] = []

    async def malformed_once(node: FakeNode, request: Request) -> None:
        seen.append(request)
        result = {"rows_affected": 2} if len(seen) > 1 else {"rows_affected": -1}
        await node.reply(request, result)

    network.handlers["a:1"] = malformed_once
    async with qdb_client.open_client("a:1", **EXACT) as client:
        assert await client.executemany(INSERT, [[1, 2], [3, 4]], idempotency_key="em-1") == 2
        assert [r.idempotency_key for r in seen] == ["em-1", "em-1"]
        assert client.statistics()["retries"] == 1


async def test_a_malformed_prepare_reply_is_retried(network, autojump_clock):
    replies: list[Any] = [{"params": "two"}, {"params": 2, "names": ["a", "b"], "columns": ["x"]}]

    async def prepare(node: FakeNode, request: Request) -> None:
        await node.reply(request, replies.pop(0))

    network.handlers["a:1"] = prepare
    async with qdb_client.open_client("a:1", **EXACT) as client:
        statement = await client.prepare("SELECT :a, :b")
        assert (statement.params, statement.names, statement.columns) == (2, ("a", "b"), ("x",))
        assert replies == [] and client.statistics()["retries"] == 1


# ------------------------------------------------ 23, 18: prepared statements


def answer_prepare(reply: Any, seen: list[dict[str, Any]] | None = None):
    async def handler(node: FakeNode, request: Request) -> None:
        if seen is not None:
            seen.append({"method": request.method, **request.args})
        if request.method == "prepare":
            await node.reply(request, reply)
        else:
            await node.reply(request, {"rows_affected": 0, "last_insert_id": None, "stmt": 5})

    return handler


@pytest.mark.parametrize(
    "reply",
    [
        {"params": 2, "names": ["a"]},  # one name for two parameters
        {"params": 1, "names": ["a", "b"]},
        {"params": 2, "names": ["a", "a"]},  # a name twice
        {"params": 1, "names": [""]},  # an empty name
        {"params": 1, "names": [1]},
        {"params": 1, "names": "a"},
        {"params": -1},
        {"params": 2**70},
        {"params": True},
        {"params": 1.0},
        {"params": 1, "columns": [None]},
        None,
        [],
        "x",
    ],
)
async def test_a_prepare_reply_that_does_not_add_up_is_a_protocol_error(
    network, autojump_clock, reply
):
    seen: list[dict[str, Any]] = []
    network.handlers["a:1"] = answer_prepare(reply, seen)
    async with qdb_client.open_client("a:1", max_retries=1, **EXACT) as client:
        with pytest.raises(RetryExhausted) as info:
            await client.prepare("SELECT :a, :b")
        assert isinstance(info.value.last_error, ProtocolError)
        assert "malformed prepare result" in str(info.value.last_error)
        assert info.value.maybe_applied is False
        assert [r["method"] for r in seen] == ["prepare", "prepare"]


async def test_a_parameterless_statement_takes_an_empty_list_or_map(network, autojump_clock):
    seen: list[dict[str, Any]] = []
    network.handlers["a:1"] = answer_prepare({"params": 0, "names": [], "columns": None}, seen)
    async with qdb_client.open_client("a:1", **EXACT) as client:
        statement = await client.prepare("DELETE FROM t")
        for params in (None, [], (), {}):
            await statement.execute(params)
        executes = [r for r in seen if r["method"] == "execute"]
        assert len(executes) == 4 and not any("params" in r for r in executes)
        with pytest.raises(InvalidArgument, match="0 positional"):
            await statement.execute([1])


async def test_prepared_statement_methods_checkpoint_when_refusing_parameters(
    network, autojump_clock
):
    network.handlers["a:1"] = answer_prepare({"params": 2, "names": [], "columns": None})
    async with qdb_client.open_client("a:1", **EXACT) as client:
        statement = await client.prepare(INSERT)
        calls = [
            lambda: statement.execute([1]),
            lambda: statement.execute({"a": 1, "b": 2}),
            lambda: statement.execute([1, 2], expect_rows=-1),
            lambda: statement.query([1, 2, 3]),
            lambda: statement.query([1, object()]),
        ]
        for call in calls:
            with trio.testing.assert_checkpoints(), pytest.raises(InvalidArgument):
                await call()


# ------------------------------------------------ 21, 22: values and expect_rows


def test_json_nested_too_deep_is_invalid_argument_not_recursion_error():
    with pytest.raises(InvalidArgument, match="no JSON form"):
        prepare_params([Json(deep(100_000))])


async def test_json_nested_too_deep_is_refused_before_sending(nodes, autojump_clock):
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(InvalidArgument, match="no JSON form"):
            await client.execute("INSERT INTO t VALUES (?)", [Json(deep(100_000))])
        with pytest.raises(InvalidArgument, match="row 1"):
            await client.executemany("INSERT INTO t VALUES (?)", [[1], [Json(deep(100_000))]])
        assert sent(nodes) == []


async def test_expect_rows_above_u64_is_refused_before_sending(nodes, autojump_clock):
    too_many = 2**64
    async with qdb_client.open_client("a:1", **EXACT) as client:
        with pytest.raises(InvalidArgument, match="expect_rows") as info:
            await client.execute("UPDATE t SET v = 1", expect_rows=too_many)
        assert info.value.attempts == () and sent(nodes) == []
        async with client.transaction() as tx:
            with pytest.raises(InvalidArgument, match="expect_rows"):
                await tx.execute("UPDATE t SET v = 1", expect_rows=too_many)
        assert [r.method for r in sent(nodes)] == ["begin", "commit"]
        await client.execute("UPDATE t SET v = 1", expect_rows=too_many - 1)
        assert sent(nodes)[-1].args["expect_rows"] == too_many - 1
        statement = await client.prepare("UPDATE t SET v = 1")
        with pytest.raises(InvalidArgument, match="expect_rows"):
            await statement.execute(expect_rows=too_many)
