"""Method handlers of the test node, run on a hand-made MethodContext (no node, no socket).

A handler gets only its context: these tests build one from stubs and see
every node action a method takes go through it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import trio

from qdb_client.protocol import ErrorCode, Request
from qdb_client.testing import Faults, NodeStatistics
from qdb_client.testing._failure import RequestFailed
from qdb_client.testing.methods import MethodContext, run_method
from qdb_client.testing.storage import Storage


@attrs.define
class NodeActions:
    """Records the node actions the context hands out."""

    dropped: int = 0
    shutdowns: list[float] = attrs.Factory(list)

    def drop(self) -> int:
        self.dropped += 1
        return 3

    def count(self) -> int:
        return 3


@pytest.fixture
def actions() -> NodeActions:
    return NodeActions()


@pytest.fixture
def storage() -> Iterator[Storage]:
    store = Storage(None, pool_size=1)
    yield store
    store.close()


def context(actions: NodeActions, storage: Storage, **changes: Any) -> MethodContext:
    stats = NodeStatistics()
    faults = Faults(
        refuse=lambda refusing: None,
        drop=lambda: 0,
        stats=lambda: {},
        reset_counters=stats.reset,
    )
    base = MethodContext(
        node_id="n-1",
        storage=storage,
        faults=faults,
        stats=stats,
        test_mode=True,
        scope="",
        is_control_client=False,
        peer="test",
        drop_other_connections=actions.drop,
        count_other_connections=actions.count,
        start_shutdown=actions.shutdowns.append,
        statistics=lambda: {"from": "context"},
    )
    return attrs.evolve(base, **changes)


async def call(ctx: MethodContext, method: str, args: dict[str, Any] | None = None) -> Any:
    deadline = trio.current_time() + 10.0
    return await run_method(ctx, Request(1, method, args or {}), deadline)


async def test_control_methods_act_on_the_node_only_through_the_context(actions, storage):
    ctx = context(actions, storage)
    dropped = await call(ctx, "control.drop_connections")
    assert dropped.result == {"dropped": 3} and actions.dropped == 0  # only after the reply
    assert dropped.after_reply is not None
    dropped.after_reply()
    assert actions.dropped == 1
    stopping = await call(ctx, "control.shutdown", {"grace_ms": 250})
    assert stopping.result == {"shutting_down": True} and actions.shutdowns == []
    stopping.after_reply()
    assert actions.shutdowns == [0.25]
    assert (await call(ctx, "control.stats")).result == {"from": "context"}


async def test_data_methods_use_the_contexts_storage_and_identity(actions, storage):
    ctx = context(actions, storage)
    assert (await call(ctx, "ping")).result == {"node_id": "n-1"}
    await call(ctx, "execute", {"sql": "create table t(x)"})
    written = await call(ctx, "execute", {"sql": "insert into t values (1)"})
    assert written.result == {"rows_affected": 1, "last_insert_id": 1}
    assert (await call(ctx, "query", {"sql": "select x from t"})).result["rows"] == [[1]]


async def test_control_methods_outside_test_mode_are_not_found(actions, storage):
    with pytest.raises(RequestFailed) as failed:
        await call(context(actions, storage, test_mode=False), "control.stats")
    assert failed.value.code is ErrorCode.METHOD_NOT_FOUND


async def test_the_control_tool_neither_sees_nor_consumes_faults(actions, storage):
    ctx = context(actions, storage, is_control_client=True)
    ctx.faults.fail_next(1)
    assert (await call(ctx, "ping")).result == {"node_id": "n-1"}
    with pytest.raises(RequestFailed) as failed:
        await call(attrs.evolve(ctx, is_control_client=False), "ping")
    assert failed.value.code is ErrorCode.UNAVAILABLE


async def test_a_hung_ping_is_no_outcome(actions, storage):
    ctx = context(actions, storage)
    ctx.faults.stop_pings()
    assert await call(ctx, "ping") is None
