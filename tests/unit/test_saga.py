"""The saga helper (seed 003's saga tests), in virtual time against a real test node.

The client reaches a :class:`~qdb_client.testing.QdbNode` over in-memory
streams (SQL runs inline under the mock clock), so the ``qdb_sagas`` table is
real SQLite and every backoff is exact. The first five tests are seed 003's,
under its names.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import qdb_client
import qdb_client._transport.establish as establish_module
from qdb_client.saga import (
    Saga,
    SagaCompensated,
    SagaCompleted,
    SagaError,
    SagaStarted,
    SagaStepCompleted,
    Step,
    StepContext,
    load_saga,
    pending_sagas,
)
from qdb_client.testing import QdbNode, ServerConfig

OPTIONS = {"random_seed": 3, "heartbeat_interval": 1000.0, "request_timeout": 30.0}
NO_JITTER = qdb_client._policies.Backoff(initial=0.1, maximum=5.0, multiplier=2.0, jitter="none")


@pytest.fixture
async def node(nursery, monkeypatch, tmp_path: Path) -> AsyncIterator[QdbNode]:
    """A test node on a private SQLite file; every client connection reaches it in memory."""
    served = QdbNode(
        ServerConfig(
            test_mode=True,
            database=tmp_path / "qdb.sqlite3",
            client_idle_timeout=3600.0,
            request_timeout=60.0,
        )
    )

    async def open_tcp(address: str) -> trio.abc.Stream:
        client_end, node_end = trio.testing.memory_stream_pair()
        nursery.start_soon(served.serve_connection, node_end)
        return client_end

    monkeypatch.setattr(establish_module, "open_tcp", open_tcp)
    yield served
    await served.aclose()


class Recorder:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.events.append(event)

    def types(self) -> list[str]:
        return [getattr(e, "event_type", "") for e in self.events if hasattr(e, "event_type")]


class Shop:
    """Steps that write to a ``log`` table, so the test can see what ran, and in which order."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    @staticmethod
    async def setup(client: qdb_client.Client) -> None:
        await client.execute("CREATE TABLE IF NOT EXISTS log (entry TEXT)")

    def step(self, label: str, *, fail: bool = False):
        async def run(ctx: StepContext) -> str:
            self.ran.append(label)
            if fail:
                raise RuntimeError(f"{label} refused")
            await ctx.client.execute(
                "INSERT INTO log VALUES (?)", [label], idempotency_key=ctx.idempotency_key
            )
            return f"{label}-id"

        return run

    @staticmethod
    async def log(client: qdb_client.Client) -> list[str]:
        return [row[0] for row in await client.query("SELECT entry FROM log ORDER BY rowid")]


def order_saga(client: qdb_client.Client, shop: Shop, *, fail_payment: bool = False) -> Saga:
    saga = Saga(client, "test_saga", backoff=NO_JITTER)
    saga.add_step("step1", shop.step("create user"), shop.step("delete user"))
    saga.add_step("step2", shop.step("create order"), shop.step("cancel order"))
    saga.add_step("step3", shop.step("payment", fail=fail_payment), shop.step("refund"))
    return saga


# ------------------------------------------------------------ seed 003


async def test_saga_successful_execution(node, autojump_clock):
    shop = Shop()
    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        await shop.setup(client)
        result = await order_saga(client, shop).execute()
        assert result.status == "completed"
        assert len(result.completed_steps) == 3
        assert len(result.compensated_steps) == 0
        assert result.results == {
            "step1": "create user-id",
            "step2": "create order-id",
            "step3": "payment-id",
        }
        assert await shop.log(client) == ["create user", "create order", "payment"]
        stored = await load_saga(client, result.saga_id)
        assert stored is not None and stored.status == "completed"
        assert stored.completed_steps == ["step1", "step2", "step3"]


