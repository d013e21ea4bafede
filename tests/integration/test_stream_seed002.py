"""Seed 002: a result stream interrupted mid-way, over real TCP through the fault proxy.

Each test is named after the seed's case (docs/resilience.md says which
cases don't apply to a database driver, and why). Two in-process nodes on
one database, each behind its own :class:`FaultProxy`; the driver sees only
the proxies (``discover_members=False``). A cut is a ``limit_data`` toxic
added to the connection the stream runs on (it closes the connection after
a few more bytes, usually mid-frame), removed once the stream resumed.
Time bounds are generous upper bounds or lower bounds (real time on a shared
machine).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import qdb_client
from qdb_client.errors import NotFound, StreamResumeFailed
from qdb_client.testing import FaultProxy, TestCluster
from qdb_client.testing.feeds import node_feeds

pytestmark = pytest.mark.slow

CLIENT = dict(
    discover_members=False,
    heartbeat_interval=0.5,
    ping_timeout=0.5,
    reconnect_initial=0.1,
    reconnect_max=0.5,
    slow_start=0.0,
    retry_jitter="none",
    stream_page_timeout=2.0,
)


@asynccontextmanager
async def proxied(tmp_path: Path, n: int = 2, **options: Any) -> AsyncIterator[Any]:
    """(cluster, proxies): ``n`` nodes on one database, each behind a proxy."""
    async with (
        TestCluster.start_in_process(n, directory=tmp_path / "cluster", **options) as cluster,
        trio.open_nursery() as nursery,
    ):
        proxies = []
        for address in cluster.addresses:
            proxy = FaultProxy(address, seed=2)
            await nursery.start(proxy.serve)
            proxies.append(proxy)
        yield cluster, proxies
        nursery.cancel_scope.cancel()


def proxy_of(proxies: list[FaultProxy], address: str | None) -> FaultProxy:
    return next(p for p in proxies if p.address == address)


class Cutter:
    """Cuts the connection a stream runs on, once, a few bytes later."""

    def __init__(self, stream: qdb_client.ResultStream, proxies: list[FaultProxy]) -> None:
        self.stream = stream
        self.proxies = proxies
        self.handle: Any = None
        self.resumes = stream.resumes
        self.cut_at_rows: list[int] = []

    def cut(self, after_bytes: int = 3000) -> None:
        assert self.handle is None
        self.resumes = self.stream.resumes
        self.cut_at_rows.append(self.stream.rows_received)
        self.handle = proxy_of(self.proxies, self.stream.node).add_toxic(
            "limit_data", bytes=after_bytes
        )

    def check(self) -> None:
        """Remove the toxic once the stream has resumed."""
        if self.handle is not None and self.stream.resumes > self.resumes:
            self.handle.remove()
            self.handle = None


async def fill(client: qdb_client.Client, table: str, columns: str, rows: list[list[Any]]) -> None:
    """Create and fill a table, in requests of at most ~256 kB (each one frame)."""
    await client.execute(f"CREATE TABLE {table} ({columns})")
    marks = ", ".join("?" for _ in rows[0])
    names = ", ".join(c.split()[0] for c in columns.split(",")[1:])
    sql = f"INSERT INTO {table} ({names}) VALUES ({marks})"
    chunk: list[list[Any]] = []
    size = 0
    for row in rows:
        chunk.append(row)
        size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
        if size > 256_000:
            await client.executemany(sql, chunk)
            chunk, size = [], 0
    if chunk:
        await client.executemany(sql, chunk)


async def stream_with_cuts(
    client: qdb_client.Client,
    proxies: list[FaultProxy],
    sql: str,
    cut_at: list[float],
    total: int,
    **options: Any,
) -> tuple[list[Any], qdb_client.ResultStream]:
    """Every row of ``sql``, cutting the stream's connection at each fraction of ``total``."""
    rows: list[Any] = []
    due = [int(f * total) for f in cut_at]
    async with client.stream(sql, **options) as stream:
        cutter = Cutter(stream, proxies)
        async for row in stream:
            rows.append(row)
            cutter.check()
            if due and len(rows) >= due[0] and cutter.handle is None:
                due.pop(0)
                cutter.cut()
        cutter.check()
    return rows, stream


# ------------------------------------------------------------------ the cases


