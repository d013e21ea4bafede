"""Toxics changing while traffic flows: names, attribute bounds, and a removal racing a timer.

docs/testing.md: toxics "can be added and removed while traffic flows", a bad
kind, direction, toxicity, attribute or duplicate name "raises ConfigError
... and nothing changes", and no socket error (nor anything else) reaches
your nursery. Memory streams and virtual time for the pump.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from qdb_client.errors import ConfigError
from qdb_client.testing.proxy import FaultProxy, pump
from qdb_client.testing.proxy_cli import handle_control_request
from qdb_client.testing.toxics import MAX_ATTRIBUTE, PumpEnd, ToxicSet

# ------------------------------------------------------------------- pump


async def _remove_a_timeout_as_it_fires() -> PumpEnd | BaseException:
    toxics = ToxicSet()
    timeout = toxics.add("timeout", timeout=100)
    client, source = trio.testing.memory_stream_one_way_pair()
    sink, receiver = trio.testing.memory_stream_one_way_pair()
    result: list[PumpEnd | BaseException] = []

    async def run_pump() -> None:
        try:
            result.append(await pump(source, sink, toxics, rng=random.Random(0)))
        except Exception as exc:  # what a toxic change must never cause
            result.append(exc)

    async def remove_at_deadline(t0: float) -> None:
        await trio.sleep_until(t0 + 0.1)  # the toxic's timer fires at this instant too
        toxics.remove(timeout)
        await client.send_all(b"after")
        await client.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_pump)
        nursery.start_soon(remove_at_deadline, trio.current_time())
        with trio.move_on_after(10.0):
            while await receiver.receive_some():
                pass
        nursery.cancel_scope.cancel()
    return result[0] if result else PumpEnd.CLOSED


def test_removing_a_timeout_toxic_as_its_timer_fires_never_crashes_the_pump():
    # When the remover runs in the same scheduling batch as the expired timer
    # (before the pump task), the pump finds its timer fired with no toxic left
    # to expire: it must carry on (or end as the toxic would), never raise.
    ends = []
    for _ in range(30):
        ends.append(
            trio.run(
                _remove_a_timeout_as_it_fires, clock=trio.testing.MockClock(autojump_threshold=0)
            )
        )
    crashes = [e for e in ends if isinstance(e, BaseException)]
    assert crashes == [], f"{len(crashes)} of 30 runs: {crashes[0]!r}"


# ----------------------------------------------------------------- toxics


def test_an_empty_toxic_name_is_refused_not_used_to_replace_another_toxic():
    # name="" must not become the kind's name, skip the duplicate check, and
    # silently replace a toxic already named like the kind.
    proxy = FaultProxy("127.0.0.1:9")
    first = proxy.add_toxic("latency", name="latency", latency=1000)
    with pytest.raises(ConfigError):
        proxy.add_toxic("latency", name="", latency=5)
    assert first.active
    assert [t.attributes for t in proxy.toxics()] == [{"latency": 1000, "jitter": 0}]


def test_a_huge_integer_attribute_is_a_config_error():
    # A bad attribute is a ConfigError (a ValueError) naming the problem, an
    # int too large for a float included (not OverflowError from math.isfinite;
    # over the control port not "internal error" and a logged traceback).
    proxy = FaultProxy("127.0.0.1:9")
    with pytest.raises(ConfigError):
        proxy.add_toxic("latency", latency=10**400)
    reply = handle_control_request(
        [proxy], {"op": "add", "kind": "latency", "attributes": {"latency": 10**400}}
    )
    assert reply["ok"] is False and "internal error" not in reply["error"], reply


def test_names_are_checked_against_every_present_toxic():
    toxics = ToxicSet()
    auto = toxics.add("latency", latency=1)
    assert auto.id == "latency-1"
    with pytest.raises(ConfigError, match="already exists"):
        toxics.add("timeout", name="latency-1")
    named = toxics.add("timeout", name="latency")  # another kind's name is just a name
    assert [t.id for t in toxics.toxics()] == ["latency-1", "latency"] and named.kind == "timeout"
    with pytest.raises(ConfigError, match="non-empty string"):
        toxics.add("timeout", name=7)  # type: ignore[arg-type]
    assert len(toxics) == 2


def test_attribute_bounds_are_inclusive_and_errors_stay_short():
    toxics = ToxicSet()
    assert toxics.add("limit_data", bytes=MAX_ATTRIBUTE).attributes["bytes"] == MAX_ATTRIBUTE
    for value in (MAX_ATTRIBUTE + 1, 10**5000, -(10**5000)):
        with pytest.raises(ConfigError) as error:
            toxics.add("limit_data", bytes=value)
        assert len(str(error.value)) < 200
    with pytest.raises(ConfigError, match="finite"):
        toxics.add("latency", latency=float("inf"))


async def _remove_a_reset_as_it_fires_over_a_delayed_chunk() -> PumpEnd:
    toxics = ToxicSet()
    toxics.add("latency", latency=200)
    reset = toxics.add("reset_peer", timeout=100)
    client, source = trio.testing.memory_stream_one_way_pair()
    sink, _receiver = trio.testing.memory_stream_one_way_pair()
    ends: list[PumpEnd] = []
    ended = trio.Event()

    async def run_pump() -> None:
        ends.append(await pump(source, sink, toxics, rng=random.Random(0)))
        ended.set()

    async def remove_at_deadline(t0: float) -> None:
        await trio.sleep_until(t0 + 0.1)
        toxics.remove(reset)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_pump)
        await client.send_all(b"held by the latency toxic")
        nursery.start_soon(remove_at_deadline, trio.current_time())
        with trio.move_on_after(10.0):
            await ended.wait()
        nursery.cancel_scope.cancel()
    return ends[0]


def test_a_timer_toxic_removed_as_it_fires_over_a_held_chunk_still_ends_the_connection():
    # The chunk the latency toxic held was cut off when the timer fired: it
    # can't be resumed, so whichever task ran first the reset happens.
    for _ in range(10):
        clock = trio.testing.MockClock(autojump_threshold=0)
        assert trio.run(_remove_a_reset_as_it_fires_over_a_delayed_chunk, clock=clock) is (
            PumpEnd.RESET
        )
