"""Load balancers: round robin, power of two choices by load, slow start.

Nodes get a stand-in pool exposing only ``state.reserved`` (their in-flight
count) and ``connections()`` (stand-ins reporting when their oldest request
was sent); randomness comes from seeded ``random.Random`` instances, so every
sequence and frequency here is reproducible.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qdb_client._cluster import balancer as balancing
from qdb_client._cluster.balancer import LatencyAware, RoundRobin, make_balancer
from qdb_client._cluster.node import Node


def make_node(
    name: str,
    *,
    in_flight: int = 0,
    latency: float | None = None,
    recovered_at: float | None = None,
    oldest_sent: float | None = None,
) -> Node:
    connection = SimpleNamespace(oldest_started=lambda: oldest_sent, feed_slots=lambda: 0)
    pool = SimpleNamespace(
        state=SimpleNamespace(reserved=in_flight), connections=lambda: [connection]
    )
    node = Node(name, pool)  # type: ignore[arg-type]
    node.latency_ewma = latency
    node.recovered_at = recovered_at
    return node


def load(node: Node, among: list[Node] | None = None) -> float:
    """``(in_flight + 1) * latency``; a node without an estimate counts as the
    median known node of ``among``."""
    known = sorted(n.latency_ewma for n in among or [] if n.latency_ewma is not None)
    typical = known[len(known) // 2] if known else 0.0
    latency = node.latency_ewma if node.latency_ewma is not None else typical
    return (node.in_flight + 1) * (latency + 1e-6)


class RecordingRandom(random.Random):
    """A seeded Random that remembers every pair the balancer sampled."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.pairs: list[list] = []

    def sample(self, population, k, **kwargs):  # type: ignore[override]
        chosen = super().sample(population, k, **kwargs)
        self.pairs.append(chosen)
        return chosen


# -------------------------------------------------------------- round robin


def test_round_robin_visits_candidates_in_turn():
    rng = random.Random(7)
    before = rng.getstate()
    a, b, c = (make_node(n) for n in "abc")
    balancer = RoundRobin(rng)
    picks = [balancer.pick([a, b, c], now=0.0).address for _ in range(7)]
    assert picks == ["a", "b", "c", "a", "b", "c", "a"]
    assert rng.getstate() == before  # no randomness without slow start


def test_round_robin_single_candidate_and_changing_lists():
    a, b, c = (make_node(n) for n in "abc")
    balancer = RoundRobin(random.Random(1))
    assert [balancer.pick([b], 0.0) for _ in range(3)] == [b, b, b]
    picks = [balancer.pick([a, c], 0.0) for _ in range(4)]
    assert picks[0] is not picks[1] and picks == picks[:2] * 2


def test_round_robin_rotation_survives_picks_among_fewer_candidates():
    """Each first attempt is followed by a pick that excludes its node (a retry
    or a hedge): the first attempts still rotate over every node, rather than
    the shorter list sending the rotation back to the first node each time."""
    nodes = [make_node(n) for n in "abc"]
    balancer = RoundRobin(random.Random(1))
    firsts = []
    for _ in range(6):
        first = balancer.pick(nodes, 0.0)
        firsts.append(first.address)
        balancer.pick([n for n in nodes if n is not first], 0.0)
    assert set(firsts) == {"a", "b", "c"}


def test_round_robin_at_full_rate_after_slow_start_is_exact():
    rng = random.Random(3)
    a = make_node("a", recovered_at=0.0)
    b, c = make_node("b"), make_node("c")
    balancer = RoundRobin(rng, slow_start=30.0)
    before = rng.getstate()
    picks = [balancer.pick([a, b, c], now=30.0).address for _ in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]
    assert rng.getstate() == before


# ------------------------------------------------------------ latency aware


def test_latency_aware_with_two_candidates_always_takes_the_less_loaded():
    busy_fast = make_node("busy-fast", in_flight=2, latency=0.05)  # 3 * 0.05 = 0.15
    idle_slow = make_node("idle-slow", in_flight=0, latency=0.3)  # 1 * 0.3 = 0.3
    balancer = LatencyAware(random.Random(11))
    for _ in range(50):
        assert balancer.pick([idle_slow, busy_fast], 0.0) is busy_fast
    idle_slow.latency_ewma = 0.1  # 0.1 < 0.15 now
    for _ in range(50):
        assert balancer.pick([busy_fast, idle_slow], 0.0) is idle_slow