async def test_tc1_large_text_values_cut_mid_stream(tmp_path):
    texts = [[(f"{i:04d}-" + "lorem ipsum " * 6000)[: 60_000 + i]] for i in range(40)]
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(client, "docs", "id INTEGER PRIMARY KEY, body TEXT", texts)
        started = time.monotonic()
        async with client.stream("SELECT id, body FROM docs ORDER BY id") as clean:
            baseline_rows = [row async for row in clean]
        baseline = time.monotonic() - started
        started = time.monotonic()
        rows, stream = await stream_with_cuts(
            client, proxies, "SELECT id, body FROM docs ORDER BY id", [0.4], 40
        )
        took = time.monotonic() - started
    assert [r[0] for r in rows] == list(range(1, 41))  # no duplicate, no gap
    assert [r[1] for r in rows] == [t[0] for t in texts] == [r[1] for r in baseline_rows]
    assert stream.resumes == 1 and stream.digest_ok and stream.row_count == 40
    assert took < baseline + 5.0


async def test_tc2_json_values_valid_after_resume(tmp_path):
    documents = [
        {"id": i, "tags": [f"t{j}" for j in range(i % 7)], "nested": {"k": [i, None, True]}}
        for i in range(600)
    ]
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(
            client,
            "docs",
            "id INTEGER PRIMARY KEY, doc JSON, raw TEXT",
            [[qdb_client.Json(d), json.dumps(d)] for d in documents],
        )
        rows, stream = await stream_with_cuts(
            client, proxies, "SELECT doc, raw FROM docs ORDER BY id", [0.5], 600, page_rows=50
        )
    assert stream.types[0] == "JSON" and stream.resumes == 1
    assert [row[0] for row in rows] == documents  # parsed, whole, in order
    assert [json.loads(row[1]) for row in rows] == documents  # the text too
    assert stream.digest_ok


async def test_tc3_mixed_type_multi_part_rows_no_component_missing_or_duplicated(tmp_path):
    parts = [
        [f"text {i}", bytes([i % 256]) * (i * 37 % 5000), i * 10**12, i / 7, None if i % 3 else i]
        for i in range(800)
    ]
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(
            client,
            "parts",
            "id INTEGER PRIMARY KEY, label TEXT, chart BLOB, big INTEGER, ratio REAL, maybe",
            parts,
        )
        rows, stream = await stream_with_cuts(
            client,
            proxies,
            "SELECT id, label, chart, big, ratio, maybe FROM parts ORDER BY id",
            [0.3, 0.7],
            800,
            page_rows=40,
        )
    assert [list(r)[1:] for r in rows] == parts  # every component, exactly
    assert [r[0] for r in rows] == list(range(1, 801))
    assert stream.resumes == 2 and stream.digest_ok


async def test_tc4_sequence_numbers_preserved_across_resume(tmp_path):
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(client, "t", "id INTEGER PRIMARY KEY, v TEXT", [[f"v{i}"] for i in range(500)])
        seqs, ids = [], []
        async with client.stream("SELECT id FROM t ORDER BY id", page_rows=10) as stream:
            cutter = Cutter(stream, proxies)
            async for page in stream.pages():
                seqs.append(page.seq)
                ids.extend(r[0] for r in page)
                cutter.check()
                if page.seq == 20:
                    cutter.cut(after_bytes=50)
    assert seqs == list(range(50))  # the node's numbering, unbroken by the resume
    assert ids == list(range(1, 501))
    assert stream.resumes == 1 and stream.pages_received == 50 and stream.digest_ok


async def test_tc5_repeated_failed_reconnections_backoff_and_a_clear_error(tmp_path):
    options = {
        **CLIENT,
        "stream_max_resumes": 3,
        "retry_initial_backoff": 0.2,
        "node_selection_timeout": 0.1,
        "connect_timeout": 0.5,
    }
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **options) as client,
    ):
        await fill(client, "t", "id INTEGER PRIMARY KEY, v TEXT", [[f"v{i}"] for i in range(300)])
        received = 0
        with pytest.raises(StreamResumeFailed) as info:
            async with client.stream("SELECT * FROM t ORDER BY id", page_rows=10) as stream:
                async for _ in stream:
                    received += 1
                    if received == 100:
                        for proxy in proxies:  # the network goes: nothing reachable
                            proxy.add_toxic("down", mode="refuse")
                        broke = time.monotonic()
    elapsed = time.monotonic() - broke
    error = info.value
    assert error.resume_attempts == 3 and "3 resume attempts" in str(error)
    assert error.rows_delivered == received and error.last_seq == received // 10 - 1
    assert error.retryable and isinstance(error.__cause__, qdb_client.QdbError)
    assert elapsed >= 0.2 + 0.4  # the backoff before the 2nd and the 3rd attempt
    assert elapsed < 10.0


