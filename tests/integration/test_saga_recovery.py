"""A process running a saga is SIGKILLed; another resumes the saga from the database.

A subprocess test node holds the database. This module is also the saga
runner (``python -m tests.integration.test_saga_recovery ADDRESS SAGA_ID
MODE``): it runs the order saga against the node until it reaches the point
``MODE`` names, prints ``AT <mode>`` and waits; the test then kills it with
SIGKILL, resumes the saga in this process with :func:`order_steps` (the one
place both processes declare the steps, as docs/observability.md advises)
and checks what the database holds: each step's write applied exactly once,
the saga's row ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

import qdb_client
from qdb_client.saga import Saga, Step, StepContext, load_saga, pending_sagas
from qdb_client.testing import TestCluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"request_timeout": 10.0, "heartbeat_interval": 1.0}
#: Where the runner stops and waits to be killed.
MODES = ("between_steps", "inside_a_step", "while_compensating")


async def record(ctx: StepContext, entry: str) -> str:
    """The write every step makes, keyed so a step run twice applies once."""
    await ctx.client.execute(
        "INSERT INTO ledger (saga_id, entry) VALUES (?, ?)",
        [ctx.saga_id, entry],
        idempotency_key=ctx.idempotency_key,
    )
    return entry


async def halt(mode: str) -> None:
    """In the runner: say where we are, then wait for the SIGKILL."""
    print(f"AT {mode}", flush=True)
    await trio.sleep_forever()


def order_steps(mode: str | None = None) -> list[Step]:
    """The order saga's steps. ``mode`` (in the runner only) makes it halt there."""

    async def reserve(ctx: StepContext) -> str:
        return await record(ctx, "reserve")

    async def release(ctx: StepContext) -> None:
        await record(ctx, "release")

    async def charge(ctx: StepContext) -> str:
        entry = await record(ctx, "charge")
        if mode == "inside_a_step":  # written, but not yet recorded as done
            await halt(mode)
        return entry

    async def refund(ctx: StepContext) -> None:
        if mode == "while_compensating":
            await halt(mode)
        await record(ctx, "refund")

    async def ship(ctx: StepContext) -> str:
        if mode == "between_steps":  # reserve and charge are recorded
            await halt(mode)
        if mode == "while_compensating":
            raise RuntimeError("no courier")
        return await record(ctx, "ship")

    return [Step("reserve", reserve, release), Step("charge", charge, refund), Step("ship", ship)]


async def run_saga(address: str, saga_id: str, mode: str) -> None:
    """The runner's main: start the saga and halt where ``mode`` says."""
    async with qdb_client.open_client(address, **OPTIONS) as client:
        saga = Saga(client, "order", saga_id=saga_id)
        for step in order_steps(mode):
            saga.add_step(step.name, step.action, step.compensation)
        await saga.execute()
        print("FINISHED", flush=True)


async def wait_for_line(process: trio.Process, expected: str) -> None:
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(30):
        while expected.encode() not in buffer:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise AssertionError(f"runner exited ({await process.wait()}): {buffer!r}")
            buffer += chunk


async def ledger(client: qdb_client.Client, saga_id: str) -> list[str]:
    result = await client.query(
        "SELECT entry FROM ledger WHERE saga_id = ? ORDER BY rowid", [saga_id]
    )
    return [row[0] for row in result]


EXPECTED: dict[str, dict[str, Any]] = {
    "between_steps": {
        "status": "completed",
        "ledger": ["reserve", "charge", "ship"],
        "compensated": [],
    },
    "inside_a_step": {
        "status": "completed",
        "ledger": ["reserve", "charge", "ship"],  # charge ran twice, applied once
        "compensated": [],
    },
    "while_compensating": {
        "status": "compensated",
        "ledger": ["reserve", "charge", "refund", "release"],
        "compensated": ["charge", "reserve"],
    },
}
#: What the killed runner left in the table.
LEFT = {
    "between_steps": ("running", ["reserve", "charge"]),
    "inside_a_step": ("running", ["reserve"]),
    "while_compensating": ("compensating", ["reserve", "charge"]),
}


@pytest.mark.parametrize("mode", MODES)
async def test_a_saga_killed_with_its_process_is_resumed_from_the_database(mode: str):
    saga_id = f"kill-{mode}-{uuid.uuid4().hex[:8]}"
    async with TestCluster.start_subprocesses(n=1) as cluster:
        address = cluster.addresses[0]
        async with qdb_client.open_client(address, **OPTIONS) as client:
            await client.execute(
                "CREATE TABLE IF NOT EXISTS ledger (saga_id TEXT NOT NULL, entry TEXT NOT NULL)"
            )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-m", "tests.integration.test_saga_recovery"]
        runner = await trio.lowlevel.open_process(
            [*command, address, saga_id, mode],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
        )
        try:
            await wait_for_line(runner, f"AT {mode}")
        finally:
            runner.kill()  # SIGKILL: no cleanup of any kind in the runner
            with trio.CancelScope(shield=True):
                await runner.wait()
                if runner.stdout is not None:
                    await runner.stdout.aclose()
        assert runner.returncode == -signal.SIGKILL

        async with qdb_client.open_client(address, **OPTIONS) as client:
            stored = await load_saga(client, saga_id)
            assert stored is not None
            assert (stored.status, stored.completed_steps) == LEFT[mode]
            assert saga_id in [s.saga_id for s in await pending_sagas(client)]

            result = await Saga.resume(client, saga_id, steps=order_steps())

            expected = EXPECTED[mode]
            assert result.status == expected["status"]
            assert list(result.compensated_steps) == expected["compensated"]
            assert await ledger(client, saga_id) == expected["ledger"]
            stored = await load_saga(client, saga_id)
            assert stored is not None and stored.status == expected["status"]
            assert saga_id not in [s.saga_id for s in await pending_sagas(client)]


if __name__ == "__main__":
    trio.run(run_saga, *sys.argv[1:4])
