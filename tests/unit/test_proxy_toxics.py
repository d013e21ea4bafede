"""Each toxic of the fault proxy, measured on bytes and virtual time over memory streams."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from qdb_client.errors import ConfigError
from qdb_client.testing.proxy import READ_AHEAD_BYTES, RECEIVE_SIZE, ConnectionToxics, pump
from qdb_client.testing.toxics import PumpEnd, ToxicSet

EPS = 1e-9


class Pipe:
    """``client`` -> pump -> ``receiver``, recording what arrives when (relative to t0)."""

    def __init__(
        self,
        toxics: ToxicSet | ConnectionToxics,
        direction: str = "downstream",
        seed: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        self.toxics = toxics
        self.direction = direction
        self.rng = rng if rng is not None else random.Random(seed)
        self.client, self._source = trio.testing.memory_stream_one_way_pair()
        self._sink, self.receiver = trio.testing.memory_stream_one_way_pair()
        self.t0 = trio.current_time()
        self.end: PumpEnd | None = None
        self.ended_at: float | None = None
        self.arrivals: list[tuple[float, bytes]] = []  # (time - t0, data); b"" is the EOF

    def now(self) -> float:
        return trio.current_time() - self.t0

    async def run_pump(self) -> None:
        self.end = await pump(
            self._source, self._sink, self.toxics, direction=self.direction, rng=self.rng
        )
        self.ended_at = self.now()
        if self.end is not PumpEnd.EOF:
            await self._sink.aclose()  # closing is the caller's job

    async def collect(self) -> None:
        while True:
            data = await self.receiver.receive_some(65536)
            self.arrivals.append((self.now(), data))
            if not data:
                return

    async def send_at(self, schedule: list[tuple[float, bytes | None]]) -> None:
        """Write each piece at t0 + its time; None closes the client side."""
        for at, data in schedule:
            await trio.sleep_until(self.t0 + at)
            if data is None:
                await self.client.aclose()
            else:
                await self.client.send_all(data)

    def received(self) -> bytes:
        return b"".join(data for _, data in self.arrivals)

    def eof_at(self) -> float | None:
        return next((t for t, data in self.arrivals if not data), None)

    def time_of_byte(self, offset: int) -> float:
        """When byte ``offset`` (0-based) arrived."""
        seen = 0
        for t, data in self.arrivals:
            seen += len(data)
            if seen > offset:
                return t
        raise AssertionError(f"byte {offset} never arrived ({seen} did)")


async def run(pipe: Pipe, schedule: list[tuple[float, bytes | None]]) -> Pipe:
    with trio.fail_after(10_000):  # virtual seconds: a pump that hangs fails at once
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe.run_pump)
            nursery.start_soon(pipe.collect)
            await pipe.send_at(schedule)
    return pipe


def toxic_set(kind: str | None = None, **options) -> ToxicSet:
    toxics = ToxicSet()
    if kind is not None:
        toxics.add(kind, **options)
    return toxics


# ------------------------------------------------------------------ no toxics


async def test_without_toxics_bytes_pass_unchanged_at_once_and_eof_follows(autojump_clock):
    pipe = await run(Pipe(toxic_set()), [(0.0, b"hello "), (1.0, b"world"), (2.0, None)])
    assert pipe.received() == b"hello world"
    assert pipe.arrivals == [(0.0, b"hello "), (1.0, b"world"), (2.0, b"")]
    assert pipe.end is PumpEnd.EOF


async def test_a_broken_sink_ends_the_pump_without_raising(autojump_clock):
    pipe = Pipe(toxic_set())
    await pipe.receiver.aclose()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe.run_pump)
        await pipe.client.send_all(b"nobody reads this")
    assert pipe.end is PumpEnd.BROKEN


async def test_cancelling_a_pump_stops_it_promptly(autojump_clock):
    pipe = Pipe(toxic_set("timeout", timeout=0))
    with trio.move_on_after(5.0):
        await pipe.run_pump()
    assert pipe.end is None and trio.current_time() - pipe.t0 == pytest.approx(5.0, abs=EPS)


# -------------------------------------------------------------------- latency


async def test_latency_delays_each_chunk_by_exactly_the_latency(autojump_clock):
    pipe = await run(
        Pipe(toxic_set("latency", latency=100)),
        [(0.0, b"a"), (0.05, b"b"), (1.0, b"c"), (1.0, None)],
    )
    # pipelined: "b" read at 0.05 leaves at 0.15, not after "a" plus another 0.1
    assert [(pytest.approx(t, abs=EPS), d) for t, d in pipe.arrivals] == [
        (0.1, b"a"),
        (0.15, b"b"),
        (1.1, b"c"),
        (1.1, b""),
    ]


async def test_latency_stays_exact_with_many_small_chunks_in_flight(autojump_clock):
    # 10 chunks a millisecond: 1000 in flight at once, within READ_AHEAD_CHUNKS
    chunks = [i.to_bytes(2, "big") for i in range(1000)]
    schedule = [(i * 0.0001, c) for i, c in enumerate(chunks)]
    pipe = await run(Pipe(toxic_set("latency", latency=100)), [*schedule, (1.0, None)])
    assert pipe.received() == b"".join(chunks)
    delays = [pipe.time_of_byte(2 * i) - i * 0.0001 for i in range(1000)]
    assert min(delays) == pytest.approx(0.1, abs=EPS)
    assert max(delays) == pytest.approx(0.1, abs=EPS)


class EndlessSource(trio.abc.ReceiveStream):
    """Always has data; counts what was read."""

    def __init__(self) -> None:
        self.read = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        self.read += max_bytes or 1
        return b"x" * (max_bytes or 1)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_reading_ahead_is_bounded_so_the_source_feels_backpressure(autojump_clock):
    source = EndlessSource()
    sink, _ = trio.testing.memory_stream_one_way_pair()
    held = toxic_set("latency", latency=10**9)  # the first chunk never leaves
    with trio.move_on_after(60):
        await pump(source, sink, held)
    assert source.read == READ_AHEAD_BYTES + RECEIVE_SIZE  # the held chunk + the bound


async def test_latency_jitter_varies_the_delay_but_never_reorders_bytes(autojump_clock):
    chunks = [bytes([i]) * 3 for i in range(40)]
    schedule = [(i * 0.001, c) for i, c in enumerate(chunks)]
    pipe = await run(
        Pipe(toxic_set("latency", latency=100, jitter=50), seed=7), [*schedule, (1.0, None)]
    )
    assert pipe.received() == b"".join(chunks)
    delays = [pipe.time_of_byte(3 * i) - i * 0.001 for i in range(40)]
    assert all(d >= 0.05 - EPS for d in delays)
    assert max(delays) <= 0.15 + 0.04 + EPS  # a chunk may wait for an earlier one
    assert len({round(d, 6) for d in delays}) > 10  # jitter did apply
    arrival = [pipe.time_of_byte(3 * i) for i in range(40)]
    assert arrival == sorted(arrival)


# ------------------------------------------------------------------ bandwidth


async def test_bandwidth_moves_2048_bytes_at_1_kb_per_second_in_exactly_2_seconds(autojump_clock):
    data = bytes(range(256)) * 8
    pipe = Pipe(toxic_set("bandwidth", rate=1))
    by_one_second: list[int] = []

    async def probe() -> None:
        await trio.sleep_until(pipe.t0 + 1.0)
        by_one_second.append(len(pipe.received()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        await run(pipe, [(0.0, data), (0.0, None)])
    assert pipe.received() == data
    assert pipe.time_of_byte(2047) == pytest.approx(2.0, abs=EPS)
    assert by_one_second == [1020]  # 10 pieces of 102 bytes (100 ms worth each)
    assert max(len(d) for _, d in pipe.arrivals) == 102


async def test_bandwidth_saves_no_budget_while_idle(autojump_clock):
    pipe = await run(
        Pipe(toxic_set("bandwidth", rate=1)), [(0.0, b"x" * 1024), (5.0, b"y" * 1024), (9, None)]
    )
    assert pipe.time_of_byte(1023) == pytest.approx(1.0, abs=EPS)
    assert pipe.time_of_byte(2047) == pytest.approx(6.0, abs=EPS)


# ----------------------------------------------------------------- slow_close


async def test_slow_close_delays_the_eof_by_exactly_the_delay(autojump_clock):
    pipe = await run(Pipe(toxic_set("slow_close", delay=300)), [(0.0, b"data"), (1.0, None)])
    assert pipe.arrivals[0] == (0.0, b"data")  # data is not delayed
    assert pipe.eof_at() == pytest.approx(1.3, abs=EPS)
    assert pipe.end is PumpEnd.EOF


# -------------------------------------------------------------------- timeout


async def test_timeout_zero_passes_nothing_and_never_closes(autojump_clock):
    pipe = Pipe(toxic_set("timeout", timeout=0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe.run_pump)
        nursery.start_soon(pipe.collect)
        await pipe.client.send_all(b"lost")
        await trio.sleep(3600)
        assert pipe.arrivals == [] and pipe.end is None  # an hour later: open, silent
        nursery.cancel_scope.cancel()


async def test_timeout_closes_the_connection_at_exactly_the_timeout(autojump_clock):
    pipe = await run(Pipe(toxic_set("timeout", timeout=500)), [(0.1, b"dropped")])
    assert pipe.end is PumpEnd.CLOSED
    assert pipe.ended_at == pytest.approx(0.5, abs=EPS)
    assert pipe.arrivals == [(pytest.approx(0.5, abs=EPS), b"")]


async def test_a_timeout_added_to_an_open_pump_counts_from_its_addition(autojump_clock):
    toxics = toxic_set()
    pipe = Pipe(toxics)

    async def add_later() -> None:
        await trio.sleep(1.0)
        toxics.add("timeout", timeout=500)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(add_later)
        await run(pipe, [(0.5, b"before"), (1.2, b"after")])
    assert pipe.received() == b"before"
    assert pipe.ended_at == pytest.approx(1.5, abs=EPS)


# ----------------------------------------------------------------- reset_peer


async def test_reset_peer_passes_data_then_asks_for_a_reset_at_the_timeout(autojump_clock):
    pipe = await run(Pipe(toxic_set("reset_peer", timeout=200)), [(0.0, b"ok"), (0.1, b"ok2")])
    assert pipe.received() == b"ok" + b"ok2"
    assert pipe.end is PumpEnd.RESET
    assert pipe.ended_at == pytest.approx(0.2, abs=EPS)


async def test_reset_peer_with_timeout_zero_resets_at_once(autojump_clock):
    pipe = await run(Pipe(toxic_set("reset_peer")), [])
    assert pipe.end is PumpEnd.RESET and pipe.ended_at == 0.0


# --------------------------------------------------------------------- slicer


async def test_slicer_cuts_into_small_timed_pieces_and_keeps_every_byte(autojump_clock):
    data = bytes(range(200)) * 5
    pipe = await run(
        Pipe(toxic_set("slicer", average_size=50, size_variation=10, delay=2000), seed=3),
        [(0.0, data), (1.0, None)],
    )
    assert pipe.received() == data
    pieces = [(t, d) for t, d in pipe.arrivals if d]
    assert len(pieces) >= 1000 // 60
    assert all(40 <= len(d) <= 60 for _, d in pieces[:-1])
    assert len({len(d) for _, d in pieces}) > 1  # sizes vary
    # one piece every 2 ms (delay is in microseconds), the first after 2 ms too
    assert [t for t, _ in pieces] == [
        pytest.approx(0.002 * (i + 1), abs=EPS) for i in range(len(pieces))
    ]


# ----------------------------------------------------------------- limit_data


async def test_limit_data_passes_exactly_n_bytes_then_closes(autojump_clock):
    pipe = await run(
        Pipe(toxic_set("limit_data", bytes=10)),
        [(0.0, b"0123"), (0.1, b"4567"), (0.2, b"89ab"), (0.3, b"cdef")],
    )
    assert pipe.received() == b"0123456789"  # the third chunk is cut in the middle
    assert pipe.end is PumpEnd.CLOSED
    assert pipe.ended_at == pytest.approx(0.2, abs=EPS)
    assert pipe.eof_at() == pytest.approx(0.2, abs=EPS)


async def test_limit_data_counts_each_direction_of_a_both_toxic_separately(autojump_clock):
    toxics = toxic_set("limit_data", direction="both", bytes=4)
    view = ConnectionToxics(toxics, random.Random(0))
    up, down = Pipe(view, direction="upstream"), Pipe(view, direction="downstream")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, up, [(0.0, b"abcdef")])
        nursery.start_soon(run, down, [(0.0, b"uvwxyz")])
    assert (up.received(), down.received()) == (b"abcd", b"uvwx")


# ----------------------------------------------------------------------- down


async def test_down_refuse_closes_an_open_pump_at_once(autojump_clock):
    toxics = toxic_set()
    pipe = Pipe(toxics)

    async def add_later() -> None:
        await trio.sleep(0.3)
        toxics.add("down")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(add_later)
        await run(pipe, [(0.1, b"through")])
    assert pipe.received() == b"through"
    assert pipe.end is PumpEnd.CLOSED and pipe.ended_at == pytest.approx(0.3, abs=EPS)


async def test_down_blackhole_drops_both_directions_until_removed(autojump_clock):
    toxics = toxic_set()
    hole = toxics.add("down", mode="blackhole")
    assert hole.direction == "both"
    pipe = Pipe(toxics, direction="upstream")

    async def remove_later() -> None:
        await trio.sleep(1.0)
        toxics.remove(hole)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(remove_later)
        await run(pipe, [(0.5, b"lost"), (1.5, b"kept"), (2.0, None)])
    assert pipe.arrivals == [(1.5, b"kept"), (2.0, b"")]


# ---------------------------------------------------------- toxicity, direction


async def test_toxicity_zero_never_applies_and_one_always_does(autojump_clock):
    never = await run(
        Pipe(toxic_set("latency", latency=100, toxicity=0.0)), [(0.0, b"x"), (0.0, None)]
    )
    always = await run(
        Pipe(toxic_set("latency", latency=100, toxicity=1.0)), [(0.0, b"x"), (0.0, None)]
    )
    assert never.arrivals[0] == (0.0, b"x")
    assert always.arrivals[0][0] == pytest.approx(0.1, abs=EPS)


async def test_toxicity_is_decided_once_per_connection_from_the_seeded_source(autojump_clock):
    toxics = toxic_set("latency", latency=100, toxicity=0.5, name="half")
    rng = random.Random(42)  # one source for every connection, as FaultProxy(seed=42) has
    delayed = []
    for _ in range(40):
        pipe = await run(Pipe(toxics, rng=rng), [(0.0, b"a"), (0.5, b"b"), (0.5, None)])
        first, second = pipe.time_of_byte(0), pipe.time_of_byte(1) - 0.5
        assert first == pytest.approx(second, abs=EPS)  # both chunks of a connection, or neither
        delayed.append(first > EPS)
    assert 5 < sum(delayed) < 35
    assert toxics.statistics()["half"]["connections"] == sum(delayed)
    assert toxics.statistics()["half"]["skipped"] == 40 - sum(delayed)
    replay = random.Random(42)
    assert [replay.random() < 0.5 for _ in range(40)] == delayed


async def test_toxicity_is_shared_by_both_directions_and_survives_other_changes(autojump_clock):
    toxics = toxic_set("latency", direction="both", latency=100, toxicity=0.5, name="half")
    rng = random.Random(5)
    outcomes = []
    for _ in range(30):
        view = ConnectionToxics(toxics, rng)
        up, down = Pipe(view, direction="upstream"), Pipe(view, direction="downstream")

        async def churn() -> None:  # every change rebuilds the pumps' chains
            for _ in range(5):
                await trio.sleep(0.1)
                toxics.remove(toxics.add("slow_close"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(churn)
            schedule = [*((0.05 + 0.1 * i, b"x") for i in range(6)), (1.0, None)]
            nursery.start_soon(run, up, schedule)
            nursery.start_soon(run, down, schedule)
        delays = {
            round(pipe.time_of_byte(i) - (0.05 + 0.1 * i), 9)
            for pipe in (up, down)
            for i in range(6)
        }
        assert len(delays) == 1  # every chunk of both directions, or none
        outcomes.append(delays.pop() > 0)
    assert 5 < sum(outcomes) < 25
    assert toxics.statistics()["half"]["connections"] == sum(outcomes)
    assert toxics.statistics()["half"]["skipped"] == 30 - sum(outcomes)


@pytest.mark.parametrize(
    ("toxic_direction", "pump_direction", "delayed"),
    [
        ("downstream", "downstream", True),
        ("downstream", "upstream", False),
        ("upstream", "upstream", True),
        ("upstream", "downstream", False),
        ("both", "upstream", True),
        ("both", "downstream", True),
    ],
)
async def test_direction_is_respected(autojump_clock, toxic_direction, pump_direction, delayed):
    toxics = toxic_set("latency", direction=toxic_direction, latency=100)
    pipe = await run(Pipe(toxics, direction=pump_direction), [(0.0, b"x"), (0.0, None)])
    assert pipe.arrivals[0][0] == pytest.approx(0.1 if delayed else 0.0, abs=EPS)


# -------------------------------------------------------- changes in mid-stream


async def test_removing_a_toxic_mid_stream_lets_data_flow_again(autojump_clock):
    toxics = toxic_set()
    stall = toxics.add("timeout", timeout=0)
    pipe = Pipe(toxics)

    async def remove_later() -> None:
        await trio.sleep(1.0)
        assert toxics.remove(stall) and not toxics.remove(stall)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(remove_later)
        await run(pipe, [(0.5, b"dropped"), (2.0, b"flows"), (3.0, None)])
    assert pipe.arrivals == [(2.0, b"flows"), (3.0, b"")]


async def test_adding_and_removing_latency_acts_from_the_next_chunk(autojump_clock):
    toxics = toxic_set()
    pipe = Pipe(toxics)

    async def change() -> None:
        await trio.sleep(1.0)
        slow = toxics.add("latency", latency=200)
        await trio.sleep(1.0)
        toxics.remove(slow)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(change)
        await run(pipe, [(0.5, b"a"), (1.5, b"b"), (2.5, b"c"), (3.0, None)])
    assert [(pytest.approx(t, abs=EPS), d) for t, d in pipe.arrivals] == [
        (0.5, b"a"),
        (1.7, b"b"),
        (2.5, b"c"),
        (3.0, b""),
    ]


async def test_toxics_compose_in_the_order_they_were_added(autojump_clock):
    toxics = toxic_set()
    toxics.add("limit_data", bytes=6)
    toxics.add("latency", latency=100)
    pipe = await run(Pipe(toxics), [(0.0, b"abcd"), (0.5, b"efgh")])
    assert pipe.received() == b"abcdef"
    assert [t for t, d in pipe.arrivals if d] == [
        pytest.approx(0.1, abs=EPS),
        pytest.approx(0.6, abs=EPS),
    ]
    assert pipe.end is PumpEnd.CLOSED


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("lag", {}, "unknown toxic kind 'lag'"),
        ("latency", {"direction": "sideways"}, "direction must be one of"),
        ("latency", {"toxicity": 1.5}, "toxicity must be a number within 0..1"),
        ("latency", {"toxicity": True}, "toxicity must be a number within 0..1"),
        ("latency", {"toxicity": float("nan")}, "toxicity must be a number within 0..1"),
        (["latency"], {}, "unknown toxic kind"),
        ("latency", {"latncy": 100}, "latency has no attribute 'latncy'"),
        ("latency", {"latency": -1}, "'latency' must be finite and >= 0"),
        ("latency", {"jitter": "5"}, "'jitter' must be a number of milliseconds"),
        ("bandwidth", {}, "bandwidth needs the attribute 'rate'"),
        ("bandwidth", {"rate": 0}, "'rate' must be finite and > 0"),
        ("slicer", {"average_size": 10, "size_variation": 10}, "must be below 'average_size'"),
        ("slicer", {"average_size": 2.5}, "'average_size' must be an integer"),
        ("limit_data", {"bytes": True}, "'bytes' must be an integer"),
        ("timeout", {"timeout": float("inf")}, "'timeout' must be finite"),
        ("down", {"mode": "sulk"}, "'mode' must be refuse or blackhole"),
    ],
)
def test_a_bad_toxic_is_a_config_error_naming_the_problem_and_changes_nothing(
    kind, options, message
):
    toxics = ToxicSet()
    toxics.add("latency", latency=5, name="kept")
    calls = []
    toxics.subscribe(lambda: calls.append(1))
    with pytest.raises(ConfigError, match=message) as info:
        toxics.add(kind, **options)
    assert isinstance(info.value, ValueError)
    assert [t.id for t in toxics.toxics()] == ["kept"] and calls == []


def test_toxic_names_are_unique_and_defaults_are_filled_in():
    toxics = ToxicSet()
    first = toxics.add("slicer", average_size=8)
    assert first.id == "slicer-1"
    assert dict(first.attributes) == {"average_size": 8, "size_variation": 0, "delay": 0}
    with pytest.raises(ConfigError, match="already exists"):
        toxics.add("latency", name="slicer-1")
    with pytest.raises(ConfigError):
        toxics.add("latency", latency=-1)  # a refused toxic uses up no default name
    assert toxics.add("latency").describe() == {
        "id": "latency-2",
        "kind": "latency",
        "direction": "downstream",
        "toxicity": 1.0,
        "attributes": {"latency": 0, "jitter": 0},
    }
    assert toxics.clear() == 2 and len(toxics) == 0


async def test_a_pump_rejects_a_direction_other_than_upstream_or_downstream():
    source, sink = trio.testing.memory_stream_pair()
    with pytest.raises(ConfigError, match="'upstream' or 'downstream'"):
        await pump(source, sink, ToxicSet(), direction="both")