async def test_tc6_disconnect_within_the_first_100_ms(tmp_path):
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(
            client, "t", "id INTEGER PRIMARY KEY, v TEXT", [["x" * 100] for _ in range(2000)]
        )
        started = time.monotonic()
        async with client.stream("SELECT id FROM t ORDER BY id", page_rows=50) as stream:
            assert time.monotonic() - started < 5.0
            cutter = Cutter(stream, proxies)
            cutter.cut(after_bytes=0)  # as soon as page 0 is in
            ids = []
            async for row in stream:
                ids.append(row[0])
                cutter.check()
        took = time.monotonic() - started
    assert ids == list(range(1, 2001)) and stream.resumes >= 1 and stream.digest_ok
    assert took < 5.0


async def test_tc7_cascading_drops_in_rapid_succession(tmp_path):
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(
            client, "t", "id INTEGER PRIMARY KEY, v TEXT", [["y" * 200] for _ in range(3000)]
        )
        rows, stream = await stream_with_cuts(
            client,
            proxies,
            "SELECT id, v FROM t ORDER BY id",
            [0.15, 0.3, 0.45, 0.6, 0.75, 0.9],
            3000,
            page_rows=50,
        )
    assert [r[0] for r in rows] == list(range(1, 3001))
    assert stream.resumes == 6 and stream.digest_ok  # more drops than stream_max_resumes