async def test_saga_compensation_on_failure(node, autojump_clock):
    shop = Shop()
    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        await shop.setup(client)
        result = await order_saga(client, shop, fail_payment=True).execute()
        assert result.status == "compensated"
        assert len(result.completed_steps) == 2
        assert len(result.compensated_steps) == 2
        # Compensation order: the reverse of execution.
        assert result.compensated_steps[0] == "step2"
        assert result.compensated_steps[1] == "step1"
        assert result.failed_step == "step3"
        assert result.error == "RuntimeError: payment refused"
        log = await shop.log(client)
        assert log == ["create user", "create order", "cancel order", "delete user"]
        assert "refund" not in shop.ran  # the failed step itself is not compensated
        assert client.statistics()["reliability"]["saga_compensations"]["total"] == 2


async def test_saga_compensation_retry(node, autojump_clock):
    outcomes = [RuntimeError("Compensation failed"), RuntimeError("Compensation failed"), "ok"]
    tried_at: list[float] = []

    async def flaky_compensation(ctx: StepContext) -> None:
        tried_at.append(trio.current_time())
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome

    shop = Shop()
    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        await shop.setup(client)
        saga = Saga(client, "test_saga", backoff=NO_JITTER)
        saga.add_step("step1", shop.step("create user"), shop.step("delete user"))
        saga.add_step("step2", shop.step("create order"), flaky_compensation)
        saga.add_step("step3", shop.step("payment", fail=True))
        result = await saga.execute()
        assert result.status == "compensated"
        assert result.compensation_retries == 2
        assert result.compensated_steps == ("step2", "step1")
        # Backoff between the tries: 0.1 s then 0.2 s, exactly (no jitter).
        assert [b - a for a, b in itertools.pairwise(tried_at)] == [
            pytest.approx(0.1),
            pytest.approx(0.2),
        ]
        reliability = client.statistics()["reliability"]
        assert reliability["saga_compensation_retries"]["total"] == 2
        assert (await load_saga(client, saga.id)).compensation_retries == 2


