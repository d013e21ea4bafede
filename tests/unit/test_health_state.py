"""The node health state machine: every event, in every state, by table.

Pure code: events in, action flags out, no trio.
"""

from __future__ import annotations

import pytest

from qdb_client._cluster.health_state import Action, HealthEvent, NodeHealth, NodeState

E, A = HealthEvent, Action
UP, SUSPECT, DOWN = NodeState.UP, NodeState.SUSPECT, NodeState.DOWN


def in_state(state: NodeState, *, failures_to_down: int = 3) -> NodeHealth:
    health = NodeHealth(failures_to_down=failures_to_down)
    if state is SUSPECT:
        health.handle(E.CONNECTION_LOST, 1.0, "reset")
    elif state is DOWN:
        health.handle(E.OPEN_FAILED, 1.0, "refused")
    assert health.state is state
    return health


# (start state, event, expected state, expected actions)
TRANSITIONS = [
    (UP, E.CONNECTION_LOST, SUSPECT, A.CHANGED | A.PROBE_NOW),
    (SUSPECT, E.CONNECTION_LOST, SUSPECT, A.PROBE_NOW),
    (DOWN, E.CONNECTION_LOST, DOWN, A.PROBE_NOW),
    (UP, E.OPEN_FAILED, DOWN, A.CHANGED | A.DISABLE_POOL | A.PROBE_NOW),
    (SUSPECT, E.OPEN_FAILED, DOWN, A.CHANGED | A.DISABLE_POOL | A.PROBE_NOW),
    (DOWN, E.OPEN_FAILED, DOWN, A.PROBE_NOW),
    (UP, E.CONNECTION_OPENED, UP, A.REACHABLE),
    (UP, E.HEARTBEAT_OK, UP, A.REACHABLE),
    (UP, E.HEARTBEAT_FAILED, SUSPECT, A.CHANGED),
    (SUSPECT, E.HEARTBEAT_FAILED, SUSPECT, A.NONE),
    (SUSPECT, E.PROBE_OK, UP, A.CHANGED | A.WARM_POOL | A.REACHABLE),
    (UP, E.PROBE_OK, UP, A.NONE),
    (SUSPECT, E.PROBE_FAILED, SUSPECT, A.NONE),
    (SUSPECT, E.PROBE_CONNECT_FAILED, DOWN, A.CHANGED | A.DISABLE_POOL),
    (DOWN, E.RECONNECTED, UP, A.CHANGED | A.RECOVERED | A.ENABLE_POOL),
    (UP, E.RECONNECTED, UP, A.NONE),
    (DOWN, E.RECONNECT_FAILED, DOWN, A.NONE),
    (UP, E.ATTEMPT_SILENT, UP, A.PROBE_NOW),
    (SUSPECT, E.ATTEMPT_SILENT, SUSPECT, A.NONE),
    (UP, E.MARKED_DOWN, DOWN, A.CHANGED | A.DISABLE_POOL),
    (DOWN, E.MARKED_UP, UP, A.CHANGED | A.RECOVERED | A.ENABLE_POOL | A.PROBE_NOW),
    (UP, E.MARKED_UP, UP, A.ENABLE_POOL | A.PROBE_NOW),
]


@pytest.mark.parametrize(
    ("start", "event", "state", "actions"),
    TRANSITIONS,
    ids=[f"{s.value}-{e.name}" for s, e, _, _ in TRANSITIONS],
)
def test_transitions(start, event, state, actions):
    health = in_state(start)
    assert health.handle(event, 5.0, "why") == actions
    assert health.state is state
    if state is not UP:
        assert health.reason is not None
    else:
        assert health.reason is None


def test_every_event_has_a_row():
    assert {event for _, event, _, _ in TRANSITIONS} == set(HealthEvent)


def test_suspect_goes_down_after_failures_to_down_probes():
    health = in_state(SUSPECT, failures_to_down=3)
    assert health.handle(E.PROBE_FAILED, 2.0, "no pong") == A.NONE
    assert health.handle(E.PROBE_FAILED, 3.0, "no pong") == A.NONE
    assert health.handle(E.PROBE_FAILED, 4.0, "no pong") == A.CHANGED | A.DISABLE_POOL
    assert (health.state, health.changed_at, health.reason) == (DOWN, 4.0, "no pong")


def test_heartbeat_failure_is_down_at_once_when_one_failure_is_enough():
    health = in_state(UP, failures_to_down=1)
    assert health.handle(E.HEARTBEAT_FAILED, 2.0, "no pong") == A.CHANGED | A.DISABLE_POOL
    assert health.state is DOWN


def test_an_operators_mark_wins_over_probes_in_flight():
    health = in_state(UP)
    health.handle(E.MARKED_DOWN, 1.0)
    for event in (E.HEARTBEAT_FAILED, E.PROBE_OK, E.RECONNECTED, E.RECONNECT_FAILED):
        assert health.handle(event, 2.0, "late") == A.NONE
        assert health.state is DOWN and health.forced_down
    health.handle(E.MARKED_UP, 3.0)
    assert health.state is UP and not health.forced_down


def test_recovery_time_and_counters():
    health = in_state(DOWN)
    health.handle(E.RECONNECT_FAILED, 2.0, "refused")
    health.handle(E.RECONNECT_FAILED, 3.0, "refused")
    assert health.reconnect_attempts == 2
    health.handle(E.RECONNECTED, 4.0)
    assert (health.recovered_at, health.reconnect_attempts, health.changed_at) == (4.0, 0, 4.0)
    assert health.failures == 1  # the one OPEN_FAILED that made it DOWN