@pytest.mark.parametrize("fraction", [0.10, 0.25, 0.50, 0.75, 0.95])
async def test_tc8_10mb_result_cut_at(tmp_path, fraction):
    rows_in = 10_500
    value = "z" * 1000  # ~10.5 MB of rows
    async with (
        proxied(tmp_path) as (cluster, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(client, "big", "id INTEGER PRIMARY KEY, v TEXT", [[value]] * rows_in)
        rows, stream = await stream_with_cuts(
            client, proxies, "SELECT id, v FROM big ORDER BY id", [fraction], rows_in
        )
        sent = sum(node_feeds(s.node).stats["stream_bytes_sent"] for s in cluster.nodes)
    assert len(rows) == rows_in and rows[-1][0] == rows_in and stream.digest_ok
    assert stream.resumes == 1
    useful = stream._ledger.bytes_received + 100 * stream.pages_received  # frames, once
    assert sent - useful <= 0.05 * useful  # re-sent: a few pages, never the whole result


async def test_tc9_concurrent_streams_interrupted_by_one_network_event(tmp_path):
    async with (
        proxied(tmp_path) as (_, proxies),
        qdb_client.open_client([p.address for p in proxies], **CLIENT) as client,
    ):
        await fill(
            client, "t", "id INTEGER PRIMARY KEY, v TEXT", [["w" * 300] for _ in range(4000)]
        )
        results: dict[int, list[int]] = {}
        halfway = trio.Event()
        ready = [0]

        async def one(k: int) -> None:
            sql = "SELECT id FROM t WHERE id % 8 = ? ORDER BY id"
            async with client.stream(sql, [k], page_rows=25) as stream:
                ids = []
                async for row in stream:
                    ids.append(row[0])
                    if len(ids) == 100:
                        ready[0] += 1
                        if ready[0] == 8:
                            halfway.set()
                        await halfway.wait()
                results[k] = ids
                assert stream.digest_ok

        async with trio.open_nursery() as nursery:
            for k in range(8):
                nursery.start_soon(one, k)
            await halfway.wait()
            for proxy in proxies:  # one event: every connection reset at once
                proxy.add_toxic("reset_peer", timeout=0, name="reset")
            await trio.sleep(0.1)
            for proxy in proxies:
                proxy.remove_toxic("reset")
    for k in range(8):
        assert results[k] == [i for i in range(1, 4001) if i % 8 == k]


async def test_tc10_session_token_expiring_mid_stream(tmp_path):
    credentials = {"alice": "wonderland", "bob": "builder"}
    async with proxied(tmp_path, credentials=credentials, session_ttl=1.0) as (_, proxies):
        options = {**CLIENT, "credentials": ("alice", "wonderland")}
        async with qdb_client.open_client([p.address for p in proxies], **options) as client:
            await fill(
                client, "t", "id INTEGER PRIMARY KEY, v TEXT", [[f"v{i}"] for i in range(400)]
            )
            ids = []
            async with client.stream("SELECT id FROM t ORDER BY id", page_rows=20) as stream:
                cutter = Cutter(stream, proxies)
                async for row in stream:
                    ids.append(row[0])
                    cutter.check()
                    if len(ids) == 100:
                        before = client.statistics()["session"]
                        await trio.sleep(1.5)  # the session's token expires meanwhile
                        token = stream._ledger.token
                        cutter.cut(after_bytes=0)
            after = client.statistics()["session"]
        # The token in use when the pause began expired during it; the client
        # authenticated again (a refresh, or the password once the token was
        # refused) and the stream went on as the same user. Bound to alice, its
        # resume token means nothing to bob.
        assert ids == list(range(1, 401)) and stream.resumes == 1 and stream.digest_ok
        assert before["expires_in"] < 1.5 and after["user"] == "alice"
        logins = ("password_logins", "token_logins")
        assert sum(after[k] for k in logins) > sum(before[k] for k in logins)
        bob = {**CLIENT, "credentials": ("bob", "builder")}
        async with qdb_client.open_client(proxies[0].address, **bob) as other:
            with pytest.raises(NotFound) as info:
                args = {"token": token, "credit": 1}
                await other._call("resume_stream", args, 2.0, read_only=True)
    assert info.value.details["reason"] == "unknown"


async def test_tc12_gradual_degradation_latency_then_bandwidth_then_silence(tmp_path):
    async with proxied(tmp_path) as (_, proxies):
        options = {**CLIENT, "stream_page_timeout": 1.0}
        async with qdb_client.open_client([p.address for p in proxies], **options) as client:
            await fill(
                client, "t", "id INTEGER PRIMARY KEY, v TEXT", [["d" * 500] for _ in range(1200)]
            )
            ids = []
            async with client.stream("SELECT id, v FROM t ORDER BY id", page_rows=20) as stream:
                proxy = proxy_of(proxies, stream.node)
                async for row in stream:
                    ids.append(row[0])
                    if len(ids) == 200:
                        proxy.add_toxic("latency", latency=30, jitter=10)
                    elif len(ids) == 400:
                        proxy.add_toxic("bandwidth", rate=256)
                    elif len(ids) == 600:
                        assert stream.resumes == 0  # slower, never interrupted
                        silence = proxy.add_toxic("timeout", timeout=0)
                    elif len(ids) == 800:
                        silence.remove()
    assert ids == list(range(1, 1201)) and stream.digest_ok
    assert stream.resumes == 1  # the silence was detected and the stream moved


async def test_tc13_node_temporarily_unable_to_continue_backs_off_and_resumes(tmp_path):
    async with proxied(tmp_path, n=1) as (cluster, (proxy,)):
        options = {**CLIENT, "retry_initial_backoff": 0.05}
        async with qdb_client.open_client(proxy.address, **options) as client:
            await fill(
                client, "t", "id INTEGER PRIMARY KEY, v TEXT", [[f"v{i}"] for i in range(500)]
            )
            node = cluster.nodes[0].node
            ids = []
            async with client.stream("SELECT id FROM t ORDER BY id", page_rows=20) as stream:
                async for row in stream:
                    ids.append(row[0])
                    if len(ids) == 100:
                        # Resource exhaustion: the stream stops, and the node turns the
                        # first resumes away, asking for 0.3 s each time.
                        node_feeds(node).fail_pages(1, "OVERLOADED", retry_after_ms=300)
                        node.faults.fail_next(
                            2, "OVERLOADED", methods=["resume_stream"], retry_after_ms=300
                        )
                        started = time.monotonic()
                    elif len(ids) == 200:
                        waited = time.monotonic() - started
    assert ids == list(range(1, 501)) and stream.digest_ok and stream.resumes == 3
    assert waited >= 0.9  # 3 x the 300 ms the node asked for


async def test_tc14_node_restarted_mid_stream_with_the_same_protocol_version(tmp_path):
    """TC14 (a protocol upgrade) mapped to a database node: the node a stream runs on
    restarts mid-way (same version: this implementation speaks only v1); the spool
    survives in the shared store, and the stream continues on the restarted node."""
    options = {**CLIENT, "node_selection_timeout": 5.0, "stream_max_resumes": 10}
    async with (
        TestCluster.start_in_process(1, directory=tmp_path / "cluster") as cluster,
        qdb_client.open_client(cluster.addresses, **options) as client,
    ):
        await fill(
            client, "t", "id INTEGER PRIMARY KEY, v TEXT", [["r" * 100] for _ in range(1000)]
        )
        ids = []
        async with client.stream("SELECT id FROM t ORDER BY id", page_rows=20) as stream:
            async for row in stream:
                ids.append(row[0])
                if len(ids) == 300:
                    await cluster.restart(0)  # killed, then started again on its port
    assert ids == list(range(1, 1001)) and stream.resumes >= 1 and stream.digest_ok
