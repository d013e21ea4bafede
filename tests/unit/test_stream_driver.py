"""Result streams in the driver, over scripted nodes in virtual time.

Credit accounting and bounded buffers, page checks (seq, width, credit,
row count, digest) as typed StreamCorrupted errors, resume decisions
(where, with which token, after which backoff, how many times), silence
detection, deadlines, CANCEL on early exit, and cancellation at any point.
"""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

import qdb_client
from qdb_client.errors import (
    ClientClosed,
    InvalidArgument,
    RequestTimeout,
    SqlError,
    StreamCorrupted,
    StreamResumeFailed,
)
from qdb_client.protocol import (
    ErrorCode,
    StreamEnd,
    StreamPage,
    encode_frame,
    error_message,
)

from .fake_streams import FakeStreams, token

COLUMNS = ("id", "name")
ROWS = [[i, f"row {i}"] for i in range(1, 21)]  # 10 pages of 2 rows
FAST = {"retry_jitter": "none", "heartbeat_interval": 60.0, "stream_credit": 3}


def streams(network, nursery, rows=ROWS, **options) -> FakeStreams:
    fake = FakeStreams(nursery, COLUMNS, rows, **options)
    for address in ("a:1", "b:2"):
        network.handlers[address] = fake
    return fake


async def collect(stream) -> list[list]:
    return [list(row) async for row in stream]


# ------------------------------------------------------------ the happy path


