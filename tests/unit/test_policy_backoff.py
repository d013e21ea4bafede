"""Backoff schedule: exact bases, jitter within bounds, deterministic with a seeded rng."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qdb_client._policies import Backoff, Jitter


def test_driver_seed_schedule_without_jitter():
    backoff = Backoff(initial=0.1, maximum=5.0, multiplier=2.0, jitter="none")
    rng = random.Random(1)
    assert [backoff.delay(n, rng) for n in range(7)] == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    )


def test_base_caps_without_overflow_for_huge_attempts():
    backoff = Backoff(initial=1.0, maximum=120.0, multiplier=1.6)
    assert backoff.base(10_000) == 120.0


@given(
    attempt=st.integers(min_value=0, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32),
    jitter=st.sampled_from(list(Jitter)),
    previous=st.none() | st.floats(min_value=0.1, max_value=5.0),
)
def test_every_delay_lies_within_its_bounds(attempt, seed, jitter, previous):
    backoff = Backoff(initial=0.1, maximum=5.0, multiplier=2.0, jitter=jitter, factor=0.1)
    low, high = backoff.bounds(attempt)
    delay = backoff.delay(attempt, random.Random(seed), previous)
    assert low <= delay <= high


def test_proportional_jitter_spreads_both_ways():
    backoff = Backoff(initial=1.0, maximum=10.0, jitter="proportional", factor=0.2)
    rng = random.Random(7)
    delays = [backoff.delay(0, rng) for _ in range(500)]
    assert min(delays) < 0.9 and max(delays) > 1.1
    assert all(0.8 <= d <= 1.2 for d in delays)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": 0, "maximum": 1},
        {"initial": 2, "maximum": 1},
        {"initial": 1, "maximum": 2, "multiplier": 0.5},
        {"initial": 1, "maximum": 2, "factor": 1.5},
        {"initial": 1, "maximum": 2, "jitter": "sometimes"},
        {"initial": float("nan"), "maximum": 2},
    ],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)
