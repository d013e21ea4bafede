"""Table subscriptions against real nodes (docs/protocol.md section 13.1), and
seed 004's bidirectional sync test.

Two in-process nodes on one database: changes committed through either node
reach a subscription on either node, in commit order, once each; a
subscription survives the loss of its node; the log's trimming is a typed gap.
"""

from __future__ import annotations

import time

import pytest
import trio

import qdb_client
from qdb_client.errors import InvalidRequest, SubscriptionGap
from qdb_client.protocol import Cancel, Error, Event, Response
from qdb_client.testing import TestCluster
from qdb_client.testing.feeds import node_feeds

from ..common.raw_client import raw_client

pytestmark = pytest.mark.slow

CLIENT = dict(
    heartbeat_interval=0.5,
    ping_timeout=0.5,
    reconnect_initial=0.1,
    reconnect_max=0.5,
    slow_start=0.0,
    retry_jitter="none",
)


async def test_seed_004_bidirectional_sync_every_event_once_across_a_node_kill(tmp_path):
    async with (
        TestCluster.start_in_process(2, directory=tmp_path / "c") as cluster,
        qdb_client.open_client(cluster.addresses, **CLIENT) as subscriber,
        qdb_client.open_client(cluster.addresses, **CLIENT) as writer,
    ):
        await writer.execute(
            "CREATE TABLE tasks (id INTEGER PRIMARY KEY, content TEXT, status TEXT)"
        )
        async with subscriber.subscribe("tasks") as events:
            # The create, then the update, in order, with the right ids, within 2 s.
            created = await writer.execute(
                "INSERT INTO tasks (content, status) VALUES (?, 'pending')", ["Test task for sync"]
            )
            task = created.last_insert_id
            with trio.fail_after(2.0):
                insert = await events.__anext__()
            assert (insert.kind, insert.table, insert.key) == ("insert", "tasks", task)
            assert insert.row == {"id": task, "content": "Test task for sync", "status": "pending"}
            await writer.execute("UPDATE tasks SET status = 'in_progress' WHERE id = ?", [task])
            with trio.fail_after(2.0):
                update = await events.__anext__()
            assert (update.kind, update.key, update.row["status"]) == (
                "update",
                task,
                "in_progress",
            )
            assert update.event_id > insert.event_id

            # Mid-way, the subscriber's node is killed: every event still comes, once.
            expected: list[tuple[str, int]] = []
            killed = trio.Event()

            async def write() -> None:
                for i in range(60):
                    result = await writer.execute(
                        "INSERT INTO tasks (content, status) VALUES (?, 'new')", [f"task {i}"]
                    )
                    expected.append(("insert", result.last_insert_id))
                    await writer.execute(
                        "UPDATE tasks SET status = 'done' WHERE id = ?", [result.last_insert_id]
                    )
                    expected.append(("update", result.last_insert_id))
                    if i == 20:
                        victim = next(n for n in cluster.nodes if n.address == events.node)
                        await cluster.kill(victim.index)
                        killed.set()

            seen: list[tuple[str, int, int]] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                with trio.fail_after(20.0):
                    async for event in events:
                        seen.append((event.kind, event.key, event.event_id))
                        if len(seen) == 120:
                            break
            assert killed.is_set() and events.resumes >= 1
    assert [(kind, key) for kind, key, _ in seen] == expected  # each once, in commit order
    ids = [event_id for *_, event_id in seen]
    assert ids == sorted(set(ids))