def test_latency_aware_unknown_latency_counts_as_typical_not_fastest():
    """A node with no estimate weighs as the median known node: it never beats a
    fast node on latency alone, but it beats a node known to be slow."""
    fast = make_node("fast", latency=0.001, in_flight=1)
    slow = make_node("slow", latency=0.5)
    new = make_node("new", latency=None, in_flight=3)
    balancer = LatencyAware(random.Random(5))
    # Median of (0.001, 0.5) is 0.5: new (4 * 0.5) loses to fast (2 * 0.001).
    for _ in range(20):
        assert balancer.pick([fast, new, slow][:2], 0.0) is fast
    idle_new = make_node("idle-new", latency=None)
    for _ in range(20):
        # Only the slow node is known: the new one counts as 0.5 too and wins
        # on in-flight count (1 * 0.5 < 2 * 0.5).
        slow_busy = make_node("slow-busy", latency=0.5, in_flight=1)
        assert balancer.pick([slow_busy, idle_new], 0.0) is idle_new


def test_latency_aware_counts_the_age_of_a_request_still_waiting():
    """A node that stopped answering looks slower with every second, before any
    timeout fires: its oldest unanswered request sets a floor on its latency."""
    stalled = make_node("stalled", latency=0.001, oldest_sent=10.0)
    healthy = make_node("healthy", latency=0.01, in_flight=3)
    balancer = LatencyAware(random.Random(5))
    assert balancer.pick([stalled, healthy], 10.001) is stalled  # 1 ms old: still fast
    for _ in range(20):
        assert balancer.pick([stalled, healthy], 12.0) is healthy  # 2 s without an answer


def test_latency_aware_single_candidate_uses_no_randomness():
    rng = random.Random(2)
    before = rng.getstate()
    only = make_node("only", in_flight=100, latency=9.0)
    assert LatencyAware(rng).pick([only], 0.0) is only
    assert rng.getstate() == before


@settings(max_examples=150, deadline=None)
@given(
    loads=st.lists(
        st.tuples(
            st.integers(0, 20),
            st.one_of(st.none(), st.floats(0.0001, 2.0, allow_nan=False)),
        ),
        min_size=2,
        max_size=6,
    ),
    seed=st.integers(0, 2**32),
)
def test_latency_aware_picks_the_less_loaded_of_every_sampled_pair(loads, seed):
    nodes = [
        make_node(f"n{i}", in_flight=in_flight, latency=latency)
        for i, (in_flight, latency) in enumerate(loads)
    ]
    rng = RecordingRandom(seed)
    balancer = LatencyAware(rng)
    for _ in range(30):
        picked = balancer.pick(nodes, 0.0)
        first, second = rng.pairs[-1]
        assert first is not second
        assert picked in (first, second)
        other = second if picked is first else first
        assert load(picked, nodes) <= load(other, nodes)
        assert balancing.load(picked, 0.0, None) == load(picked, [picked])
    assert len(rng.pairs) == 30


def test_latency_aware_pick_frequencies_follow_the_load_ranking():
    # distinct loads: n0 least loaded ... n3 most loaded
    nodes = [make_node(f"n{i}", in_flight=i, latency=0.01) for i in range(4)]
    balancer = LatencyAware(random.Random(2024))
    draws = 12_000
    counts = dict.fromkeys(nodes, 0)
    for _ in range(draws):
        counts[balancer.pick(nodes, 0.0)] += 1
    # a node wins exactly the pairs it forms with a more loaded node: 3, 2, 1, 0 of 6
    shares = [counts[node] / draws for node in nodes]
    assert shares[3] == 0.0  # the most loaded node loses every pair
    assert shares[:3] == pytest.approx([3 / 6, 2 / 6, 1 / 6], abs=0.02)


# -------------------------------------------------------------- candidates

NODES = [make_node(f"n{i}") for i in range(5)]


