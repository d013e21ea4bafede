"""Subscriptions in the driver, over scripted nodes in virtual time."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import (
    InvalidArgument,
    InvalidRequest,
    MessageError,
    RequestTimeout,
    StreamCorrupted,
    SubscriptionGap,
    SubscriptionLost,
)
from qdb_client.protocol import ErrorCode, Event, GoAway, Response, error_message

from .fake_streams import FakeChanges, change

FAST = {"retry_jitter": "none", "heartbeat_interval": 60.0, "subscription_credit": 4}


def changes(network, nursery, **options) -> FakeChanges:
    fake = FakeChanges(nursery, **options)
    for address in ("a:1", "b:2"):
        network.handlers[address] = fake
    return fake


def answering_queries(network, fake: FakeChanges) -> None:
    """Serve ``query`` beside the fake's subscriptions."""

    async def handler(node, request):
        if request.method == "query":
            await node.reply(request, {"columns": ["x"], "rows": [[1]]})
        else:
            await fake(node, request)

    handler.frame = fake.frame  # type: ignore[attr-defined]
    for address in ("a:1", "b:2"):
        network.handlers[address] = handler


def connection_of(client):
    """The one connection of the client's one node."""
    (connection,) = client._cluster.nodes[0].pool.connections()
    return connection


async def take(events, n: int) -> list:
    got = []
    async for event in events:
        got.append(event)
        if len(got) == n:
            break
    return got


async def test_events_arrive_in_order_as_change_events(network, nursery, autojump_clock):
    fake = changes(network, nursery, newest=41)
    fake.scripts.append([change(42, "insert", 7, id=7, name="ada"), change(43, "update", 7)])
    async with qdb_client.open_client("a:1", **FAST) as client:
        async with client.subscribe("t", where="id > 5") as events:
            got = await take(events, 2)
            assert events.last_event_id == 43 and events.subscription_id is not None
        await trio.testing.wait_all_tasks_blocked()
        assert len(fake.cancels) == 1  # leaving the block ends the subscription on the node
    assert [(e.kind, e.key, e.event_id) for e in got] == [("insert", 7, 42), ("update", 7, 43)]
    assert got[0]["name"] == "ada" and got[0].table == "t"
    args = fake.requests[0][1]
    assert args == {"table": "t", "credit": 4, "where": "id > 5"}


async def test_a_lost_node_resumes_after_the_last_event_received(network, nursery, autojump_clock):
    fake = changes(network, nursery, newest=9)
    fake.scripts.append([change(10), change(11), "drop"])
    fake.scripts.append([change(11), change(12)])  # a node that repeats one: dropped
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.subscribe("t") as events,
    ):
        got = await take(events, 3)
        assert events.resumes == 1 and events.duplicates_dropped == 1
    assert [e.event_id for e in got] == [10, 11, 12]
    first, second = fake.requests
    assert "from_event" not in first[1] and second[1]["from_event"] == 12
    assert first[0] != second[0]  # another node


async def test_a_loss_before_any_event_resumes_from_the_subscription_point(
    network, nursery, autojump_clock
):
    fake = changes(network, nursery, newest=100)
    fake.scripts.append(["drop"])
    fake.scripts.append([change(101)])
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.subscribe("t") as events,
    ):
        got = await take(events, 1)
    assert got[0].event_id == 101
    assert fake.requests[1][1]["from_event"] == 101  # nothing after 100 can be missed


async def test_a_trimmed_log_is_a_gap_naming_the_last_event(network, nursery, autojump_clock):
    fake = changes(network, nursery, newest=5)
    fake.scripts.append([change(6), "drop"])
    fake.scripts.append(
        error_message(
            0, ErrorCode.NOT_FOUND, "trimmed", details={"reason": "trimmed", "oldest_event_id": 50}
        )
    )
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.subscribe("t") as events,
    ):
        with pytest.raises(SubscriptionGap) as info:
            await take(events, 2)
    gap = info.value
    assert gap.last_event_id == 6 and gap.oldest_event_id == 50 and not gap.retryable
    assert "past event 6" in str(gap)