async def test_changes_through_any_node_arrive_in_commit_order_filtered(tmp_path):
    async with TestCluster.start_in_process(2, directory=tmp_path / "c") as cluster:
        a, b = cluster.addresses
        async with (
            qdb_client.open_client(a, discover_members=False) as via_a,
            qdb_client.open_client(b, discover_members=False) as via_b,
        ):
            await via_a.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER, blob BLOB)")
            async with via_b.subscribe("t", where="n % 2 = 0") as events:
                for i in range(10):
                    await (via_a if i % 2 else via_b).execute(
                        "INSERT INTO t (n, blob) VALUES (?, ?)", [i, bytes([i]) * 3]
                    )
                # A rolled-back batch leaves nothing in the log.
                with pytest.raises(qdb_client.QdbError):
                    await via_a.batch([("INSERT INTO t (n) VALUES (100)", None), ("BOGUS", None)])
                await via_a.execute("DELETE FROM t WHERE n = 4")
                got = []
                with trio.fail_after(5.0):
                    async for event in events:
                        got.append(event)
                        if len(got) == 6:
                            break
    assert [(e.kind, e.row["n"]) for e in got] == [
        ("insert", 0),
        ("insert", 2),
        ("insert", 4),
        ("insert", 6),
        ("insert", 8),
        ("delete", 4),
    ]
    assert got[1].row["blob"] == b"\x02\x02\x02"  # values come back as stored, blobs included
    assert [e.event_id for e in got] == sorted(e.event_id for e in got)


async def test_from_event_replays_and_a_trimmed_log_is_a_gap(tmp_path):
    async with (
        TestCluster.start_in_process(1, directory=tmp_path / "c") as cluster,
        qdb_client.open_client(cluster.addresses, **CLIENT) as client,
    ):
        await client.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        async with client.subscribe("t") as events:
            for v in "abc":
                await client.execute("INSERT INTO t (v) VALUES (?)", [v])
            first = [await events.__anext__() for _ in range(3)]
        # A new subscription from an event id gets every change from there on.
        async with client.subscribe("t", from_event=first[1].event_id) as again:
            replay = [await again.__anext__() for _ in range(2)]
        assert [e.row["v"] for e in replay] == ["b", "c"]
        # Time passes beyond the change retention: the log is trimmed.
        node = cluster.nodes[0].node
        node_feeds(node).clock = lambda: time.time() + 7200
        with pytest.raises(SubscriptionGap) as info:
            async with client.subscribe("t", from_event=first[0].event_id):
                pass
    gap = info.value
    assert gap.last_event_id == first[0].event_id - 1 and gap.oldest_event_id > first[2].event_id
    assert isinstance(gap.__cause__, qdb_client.NotFound) and not gap.retryable


async def test_a_subscription_to_what_is_not_a_table_is_refused(tmp_path):
    async with (
        TestCluster.start_in_process(1, directory=tmp_path / "c") as cluster,
        qdb_client.open_client(cluster.addresses, **CLIENT) as client,
    ):
        await client.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
        await client.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID")
        for table, where in (("nope", None), ("qdb_changes", None), ("kv", None), ("t", "nope(")):
            with pytest.raises(InvalidRequest):
                async with client.subscribe(table, where=where):
                    pass
        assert client.statistics()["in_progress"] == 0


async def test_cancel_and_credit_on_the_wire(tmp_path):
    async with (
        TestCluster.start_in_process(1, directory=tmp_path / "c") as cluster,
        raw_client(cluster.addresses[0]) as raw,
        raw_client(cluster.addresses[0]) as w,
    ):
        await w.call("execute", {"sql": "CREATE TABLE t (id INTEGER PRIMARY KEY)"})
        sub = await raw.send_request("subscribe", {"table": "t", "credit": 1})
        answer = await raw.receive()
        assert isinstance(answer, Response) and answer.result["subscription"] == sub
        for _ in range(2):
            await w.call("execute", {"sql": "INSERT INTO t DEFAULT VALUES"})
        first = await raw.receive()
        assert isinstance(first, Event) and first.data["event_id"] == 1
        assert await raw.nothing_within(0.5)  # one credit: the second waits in the log
        await raw.send(Cancel(sub))
        ended = await raw.receive()
    assert isinstance(ended, Error) and ended.name == "CANCELLED" and ended.request_id == sub
