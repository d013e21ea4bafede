"""The nemesis: carries out a :class:`~tests.soak.faults.Schedule` on a running cluster.

It acts on three levels, all from outside the driver:

- processes: SIGKILL and SIGTERM (then a restart on the same port) through
  :class:`~qdb_client.testing.TestCluster`, SIGSTOP/SIGCONT by pid;
- the network: toxics on each node's fault proxy, over the proxy's
  JSON-lines control port (:class:`~qdb_client.testing.ProxyControl`);
- the nodes' fault controls (:class:`~qdb_client.testing.NodeControl`,
  connected to the node itself, never through its proxy).

Each lane of the schedule runs in its own task, one fault after another,
each applied at its planned time and reverted at its planned end (or as
soon as applying it allows). What really happened (start and end in
``time.monotonic()``, and any error) goes to ``faults.jsonl`` as each fault
ends. :meth:`Nemesis.heal` then clears everything and waits until every
node answers through its proxy.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from qdb_client.errors import AuthenticationFailed, ConnectionLost, PermissionDenied, QdbError
from qdb_client.testing import NodeControl, ProxyControl, TestCluster, wait_for_nodes

from .faults import FaultSpec, Schedule
from .history import HistoryWriter
from .processes import PidFile, ProxyProcess

__all__ = ["Nemesis"]

#: Seconds each control call (node or proxy) may take.
CONTROL_TIMEOUT = 5.0
#: Seconds the heal may take before the run is declared broken.
HEAL_TIMEOUT = 30.0
_TOXIC_OPTIONS = ("direction", "toxicity")


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await trio.sleep(delay)
    else:
        await trio.lowlevel.checkpoint()


class Nemesis:
    """Applies, reverts and finally heals the faults of one run."""

    def __init__(
        self,
        cluster: TestCluster,
        proxies: Sequence[ProxyProcess],
        *,
        records: HistoryWriter,
        pids: PidFile,
        say: Callable[[str], None] = print,
    ) -> None:
        self.cluster = cluster
        self.proxies = list(proxies)
        self.records = records
        self.pids = pids
        self.say = say
        self.nodes = [self._node_control(i) for i in range(len(cluster.nodes))]
        self.toxics = [ProxyControl(p.control, call_timeout=CONTROL_TIMEOUT) for p in proxies]
        self.paused: set[int] = set()
        self.node_stats: dict[int, dict[str, Any]] = {}
        self.t0 = 0.0

    def _node_control(self, node: int) -> NodeControl:
        """A control connection to node ``node`` with the token it drew at its last start."""
        server = self.cluster.nodes[node]
        return NodeControl(
            server.address, call_timeout=CONTROL_TIMEOUT, control_token=server.control_token
        )

    async def aclose(self) -> None:
        """Close every control connection."""
        with trio.CancelScope(shield=True):
            for control in [*self.nodes, *self.toxics]:
                await control.aclose()

    # ------------------------------------------------------------------ running

    async def run(self, schedule: Schedule, t0: float) -> None:
        """Carry out ``schedule``; ``t0`` is the workload's start (monotonic)."""
        self.t0 = t0
        async with trio.open_nursery() as nursery:
            for lane in sorted({f.lane for f in schedule.faults}):
                faults = [f for f in schedule.faults if f.lane == lane]
                nursery.start_soon(self._lane, faults)

    async def _lane(self, faults: list[FaultSpec]) -> None:
        for spec in faults:
            await _sleep_until(self.t0 + spec.at)
            await self._one(spec)

    async def _one(self, spec: FaultSpec) -> None:
        start = time.monotonic()
        errors: list[str] = []
        applied: Any = None
        self.say(f"  t={start - self.t0:6.1f}s  + {spec.describe().split('  ', 1)[0].strip()}")
        try:
            applied = await self._apply(spec)
        except (PermissionDenied, AuthenticationFailed) as exc:
            # Not a fault of the run but of the harness: nothing it planned would happen.
            raise RuntimeError(f"{spec.id}: the node refused its control tool: {exc}") from exc
        except (QdbError, OSError, RuntimeError) as exc:
            errors.append(f"apply: {type(exc).__name__}: {exc}")
        try:
            if spec.kind == "drop_connections":
                await self._keep_dropping(spec)
            await _sleep_until(self.t0 + spec.end)
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self._revert(spec, applied)
                except (QdbError, OSError, RuntimeError) as exc:
                    errors.append(f"revert: {type(exc).__name__}: {exc}")
                end = time.monotonic()
                self.records.write(
                    {
                        "type": "fault",
                        "id": spec.id,
                        "kind": spec.kind,
                        "nodes": list(spec.nodes),
                        "params": spec.params,
                        "planned_at": spec.at,
                        "planned_end": spec.end,
                        "start": start,
                        "end": end,
                        "nonretryable": spec.nonretryable,
                        "excuses": list(spec.excuses),
                        "error": "; ".join(errors) or None,
                    }
                )
        if errors:
            self.say(f"  t={end - self.t0:6.1f}s  ! {spec.id}: {'; '.join(errors)}")

    async def _apply(self, spec: FaultSpec) -> Any:
        (node,) = spec.nodes
        kind, params = spec.kind, spec.params
        if kind == "kill":
            await self.cluster.kill(node)
        elif kind == "terminate":
            await self.cluster.stop(node, grace=1.0)
        elif kind == "pause":
            self._signal(node, signal.SIGSTOP)
            self.paused.add(node)
        elif spec.family == "proxy":
            toxic, _, mode = kind.partition("-")
            attributes = {k: v for k, v in params.items() if k not in _TOXIC_OPTIONS}
            if mode:
                attributes["mode"] = mode
            return await self.toxics[node].add_toxic(
                toxic,
                direction=params.get("direction", "downstream"),
                toxicity=params.get("toxicity", 1.0),
                name=spec.id,
                **attributes,
            )
        else:
            await self._control(node, lambda ctl: self._apply_control(ctl, kind, params))
        return None

    async def _apply_control(self, ctl: NodeControl, kind: str, params: dict[str, Any]) -> None:
        if kind in ("fail-retryable", "fail-nonretryable"):
            await ctl.fail_next(params["count"], code=params["code"])
        elif kind == "drop_after_commit":
            await ctl.drop_after_commit(params["count"])
        elif kind == "drop_connections":
            await ctl.drop_connections()
        elif kind == "refuse_connections":
            await ctl.refuse_connections(True)
            if params.get("drop"):
                await ctl.drop_connections()
        elif kind == "stop_pings":
            await ctl.stop_pings(True)
        elif kind == "node-latency":
            await ctl.add_latency("*", params["seconds"])
        else:
            raise RuntimeError(f"unknown fault kind {kind!r}")

    async def _keep_dropping(self, spec: FaultSpec) -> None:
        (node,) = spec.nodes
        every = spec.params["every"]
        while time.monotonic() + every < self.t0 + spec.end:
            await trio.sleep(every)
            try:
                await self._control(node, lambda ctl: ctl.drop_connections())
            except QdbError:
                pass  # reported by the revert, if the node is really gone

    async def _revert(self, spec: FaultSpec, applied: Any) -> None:
        (node,) = spec.nodes
        kind = spec.kind
        if kind in ("kill", "terminate"):
            await self._restart(node)
        elif kind == "pause":
            self._signal(node, signal.SIGCONT)
            self.paused.discard(node)
        elif spec.family == "proxy":
            if applied is not None:
                await self.toxics[node].remove_toxic(applied)
        elif kind in ("fail-retryable", "fail-nonretryable"):
            await self._control(node, lambda ctl: ctl.fail_next(0))
        elif kind == "drop_after_commit":
            await self._control(node, lambda ctl: ctl.drop_after_commit(0))
        elif kind == "refuse_connections":
            await self._control(node, lambda ctl: ctl.refuse_connections(False))
        elif kind == "stop_pings":
            await self._control(node, lambda ctl: ctl.stop_pings(False))
        elif kind == "node-latency":
            await self._control(node, lambda ctl: ctl.add_latency("*", 0))

    async def _control(self, node: int, call: Callable[[NodeControl], Awaitable[Any]]) -> Any:
        """``call`` on node ``node``'s control connection, once more on a fresh connection if
        the node had closed the old one: NodeControl notices an idle close (GOAWAY
        ``idle_timeout`` after 30 s without a call) only by failing the call that meets it."""
        try:
            return await call(self.nodes[node])
        except ConnectionLost:
            await self.nodes[node].aclose()
            return await call(self.nodes[node])

    def _signal(self, node: int, sig: int) -> None:
        pid = self.cluster.nodes[node].pid
        if pid is None:
            raise RuntimeError(f"node {node} is not running")
        os.kill(pid, sig)

    async def _restart(self, node: int) -> None:
        await self.nodes[node].aclose()
        await self.cluster.restart(node)
        self.nodes[node] = self._node_control(node)  # a restarted node has a new token
        self.pids.add(self.cluster.nodes[node].pid, f"node-{node}")

    # ------------------------------------------------------------------ healing

    async def heal(self) -> tuple[float, float]:
        """Clear every toxic and fault, SIGCONT, restart dead nodes, and wait until every
        node answers ``ping`` through its proxy. Returns (start, end), monotonic."""
        start = time.monotonic()
        self.say(f"  t={start - self.t0:6.1f}s  heal: clear toxics, SIGCONT, restart, reset")
        with trio.fail_after(HEAL_TIMEOUT):
            for control in self.toxics:
                await control.clear()
            for index, server in enumerate(self.cluster.nodes):
                if server.running and server.pid is not None:
                    os.kill(server.pid, signal.SIGCONT)
                    self.paused.discard(index)
            for index, server in enumerate(self.cluster.nodes):
                if not server.running:
                    await self._restart(index)
            for index in range(len(self.nodes)):
                self.node_stats[index] = await self._control(index, lambda ctl: ctl.stats())
                await self._control(index, lambda ctl: ctl.reset())
            await wait_for_nodes([p.address for p in self.proxies])
        end = time.monotonic()
        self.records.write({"type": "heal", "start": start, "end": end})
        self.say(f"  t={end - self.t0:6.1f}s  healed in {end - start:.2f} s")
        return start, end