async def test_saga_state_persistence(node, autojump_clock):
    """A restart between steps: the saga is resumed by another client and completes."""
    shop = Shop()
    in_payment = trio.Event()

    async def slow_payment(ctx: StepContext) -> None:
        in_payment.set()
        await trio.sleep_forever()  # the process "dies" here

    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        await shop.setup(client)
        saga = Saga(client, "test_saga")
        saga.add_step("step1", shop.step("create user"), shop.step("delete user"))
        saga.add_step("step2", shop.step("create order"), shop.step("cancel order"))
        saga.add_step("step3", slow_payment, shop.step("refund"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(saga.execute)
            await in_payment.wait()
            nursery.cancel_scope.cancel()  # simulate the system restart
        saga_id = saga.id

    # A new process: a new client, the same database.
    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        stored = await load_saga(client, saga_id)
        assert stored is not None
        assert (stored.status, stored.completed_steps) == ("running", ["step1", "step2"])
        assert [s.saga_id for s in await pending_sagas(client)] == [saga_id]
        steps = [
            Step("step1", shop.step("create user"), shop.step("delete user")),
            ("step2", shop.step("create order"), shop.step("cancel order")),
            Step("step3", shop.step("payment"), shop.step("refund")),
        ]
        result = await Saga.resume(client, saga_id, steps=steps)
        assert result.status == "completed"
        assert len(result.completed_steps) == 3
        assert await shop.log(client) == ["create user", "create order", "payment"]
        assert await pending_sagas(client) == []
        # Resuming an ended saga returns its stored result and runs nothing.
        again = await Saga.resume(client, saga_id, steps=steps)
        assert again == result
    assert shop.ran == ["create user", "create order", "payment"]


async def test_saga_event_publishing(node, autojump_clock):
    shop = Shop()
    recorder = Recorder()
    async with qdb_client.open_client("n:1", listeners=[recorder], **OPTIONS) as client:
        await shop.setup(client)
        saga = Saga(client, "test_saga")
        saga.add_step("step1", shop.step("create user"))
        saga.add_step("step2", shop.step("create order"))
        await saga.execute()
    event_types = recorder.types()
    assert len(event_types) >= 4  # start, step1, step2, complete
    assert "saga.started" in event_types
    assert "saga.step_completed" in event_types
    assert "saga.completed" in event_types
    assert event_types == [
        "saga.started",
        "saga.step_completed",
        "saga.step_completed",
        "saga.completed",
    ]
    started, first, second, done = (e for e in recorder.events if hasattr(e, "event_type"))
    assert isinstance(started, SagaStarted) and started.steps == ("step1", "step2")
    assert isinstance(first, SagaStepCompleted) and (first.step, first.index) == ("step1", 0)
    assert isinstance(second, SagaStepCompleted) and second.step == "step2"
    assert isinstance(done, SagaCompleted) and done.status == "completed"
    assert {e.saga_id for e in (started, first, second, done)} == {saga.id}


# ------------------------------------------------------------ beyond the seed


async def test_a_compensation_that_keeps_failing_leaves_a_failed_saga_that_resume_finishes(
    node, autojump_clock
):
    broken = True
    tries = 0

    async def cancel_order(ctx: StepContext) -> None:
        nonlocal tries
        tries += 1
        if broken:
            raise ConnectionError("order service down")
        assert ctx.result == "create order-id"  # the action's result, from the database

    shop = Shop()
    recorder = Recorder()
    async with qdb_client.open_client("n:1", listeners=[recorder], **OPTIONS) as client:
        await shop.setup(client)
        saga = Saga(client, "test_saga", backoff=NO_JITTER)
        steps = [
            Step("step1", shop.step("create user"), shop.step("delete user")),
            Step("step2", shop.step("create order"), cancel_order),
            Step("step3", shop.step("payment", fail=True)),
        ]
        for step in steps:
            saga.add_step(step.name, step.action, step.compensation)
        start = trio.current_time()
        result = await saga.execute()
        assert result.status == "failed"
        assert tries == 4  # the first try and 3 retries
        assert result.compensation_retries == 3
        assert trio.current_time() - start == pytest.approx(0.1 + 0.2 + 0.4)
        assert result.compensated_steps == ()  # step1 stays: step2 may depend on it
        assert result.error == "compensation of step2: ConnectionError: order service down"
        assert [s.status for s in await pending_sagas(client, "test_saga")] == ["failed"]

        broken = False
        resumed = await Saga.resume(client, saga.id, steps=steps)
        assert resumed.status == "compensated"
        assert resumed.compensated_steps == ("step2", "step1")
        assert await shop.log(client) == ["create user", "create order", "delete user"]
        summary = client.statistics()["reliability"]
        assert summary["sagas"]["total"] == 2  # one ended failed, then compensated
        assert summary["sagas_failed"]["total"] == 1
        assert summary["ratios"]["saga_compensation_rate"] == 1.0
    compensated = [e for e in recorder.events if isinstance(e, SagaCompensated)]
    assert [(e.step, e.retries) for e in compensated] == [("step2", 0), ("step1", 0)]
    ends = [e.status for e in recorder.events if isinstance(e, SagaCompleted)]
    assert ends == ["failed", "compensated"]


async def test_resume_compensates_what_a_crash_left_half_compensated(node, autojump_clock):
    shop = Shop()
    stalled = trio.Event()

    async def stuck(ctx: StepContext) -> None:
        stalled.set()
        await trio.sleep_forever()

    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        await shop.setup(client)
        saga = Saga(client, "test_saga")
        saga.add_step("step1", shop.step("create user"), stuck)
        saga.add_step("step2", shop.step("create order"), shop.step("cancel order"))
        saga.add_step("step3", shop.step("payment", fail=True))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(saga.execute)
            await stalled.wait()
            nursery.cancel_scope.cancel()
        stored = await load_saga(client, saga.id)
        assert (stored.status, stored.compensated_steps) == ("compensating", ["step2"])
        result = await Saga.resume(
            client,
            saga.id,
            steps=[
                ("step1", shop.step("create user"), shop.step("delete user")),
                ("step2", shop.step("create order"), shop.step("cancel order")),
                ("step3", shop.step("payment")),
            ],
        )
        assert result.status == "compensated"
        assert result.compensated_steps == ("step2", "step1")
        assert shop.ran.count("cancel order") == 1  # not compensated twice
        log = await shop.log(client)
        assert log == ["create user", "create order", "cancel order", "delete user"]


async def test_resume_refuses_steps_that_differ_from_the_stored_ones(node, autojump_clock):
    shop = Shop()
    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        await shop.setup(client)
        saga = order_saga(client, shop)
        await saga.execute()
        with pytest.raises(SagaError, match="declare the same steps"):
            await Saga.resume(client, saga.id, steps=[("step1", shop.step("x"))])
        with pytest.raises(SagaError, match="no saga"):
            await Saga.resume(client, "unknown-saga", steps=[])
        with pytest.raises(SagaError, match="executed already"):
            await saga.execute()
        reused = Saga(client, "test_saga", saga_id=saga.id).add_step("s", shop.step("s"))
        with pytest.raises(SagaError, match="already used"):
            await reused.execute()


def test_bad_saga_declarations_are_refused_at_once():
    async def act(ctx: StepContext) -> None:
        return None

    client: Any = object()
    with pytest.raises(SagaError, match="saga id"):
        Saga(client, "s", saga_id="not a valid id!")
    with pytest.raises(SagaError, match="name"):
        Saga(client, "")
    with pytest.raises(SagaError, match="max_compensation_retries"):
        Saga(client, "s", max_compensation_retries=-1)
    saga = Saga(client, "s").add_step("a", act)
    with pytest.raises(SagaError, match="unique"):
        saga.add_step("a", act)
    with pytest.raises(SagaError, match="callables"):
        saga.add_step("b", "not callable")  # type: ignore[arg-type]


def test_step_idempotency_keys_are_stable_and_valid():
    ctx = StepContext(None, "abc123", "order", "charge", 2, "action")  # type: ignore[arg-type]
    undo = StepContext(None, "abc123", "order", "charge", 2, "compensation", 3)  # type: ignore[arg-type]
    assert ctx.idempotency_key == "saga:abc123:2:do"
    assert undo.idempotency_key == "saga:abc123:2:undo"


async def test_a_compensation_sees_the_same_step_result_before_and_after_a_resume(
    node, autojump_clock
):
    # A result JSON changes (a tuple, an int key) reached the compensation as
    # itself in the first run and as its JSON form after a resume; now always the
    # JSON form, as stored.
    seen: list[Any] = []

    async def reserve(ctx: StepContext) -> Any:
        return {7: ("held", 1)}

    async def release(ctx: StepContext) -> None:
        seen.append(ctx.result)

    async def charge(ctx: StepContext) -> None:
        raise RuntimeError("card declined")

    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        saga = Saga(client, "order")
        saga.add_step("reserve", reserve, release)
        saga.add_step("charge", charge, None)
        result = await saga.execute()
        assert result.status == "compensated"
        stored = await load_saga(client, saga.id)
        assert stored is not None
    assert seen == [{"7": ["held", 1]}] == [stored.results["reserve"]]


@pytest.mark.parametrize("bad", [("only-a-name",), "step", ("s", None, None, None), 42])
async def test_resume_refuses_a_malformed_step_before_any_query(node, autojump_clock, bad):
    async with qdb_client.open_client("n:1", **OPTIONS) as client:
        calls = client.statistics()["calls"]
        with pytest.raises(SagaError, match="a step is a Step"):
            await Saga.resume(client, "s1", steps=[bad])
        assert client.statistics()["calls"] == calls