async def test_resuming_stops_after_the_maximum_attempts(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.append([change(1), "drop"])
    unavailable = error_message(0, ErrorCode.UNAVAILABLE, "busy", details={"executed": False})
    fake.scripts.extend([unavailable] * 10)
    async with (
        qdb_client.open_client(["a:1", "b:2"], stream_max_resumes=2, **FAST) as client,
        client.subscribe("t") as events,
    ):
        with pytest.raises(SubscriptionLost) as info:
            await take(events, 2)
    assert info.value.last_event_id == 1 and info.value.resume_attempts == 2
    assert len(fake.requests) == 3  # the first, then 2 attempts that failed


async def test_more_events_than_credit_are_stream_corrupted(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.append([change(i) for i in range(1, 7)])  # 6 events, 4 of credit
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.subscribe("t") as events,
    ):
        await trio.sleep(1)
        with pytest.raises(StreamCorrupted, match="more events than the 4"):
            await take(events, 6)


async def test_a_malformed_event_is_stream_corrupted(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.append([change(1), {"event_id": "two", "kind": "insert"}])
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.subscribe("t") as events,
    ):
        with pytest.raises(StreamCorrupted, match="malformed change event"):
            await take(events, 2)


async def test_other_topics_on_the_subscription_are_ignored(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.append([Event("node_status", {"status": "ok"}), change(1)])
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.subscribe("t") as events,
    ):
        assert [e.event_id for e in await take(events, 1)] == [1]


async def test_a_refused_subscription_raises_its_own_error(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.append(error_message(0, ErrorCode.INVALID_REQUEST, "no table named 'nope'"))
    async with qdb_client.open_client("a:1", **FAST) as client:
        with pytest.raises(InvalidRequest):
            async with client.subscribe("nope"):
                pytest.fail("not subscribed")
        assert client.statistics()["in_progress"] == 0


async def test_arguments_are_checked_before_sending(network, nursery):
    changes(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        for bad in ({"table": ""}, {"table": "t", "where": " "}, {"table": "t", "from_event": -1}):
            with pytest.raises(InvalidArgument):
                client.subscribe(**bad)


async def test_credit_is_granted_back_as_events_are_taken(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.append([change(i) for i in range(1, 5)])
    async with qdb_client.open_client("a:1", **FAST) as client:
        async with client.subscribe("t") as events:
            await take(events, 4)
            await trio.testing.wait_all_tasks_blocked()
            rid = next(iter(fake.credit))
            assert fake.credit[rid] == 4 + 4  # the window, granted again once emptied
            node = client.statistics()["nodes"][0]
            assert node["in_flight"] == 0  # no request slot (protocol section 13.1)...
            assert connection_of(client).pinned == 1  # ...but its connection is pinned
        await trio.testing.wait_all_tasks_blocked()
        assert connection_of(client).pinned == 0


async def test_a_node_found_down_by_its_health_checks_is_left(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.append([change(1)])  # then silence: the node freezes
    fake.scripts.append([change(2)])
    options = {**FAST, "heartbeat_interval": 1.0, "ping_timeout": 0.5, "suspect_interval": 0.5}
    async with (
        qdb_client.open_client(["a:1", "b:2"], **options) as client,
        client.subscribe("t") as events,
    ):
        first = await events.__anext__()
        frozen = events.node
        network.muted.add(frozen)  # it answers no PING any more
        started = trio.current_time()
        with trio.fail_after(30):
            second = await events.__anext__()
        assert events.node != frozen and events.resumes == 1
    assert (first.event_id, second.event_id) == (1, 2)
    assert fake.requests[1][1]["from_event"] == 2
    assert trio.current_time() - started < 10


async def test_established_subscriptions_leave_every_request_slot_to_requests(
    network, nursery, autojump_clock
):
    """Protocol 13.1: an established subscription does not count in max_in_flight."""
    answering_queries(network, changes(network, nursery))
    options = {**FAST, "max_in_flight": 2, "max_connections": 1, "pool_acquire_timeout": 1.0}
    async with (
        qdb_client.open_client("a:1", **options) as client,
        client.subscribe("t"),
        client.subscribe("t"),
    ):
        connection = connection_of(client)
        assert (connection.in_flight, connection.pinned) == (0, 2)
        with trio.fail_after(2):
            assert (await client.query("SELECT 1")).rows == [(1,)]
            async with trio.open_nursery() as queries:  # both slots at once
                for _ in range(2):
                    queries.start_soon(client.query, "SELECT 1")


async def test_a_pinned_connection_is_not_closed_as_idle(network, nursery, autojump_clock):
    fake = changes(network, nursery)
    fake.scripts.extend([[], [change(1)]])
    options = {**FAST, "min_connections": 0, "idle_timeout": 1.0}
    async with qdb_client.open_client("a:1", **options) as client:
        async with client.subscribe("t") as events:
            connection = connection_of(client)
            await trio.sleep(30)
            assert connection_of(client) is connection and connection.usable
            assert len(fake.requests) == 1 and events.resumes == 0
        await trio.sleep(30)  # unpinned: now it is idle, and expires
        assert client._cluster.nodes[0].pool.connections() == []


async def test_a_repeated_subscribe_response_is_a_protocol_error_and_takes_no_slot(
    network, nursery, autojump_clock
):
    """A node that answers one subscribe 300 times (hostile or buggy): each extra
    RESPONSE used to take one more request slot, until no query could be sent."""
    fake = changes(network, nursery, newest=5)
    fake.scripts.append([Response(0, {"subscription": 1, "last_event_id": 5})] * 300)
    fake.scripts.append([change(6)])
    answering_queries(network, fake)
    async with qdb_client.open_client("a:1", max_connections=1, **FAST) as client:
        async with client.subscribe("t") as events:
            await trio.sleep(1)
            connection = connection_of(client)
            assert (connection.in_flight, connection.pinned) == (0, 1)
            with trio.fail_after(2):
                await client.query("SELECT 1")
            assert isinstance(events._failure[0], MessageError)
            assert [e.event_id for e in await take(events, 1)] == [6]
            assert events.resumes == 1 and fake.requests[1][1]["from_event"] == 6
        await trio.testing.wait_all_tasks_blocked()
        assert (connection.in_flight, connection.pinned) == (0, 0)
        assert fake.cancels  # the subscription that answered twice was cancelled


async def test_entering_a_subscription_is_bounded_by_request_timeout(
    network, nursery, autojump_clock
):
    async def silent_on_subscribe(node, request):
        if request.method != "subscribe":
            await node.reply(request, {})

    network.handlers["a:1"] = silent_on_subscribe
    async with qdb_client.open_client("a:1", **{**FAST, "request_timeout": 2.0}) as client:
        started = trio.current_time()
        with pytest.raises(RequestTimeout, match="could not subscribe to 't' within 2 s"):
            async with client.subscribe("t"):
                pytest.fail("subscribed")
        assert trio.current_time() - started == pytest.approx(2.0)
        started = trio.current_time()
        with pytest.raises(RequestTimeout, match="within 7 s") as info:
            async with client.subscribe("t", timeout=7.0):
                pytest.fail("subscribed")
        assert trio.current_time() - started <= 7.0
        assert isinstance(info.value.__cause__, RequestTimeout)
        assert client.statistics()["in_progress"] == 0
        with pytest.raises(InvalidArgument):
            client.subscribe("t", timeout=0)


async def test_a_subscription_never_made_does_not_claim_to_have_been(
    network, nursery, autojump_clock
):
    fake = changes(network, nursery)
    unavailable = error_message(0, ErrorCode.UNAVAILABLE, "busy", details={"executed": False})
    fake.scripts.extend([unavailable] * 3)
    options = {**FAST, "stream_max_resumes": 2, "retry_initial_backoff": 0.1}
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        with pytest.raises(SubscriptionLost) as info:
            async with client.subscribe("t", timeout=60.0):
                pytest.fail("subscribed")
    message = str(info.value)
    assert "could not subscribe to 't' (never subscribed)" in message
    assert "resumed" not in message and info.value.last_event_id is None
    assert len(fake.requests) == 3


async def test_events_before_from_event_are_dropped(network, nursery, autojump_clock):
    """from_event=100: a node replaying event 50 must not have it delivered, even
    before any event was received."""
    fake = changes(network, nursery, newest=200)
    fake.scripts.append([change(50), change(101)])
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.subscribe("t", from_event=100) as events,
    ):
        assert [e.event_id for e in await take(events, 1)] == [101]
        assert events.duplicates_dropped == 1


async def test_events_committed_before_the_subscription_are_dropped(
    network, nursery, autojump_clock
):
    fake = changes(network, nursery, newest=41)
    fake.scripts.append([change(41), change(42)])
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.subscribe("t") as events,
    ):
        assert [e.event_id for e in await take(events, 1)] == [42]
        assert events.duplicates_dropped == 1


async def test_leaving_the_block_checkpoints(network, nursery, autojump_clock):
    changes(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        events = client.subscribe("t")
        await events.__aenter__()
        with trio.testing.assert_checkpoints():
            await events.__aexit__(None, None, None)


async def test_a_second_task_iterating_is_refused(network, nursery, autojump_clock):
    changes(network, nursery)
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.subscribe("t") as events,
        trio.open_nursery() as tasks,
    ):
        tasks.start_soon(events.__anext__)  # waits: nothing changes
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(1), pytest.raises(InvalidArgument, match="one task"):
            await events.__anext__()
        tasks.cancel_scope.cancel()


# ------------------------------------------------------- retired connections


async def test_a_subscription_leaves_a_connection_past_its_lifetime(
    network, nursery, autojump_clock
):
    # Its pin kept the retired connection open, and counted, for good: with one
    # connection allowed, no request could be sent while the subscription lived.
    fake = FakeChanges(nursery)
    network.handlers["a:1"] = fake
    fake.scripts.append([change(1)])
    fake.scripts.append([change(2)])
    async with qdb_client.open_client(
        "a:1", max_connections=1, max_lifetime=10.0, **FAST
    ) as client:
        async with client.subscribe("t") as events:
            assert (await events.__anext__()).event_id == 1
            await trio.sleep(15)  # past max_lifetime: the pool retires the connection
            assert isinstance(await client._call("query", {}, 3.0, read_only=True), dict)
            assert (await events.__anext__()).event_id == 2  # moved, nothing lost
            assert events.resumes == 1
        assert client._cluster.nodes[0].pool.statistics()["retiring"] == 0


async def test_a_subscription_leaves_a_connection_the_pool_retires(
    network, nursery, autojump_clock
):
    # As after a missed PONG, or reauthenticate as another user.
    fake = FakeChanges(nursery)
    network.handlers["a:1"] = fake
    fake.scripts.append([change(1)])
    async with qdb_client.open_client("a:1", **FAST) as client, client.subscribe("t") as events:
        await events.__anext__()
        node = client._cluster.nodes[0]
        (connection,) = node.pool.connections()
        node.pool.retire(connection)
        await trio.sleep(1)
        assert connection.error is not None  # closed, drained
        assert node.pool.statistics()["retiring"] == 0


async def test_a_node_that_drains_every_subscribe_ends_the_subscription(
    network, nursery, autojump_clock
):
    # A drain is a free move once; drains in a row back off and count, so a node
    # that GOAWAYs every subscribe ends in SubscriptionLost instead of a spin.
    fake = FakeChanges(nursery)
    fake.scripts.append([change(1), "drop"])
    subscribes = 0

    async def handler(node, request):
        nonlocal subscribes
        if request.method == "subscribe":
            subscribes += 1
            if subscribes > 1:
                await node.send(GoAway("shutdown", request.request_id - 1))
                return
        await fake(node, request)

    handler.frame = fake.frame
    network.handlers["a:1"] = handler
    async with qdb_client.open_client("a:1", **FAST) as client, client.subscribe("t") as events:
        assert (await events.__anext__()).event_id == 1
        start = trio.current_time()
        with pytest.raises(SubscriptionLost, match="draining"):
            await events.__anext__()
        assert trio.current_time() > start  # backed off, not a spin
    assert subscribes <= 10