@settings(max_examples=150, deadline=None)
@given(
    policy=st.sampled_from(["round_robin", "latency_aware"]),
    seed=st.integers(0, 2**32),
    slow_start=st.sampled_from([0.0, 10.0]),
    recovered=st.lists(st.one_of(st.none(), st.floats(0.0, 20.0)), min_size=5, max_size=5),
    in_flight=st.lists(st.integers(0, 5), min_size=5, max_size=5),
    rounds=st.lists(
        st.tuples(st.permutations(range(5)), st.integers(1, 5), st.floats(0.0, 30.0)),
        min_size=1,
        max_size=25,
    ),
)
def test_never_picks_a_node_outside_the_candidates(
    policy, seed, slow_start, recovered, in_flight, rounds
):
    nodes = [
        make_node(f"n{i}", in_flight=in_flight[i], latency=0.01 * (i + 1), recovered_at=r)
        for i, r in enumerate(recovered)
    ]
    balancer = make_balancer(policy, random.Random(seed), slow_start=slow_start)
    for order, size, now in rounds:
        candidates = [nodes[i] for i in order[:size]]
        picked = balancer.pick(candidates, now)
        assert any(picked is c for c in candidates), (
            picked.address,
            [c.address for c in candidates],
        )


def test_make_balancer_names():
    rng = random.Random(0)
    assert type(make_balancer("round_robin", rng, slow_start=0.0)) is RoundRobin
    balancer = make_balancer("latency_aware", rng, slow_start=12.0)
    assert type(balancer) is LatencyAware and balancer.slow_start == 12.0
    with pytest.raises(ValueError, match="least_conn"):
        make_balancer("least_conn", rng, slow_start=0.0)


# ------------------------------------------------------------- slow start


def test_ramp_grows_linearly_from_a_tenth_to_full():
    balancer = RoundRobin(random.Random(0), slow_start=100.0)
    node = make_node("r", recovered_at=50.0)
    assert balancer.ramp(node, 50.0) == 0.1
    assert balancer.ramp(node, 55.0) == 0.1  # 5% is below the floor
    assert balancer.ramp(node, 75.0) == 0.25
    assert balancer.ramp(node, 100.0) == 0.5
    assert balancer.ramp(node, 149.0) == pytest.approx(0.99)
    assert balancer.ramp(node, 150.0) == 1.0
    assert balancer.ramp(node, 1000.0) == 1.0
    assert balancer.ramp(make_node("never-down"), 50.0) == 1.0
    assert RoundRobin(random.Random(0), slow_start=0.0).ramp(node, 50.0) == 1.0


DRAWS = 12_000


def relative_share(policy: str, elapsed: float, seed: int = 99) -> float:
    """The recovering node's traffic share over its full-rate share (1/3)."""
    recovering = make_node("recovering", recovered_at=0.0)
    others = [make_node("b"), make_node("c")]
    candidates = [recovering, *others]
    balancer = make_balancer(policy, random.Random(seed), slow_start=100.0)
    picked = sum(balancer.pick(candidates, elapsed) is recovering for _ in range(DRAWS))
    return picked / DRAWS * len(candidates)


@pytest.mark.parametrize("policy", ["round_robin", "latency_aware"])
@pytest.mark.parametrize("elapsed", [0.0, 5.0, 25.0, 50.0, 75.0])
def test_recovering_node_gets_its_ramp_share_of_traffic(policy, elapsed):
    """Recovered ``elapsed`` s ago with slow_start=100: max(0.1, elapsed/100) of normal traffic."""
    expected = max(0.1, elapsed / 100.0)
    share = relative_share(policy, elapsed)
    assert share == pytest.approx(expected, abs=0.025), (
        f"{policy}: recovering node takes {share:.3f} of its normal traffic "
        f"{elapsed:g} s into a 100 s slow start, expected {expected:.3f}"
    )


@pytest.mark.parametrize("policy", ["round_robin", "latency_aware"])
@pytest.mark.parametrize("elapsed", [100.0, 250.0])
def test_recovered_node_is_at_full_rate_after_slow_start(policy, elapsed):
    assert relative_share(policy, elapsed) == pytest.approx(1.0, abs=0.04)


def test_ramping_node_is_still_picked_when_it_is_the_only_candidate():
    recovering = make_node("recovering", recovered_at=0.0)
    for policy in ("round_robin", "latency_aware"):
        balancer = make_balancer(policy, random.Random(1), slow_start=100.0)
        assert all(balancer.pick([recovering], 0.0) is recovering for _ in range(20))