async def test_every_row_arrives_in_order_with_row_count_and_digest(
    network, nursery, autojump_clock
):
    fake = streams(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        async with client.stream("SELECT id, name FROM t", page_rows=2) as rows:
            assert rows.columns == COLUMNS and rows.types == (None, None)
            assert rows.row_count is None and rows.digest_ok is None
            assert await collect(rows) == ROWS
            assert rows.row_count == 20 and rows.digest_ok is True
            assert rows.pages_received == 10 and rows.resumes == 0
        method, args = fake.requests[0][1:]
        assert method == "query_stream"
        assert args["page_rows"] == 2 and args["credit"] == 3 and args["sql"]
        # The end received, the spool is released at once (a CANCEL without a reply).
        await trio.testing.wait_all_tasks_blocked()
        assert fake.cancels == [("fake-a:1", fake.served[0].request.request_id)]
        assert client.statistics()["in_progress"] == 0


async def test_pages_iterate_page_by_page_and_after_rows(network, nursery, autojump_clock):
    streams(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        async with client.stream("SELECT", page_rows=2) as rows:
            first = await rows.__anext__()
            pages = [page async for page in rows.pages()]
        assert list(first) == ROWS[0]
        assert [p.seq for p in pages] == list(range(10))
        assert [list(r) for r in pages[0]] == [ROWS[1]]  # the rest of page 0
        assert sum(len(p) for p in pages) == 19


async def test_empty_result_is_one_empty_page(network, nursery, autojump_clock):
    streams(network, nursery, rows=[])
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.stream("SELECT") as rows,
    ):
        assert await collect(rows) == []
        assert rows.row_count == 0 and rows.digest_ok


async def test_credit_keeps_the_buffer_within_the_window_for_a_slow_consumer(
    network, nursery, autojump_clock
):
    fake = streams(network, nursery)
    async with (
        qdb_client.open_client("a:1", **FAST) as client,
        client.stream("SELECT") as rows,
    ):
        seen = 0
        async for _ in rows:
            seen += 1
            await trio.sleep(1)  # a slow consumer: the node must wait for credit
            assert len(rows._buffer) + rows._ledger.outstanding <= 3
        assert seen == 20
    served = fake.served[0]
    assert served.max_credit <= 3
    # Credit was granted in batches as the buffer drained, never beyond the window.
    assert sum(pages for *_, pages in fake.credits) == 10 - 3
    assert all(pages <= 3 for *_, pages in fake.credits)


async def test_argument_checks_fail_before_sending(network, nursery):
    fake = streams(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        for bad in ({"page_rows": 0}, {"page_rows": True}, {"page_bytes": 10}, {"timeout": -1}):
            with pytest.raises(InvalidArgument):
                client.stream("SELECT", **bad)
        with pytest.raises(InvalidArgument):
            client.stream("SELECT", [object()])
    assert fake.requests == []


# ---------------------------------------------------------- hostile nodes


@pytest.mark.parametrize(
    "hostile, why",
    [
        (lambda f, s, q: StreamPage(s.request.request_id, q + 1, (ROWS[0],), token(q + 1)), "due"),
        (lambda f, s, q: StreamPage(s.request.request_id, q, ((1, 2, 3),), token(q)), "values"),
        (lambda f, s, q: StreamPage(s.request.request_id, q, (), token(q)), "no rows"),
        (lambda f, s, q: StreamPage(s.request.request_id, q, (ROWS[0],), b""), "token"),
        (
            lambda f, s, q: StreamEnd(s.request.request_id, q - 1, 2 * q, b"\x00" * 32),
            "digest",
        ),
        (
            lambda f, s, q: StreamEnd(s.request.request_id, q - 1, 99, f.digest),
            "counts 99 rows",
        ),
        (lambda f, s, q: StreamEnd(s.request.request_id, q + 5, 2 * q, f.digest), "last"),
    ],
    ids=["seq gap", "row width", "empty page", "no token", "digest", "row count", "end seq"],
)
async def test_a_stream_that_contradicts_itself_is_stream_corrupted(
    network, nursery, autojump_clock, hostile, why
):
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: hostile(fake, served, seq) if seq == 3 else None
    async with qdb_client.open_client("a:1", **FAST) as client:
        received = []
        with pytest.raises(StreamCorrupted) as info:
            async with client.stream("SELECT") as rows:
                async for row in rows:
                    received.append(list(row))
        await trio.testing.wait_all_tasks_blocked()
        assert why in str(info.value)
        assert received == ROWS[: len(received)]  # nothing wrong came out before
        assert info.value.pages_delivered >= 3 and info.value.last_seq is not None
        # The stream is cancelled on the node (spool released).
        assert fake.cancels and not info.value.retryable
        assert client.statistics()["in_progress"] == 0


async def test_pages_beyond_the_credit_are_stream_corrupted(network, nursery, autojump_clock):
    fake = streams(network, nursery)

    def flood(served, seq):
        served.credit = 100  # a node that ignores the credit it was given
        return None

    fake.before_page = flood
    async with qdb_client.open_client("a:1", **FAST) as client:
        with pytest.raises(StreamCorrupted, match="beyond the 3 page"):
            async with client.stream("SELECT") as rows:
                await trio.sleep(1)  # let the flood arrive
                await collect(rows)


async def test_page_0_without_columns_is_stream_corrupted(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    fake.before_page = lambda s, q: StreamPage(s.request.request_id, 0, (ROWS[0],), token(0))
    async with qdb_client.open_client("a:1", **FAST) as client:
        with pytest.raises(StreamCorrupted, match="without 'columns'"):
            async with client.stream("SELECT"):
                pass


async def test_a_refused_query_raises_its_own_error(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    fake.answers.append(error_message(0, ErrorCode.SQL_ERROR, "no such table: t"))
    async with qdb_client.open_client("a:1", **FAST) as client:
        with pytest.raises(SqlError):
            async with client.stream("SELECT"):
                pytest.fail("no page came")
        assert client.statistics()["in_progress"] == 0


# --------------------------------------------------------------- resuming


async def test_a_lost_node_is_resumed_elsewhere_from_the_last_token(
    network, nursery, autojump_clock
):
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: (
        "drop" if seq == 4 and served.node.node_id == "fake-a:1" else None
    )
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.stream("SELECT") as rows,
    ):
        assert await collect(rows) == ROWS  # no gap, no duplicate
        assert rows.resumes == 1 and rows.digest_ok
    (first, *_), (node, method, args) = fake.requests, fake.requests[-1]
    assert first[0] == "fake-a:1" and node == "fake-b:2"
    # Page 3 was sent before the drop, but it is lost with the connection when
    # the client's credit write meets the closed peer before its reader takes
    # the page in; the resume starts from the last page actually received.
    assert method == "resume_stream" and args["token"] in (token(2), token(3))
    assert args["credit"] >= 1


async def test_cascading_drops_each_resume_and_never_exhaust_the_attempts(
    network, nursery, autojump_clock
):
    fake = streams(network, nursery, rows=[[i, "x"] for i in range(40)])
    drops = iter([3, 5, 7, 9, 11, 13, 15])  # more drops than stream_max_resumes (5)
    due = [next(drops)]

    def drop(served, seq):
        if seq == due[0]:
            due[0] = next(drops, -1)
            return "drop"
        return None

    fake.before_page = drop
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.stream("SELECT") as rows,
    ):
        assert await collect(rows) == [[i, "x"] for i in range(40)]
        assert rows.resumes == 7
    resumed_at = [seq_token for *_, args in fake.requests[1:] for seq_token in [args["token"]]]
    assert resumed_at == [token(s - 1) for s in (3, 5, 7, 9, 11, 13, 15)]


async def test_failed_resumes_back_off_and_stop_at_the_maximum(network, nursery, autojump_clock):
    fake = streams(network, nursery)

    def kill_all(served, seq):
        if seq == 2:
            network.handlers["a:1"] = network.handlers["b:2"] = "refuse"
            return "drop"
        return None

    fake.before_page = kill_all
    options = {
        **FAST,
        "stream_max_resumes": 3,
        "retry_initial_backoff": 0.5,
        "node_selection_timeout": 0.1,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.05,
    }
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        await network.kill("b:2")  # the stream runs on a:1, which then goes too
        received = []
        with pytest.raises(StreamResumeFailed) as info:
            async with client.stream("SELECT") as rows:
                async for row in rows:
                    received.append(list(row))
        broke_at = info.value
        assert received == ROWS[:4]  # every page received was delivered first
        assert broke_at.rows_delivered == 4 and broke_at.pages_delivered == 2
        assert broke_at.last_seq == 1 and broke_at.resume_attempts == 3
        assert "3 resume attempts" in str(broke_at) and broke_at.retryable
        assert broke_at.__cause__ is not None
    assert len(fake.requests) == 1  # no resume could even be sent


async def test_backoff_between_resume_attempts_is_exponential(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: "drop" if seq == 2 and len(fake.served) == 1 else None
    unavailable = error_message(0, ErrorCode.UNAVAILABLE, "busy", details={"executed": False})
    fake.answers.extend([unavailable] * 3)
    times: list[float] = []
    real_call = fake.__call__

    async def timed(node, request):
        times.append(trio.current_time())
        await real_call(node, request)

    network.handlers["a:1"] = network.handlers["b:2"] = timed
    timed.frame = fake.frame  # type: ignore[attr-defined]
    options = {**FAST, "retry_initial_backoff": 0.1, "retry_multiplier": 2.0}
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        fake.answers.clear()
        async with client.stream("SELECT") as rows:
            fake.answers.extend([unavailable] * 3)
            assert await collect(rows) == ROWS
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times[1:])]
    assert gaps == [0.2, 0.4, 0.8]  # 0.1 after the drop, then doubling


async def test_an_expired_token_says_what_was_delivered(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: "drop" if seq == 5 and len(fake.served) == 1 else None
    expired = error_message(0, ErrorCode.NOT_FOUND, "gone", details={"reason": "expired"})
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.stream("SELECT") as rows,
    ):
        fake.answers.append(expired)
        with pytest.raises(StreamResumeFailed) as info:
            await collect(rows)
    error = info.value
    assert error.reason == "expired" and "no longer has it (expired)" in str(error)
    assert (error.rows_delivered, error.pages_delivered, error.last_seq) == (10, 5, 4)


async def test_a_silent_node_is_left_after_the_page_timeout(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    stalled_at: list[float] = []

    def stall(served, seq):
        if seq == 3 and served.node.node_id == "fake-a:1":
            stalled_at.append(trio.current_time())
            return "stall"
        return None

    fake.before_page = stall
    options = {**FAST, "stream_page_timeout": 2.0}
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        async with client.stream("SELECT") as rows:
            assert await collect(rows) == ROWS
        resumed = fake.served[-1]
        assert resumed.node.node_id == "fake-b:2" and resumed.request.method == "resume_stream"
        # The silent node's request was not cancelled (that would delete the spool):
        # its connection was closed instead.
        assert not [c for c in fake.cancels if c[0] == "fake-a:1"]
        assert network.nodes_at("a:1")[0].finished


async def test_the_stream_timeout_is_one_deadline(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: "stall" if seq == 1 else None
    async with qdb_client.open_client("a:1", **FAST) as client:
        started = trio.current_time()
        with pytest.raises(RequestTimeout):
            async with client.stream("SELECT", timeout=1.5) as rows:
                await collect(rows)
        assert trio.current_time() - started == pytest.approx(1.5)
        await trio.testing.wait_all_tasks_blocked()
        assert fake.cancels  # the stream was cancelled on the node


async def test_a_page_corrupted_in_transit_is_fetched_again(network, nursery, autojump_clock):
    fake = streams(network, nursery)

    def corrupt(served, seq):
        if seq == 2 and len(fake.served) == 1:
            frame = bytearray(encode_frame(0x30, served.request.request_id, b"\xa0"))
            frame[-1] ^= 0xFF  # a wrong CRC
            return bytes(frame)
        return None

    fake.before_page = corrupt
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.stream("SELECT") as rows,
    ):
        assert await collect(rows) == ROWS
        assert rows.resumes == 1
    assert fake.requests[-1][2]["token"] == token(1)


async def test_a_draining_node_hands_the_stream_over_at_once(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    shutting = error_message(0, ErrorCode.SHUTTING_DOWN, "draining")
    fake.before_page = lambda served, seq: (
        error_message(served.request.request_id, ErrorCode.SHUTTING_DOWN, "draining")
        if seq == 4 and len(fake.served) == 1
        else None
    )
    assert shutting.retryable
    async with (
        qdb_client.open_client(["a:1", "b:2"], **FAST) as client,
        client.stream("SELECT") as rows,
    ):
        assert await collect(rows) == ROWS


# --------------------------------------------------------- leaving early


async def test_leaving_early_cancels_the_stream_on_the_node(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        async with client.stream("SELECT") as rows:
            async for row in rows:
                if row[0] == 5:
                    break
        await trio.testing.wait_all_tasks_blocked()
        rid = fake.served[0].request.request_id
        assert fake.cancels == [("fake-a:1", rid)]
        node = client.statistics()["nodes"][0]
        assert node["in_flight"] == 0 and node["orphaned"] == 0  # CANCELLED confirmed it
        with pytest.raises(InvalidArgument):
            await rows.__anext__()  # closed with its block


@pytest.mark.parametrize("after", [0.0, 0.001, 0.5, 1.0, 2.5, 4.0, 6.5, 9.0])
async def test_cancellation_at_any_point_leaves_nothing_behind(
    network, nursery, autojump_clock, after
):
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: "drop" if seq == 3 and len(fake.served) == 1 else None
    async with qdb_client.open_client(["a:1", "b:2"], **FAST) as client:
        with trio.move_on_after(after):
            async with client.stream("SELECT") as rows:
                async for _ in rows:
                    await trio.sleep(0.5)
        await trio.sleep(1)
        stats = client.statistics()
        assert stats["in_progress"] == 0
        assert all(n["in_flight"] == 0 for n in stats["nodes"])
        # Every request the node was still serving was cancelled, or its connection
        # is gone (the dropped one): nothing waits for credit forever on the node.
        live = [s for s in fake.served if not s.cancelled and s.next_seq < len(fake.pages)]
        assert all(served.node.finished for served in live)


async def test_closing_the_client_ends_an_open_stream_with_client_closed(
    network, nursery, autojump_clock
):
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: "stall" if seq == 2 else None
    async with qdb_client.open_client("a:1", **FAST) as client, client.stream("SELECT") as rows:
        await rows.__anext__()
        await client.aclose()
        with pytest.raises(ClientClosed):
            await collect(rows)


# ------------------------------------------------- leaving, sharing, balancing


async def test_leaving_while_waiting_to_resume_releases_the_spool(network, nursery, autojump_clock):
    """No request carries the stream during the resume backoff, so leaving then
    can't CANCEL one: the spool is released through a resume that is CANCELled
    at its first page, in the background (the exit does not wait for it)."""
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: "drop" if seq == 2 and len(fake.served) == 1 else None
    async with qdb_client.open_client(["a:1", "b:2"], **FAST, retry_initial_backoff=3.0) as client:
        with trio.move_on_after(1.0):
            async with client.stream("SELECT") as rows:
                async for _ in rows:
                    await trio.sleep(0.1)
        assert trio.current_time() == pytest.approx(1.0)  # left at once
        await trio.sleep(1)
        (first, release) = fake.served
        assert first.node.finished  # the dropped connection: its request is gone
        assert fake.requests[1][1:] == ("resume_stream", {"token": token(1), "credit": 1})
        assert release.cancelled and fake.cancels == [
            (release.node.node_id, release.request.request_id)
        ]
        stats = client.statistics()
        assert stats["in_progress"] == 0
        assert all(n["in_flight"] == 0 and n["orphaned"] == 0 for n in stats["nodes"])


async def test_leaving_after_the_spool_expired_sends_nothing(network, nursery, autojump_clock):
    fake = streams(network, nursery)
    expired = error_message(0, ErrorCode.NOT_FOUND, "expired", details={"reason": "expired"})

    def drop_then_expire(served, seq):
        if seq == 2 and len(fake.served) == 1:
            fake.answers.append(expired)  # the answer to the resume
            return "drop"
        return None

    fake.before_page = drop_then_expire
    async with qdb_client.open_client(["a:1", "b:2"], **FAST) as client:
        with pytest.raises(StreamResumeFailed):
            async with client.stream("SELECT") as rows:
                await collect(rows)
        await trio.sleep(10)
        assert [method for _, method, _ in fake.requests] == ["query_stream", "resume_stream"]


async def test_leaving_the_block_checkpoints(network, nursery, autojump_clock):
    streams(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        rows = client.stream("SELECT")
        await rows.__aenter__()
        with trio.testing.assert_checkpoints():
            await rows.__aexit__(None, None, None)


async def test_leaving_with_an_error_keeps_the_error(network, nursery, autojump_clock):
    streams(network, nursery)
    async with qdb_client.open_client("a:1", **FAST) as client:
        with pytest.raises(KeyError), trio.CancelScope() as scope:
            async with client.stream("SELECT"):
                scope.cancel()
                raise KeyError("the block's own error")


async def test_a_second_task_iterating_a_stream_is_refused(network, nursery, autojump_clock):
    """Two consumers of one stream used to lose rows in silence."""
    fake = streams(network, nursery)
    fake.before_page = lambda served, seq: "stall" if seq == 1 else None
    async with qdb_client.open_client("a:1", **FAST) as client, client.stream("SELECT") as rows:
        got = [list(await rows.__anext__()), list(await rows.__anext__())]
        async with trio.open_nursery() as tasks:
            tasks.start_soon(rows.__anext__)  # waits for page 1
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(1), pytest.raises(InvalidArgument, match="one task"):
                await rows.__anext__()
            with trio.fail_after(1), pytest.raises(InvalidArgument, match="one task"):
                await rows.pages().__anext__()
            tasks.cancel_scope.cancel()
    assert got == ROWS[:2]


async def test_an_open_stream_does_not_drive_traffic_off_its_node(network, nursery, autojump_clock):
    """latency_aware: a stream open for a minute (a slow consumer) is neither a
    stalled request nor load on its node."""
    fake = streams(network, nursery)
    fake.other = lambda request: {"columns": ["x"], "rows": [[1]]}
    served_by: list[str] = []

    async def handler(node, request):
        if request.method == "query":
            served_by.append(node.node_id)
        await fake(node, request)

    handler.frame = fake.frame  # type: ignore[attr-defined]
    network.handlers["a:1"] = network.handlers["b:2"] = handler
    options = {**FAST, "load_balancing": "latency_aware", "slow_start": 0.0}
    async with qdb_client.open_client(["a:1", "b:2"], **options) as client:
        for _ in range(50):
            await client.query("SELECT 1")
        served_by.clear()
        async with client.stream("SELECT") as rows:
            await rows.__anext__()
            await trio.sleep(60)
            for _ in range(200):
                await client.query("SELECT 1")
    counts = {node: served_by.count(node) for node in ("fake-a:1", "fake-b:2")}
    assert min(counts.values()) > 60, counts
