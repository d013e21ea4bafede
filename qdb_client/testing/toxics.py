"""The toxics of the fault proxy: their kinds, validation, and what each does to a stream.

A *toxic* (the word and the meanings are Toxiproxy's) degrades one direction
of the connections through a :class:`~qdb_client.testing.proxy.FaultProxy`:
``"upstream"`` is client -> node bytes, ``"downstream"`` node -> client bytes,
``"both"`` is one toxic acting on each direction separately. Time is in
milliseconds, as in Toxiproxy, except ``slicer.delay`` (microseconds).

- ``latency`` (``latency``, ``jitter`` ms): each chunk leaves latency +- jitter
  (uniform) after it was read, never before an earlier chunk.
- ``bandwidth`` (``rate`` KB/s, 1 KB = 1024 B; required): at most that rate,
  in pieces of 100 ms worth. ``slow_close`` (``delay`` ms): the EOF goes late.
- ``timeout`` (``timeout`` ms): drops all data; closes the connection after
  ``timeout``, or never if 0. ``reset_peer`` (``timeout`` ms): RST to the client.
- ``slicer`` (``average_size``, required, ``size_variation`` bytes, ``delay`` us):
  pieces of average +- variation bytes, ``delay`` before each. ``limit_data``
  (``bytes``, required): closes once that many passed (possibly mid-chunk).
- ``down`` (``mode``: ``"refuse"``, the default, or ``"blackhole"``): see below.

Attributes default to 0 unless required. ``down`` ignores ``direction``:
``mode="refuse"`` closes the connections it selects at once (new ones before
any upstream connect); ``mode="blackhole"`` accepts new connections but never
connects them upstream (they stay black holes until the client closes), and
makes open connections drop every byte both ways while it is present.

Timers (``timeout``, ``reset_peer``, ``down``) run from the moment the toxic
applies to a connection: the connection's start, or the toxic's addition if
the connection was open. ``toxicity`` is the probability that a toxic applies
to a connection, decided once per connection.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

import trio

from ..errors import ConfigError

__all__ = [
    "DIRECTIONS",
    "MAX_ATTRIBUTE",
    "TOXIC_KINDS",
    "Behaviour",
    "Chunk",
    "PumpEnd",
    "StopPump",
    "Toxic",
    "ToxicSet",
    "make_behaviour",
    "make_toxic",
]

#: Valid ``direction`` values.
DIRECTIONS = ("upstream", "downstream", "both")
#: Largest value of a numeric attribute (beyond it, floats lose integers).
MAX_ATTRIBUTE = 2**53

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Attr:
    name: str
    unit: str
    default: Any = _REQUIRED
    minimum: float = 0.0
    integer: bool = False
    positive: bool = False
    choices: tuple[str, ...] = ()

    def check(self, kind: str, value: Any) -> Any:
        where = f"{kind} attribute {self.name!r}"
        if self.choices:
            if value not in self.choices:
                raise ConfigError(f"{where} must be {' or '.join(self.choices)}, not {value!r}")
            return value
        wanted = int if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            what = "an integer" if self.integer else "a number"
            raise ConfigError(f"{where} must be {what} of {self.unit}, not {_shown(value)}")
        infinite = isinstance(value, float) and not math.isfinite(value)
        if infinite or value < self.minimum or (self.positive and value <= 0):
            bound = "> 0" if self.positive else f">= {self.minimum:g}"
            raise ConfigError(
                f"{where} must be finite and {bound} ({self.unit}), not {_shown(value)}"
            )
        if value > MAX_ATTRIBUTE:  # an int too large for a float: math would overflow
            raise ConfigError(f"{where} must be at most 2**53 ({self.unit}), not {_shown(value)}")
        return value


def _shown(value: Any) -> str:
    """``repr(value)``, except for integers too long to print in full."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _ms(name: str) -> _Attr:
    return _Attr(name, "milliseconds", default=0)


_SCHEMAS: dict[str, tuple[_Attr, ...]] = {
    "latency": (_ms("latency"), _ms("jitter")),
    "bandwidth": (_Attr("rate", "KB/s", positive=True),),
    "slow_close": (_ms("delay"),),
    "timeout": (_ms("timeout"),),
    "reset_peer": (_ms("timeout"),),
    "slicer": (
        _Attr("average_size", "bytes", minimum=1, integer=True),
        _Attr("size_variation", "bytes", default=0, integer=True),
        _Attr("delay", "microseconds", default=0),
    ),
    "limit_data": (_Attr("bytes", "bytes", integer=True),),
    "down": (_Attr("mode", "", default="refuse", choices=("refuse", "blackhole")),),
}

#: The toxic kinds, in the order the module docstring lists them.
TOXIC_KINDS = tuple(_SCHEMAS)


@dataclasses.dataclass(frozen=True, eq=False)
class Toxic:
    """One validated toxic: immutable; compared by identity (each addition is a new one)."""

    #: Unique name on its proxy, e.g. ``"latency-1"``.
    id: str
    #: One of :data:`TOXIC_KINDS`.
    kind: str
    #: ``"upstream"``, ``"downstream"`` or ``"both"`` (always ``"both"`` for ``down``).
    direction: str
    #: Probability (0..1) that the toxic applies to a connection.
    toxicity: float
    #: Every attribute of the kind, defaults filled in (read-only).
    attributes: Mapping[str, Any]

    def applies_to(self, direction: str) -> bool:
        """Whether the toxic acts on ``direction`` (``"upstream"`` or ``"downstream"``)."""
        return self.direction in (direction, "both")

    def describe(self) -> dict[str, Any]:
        """A plain, JSON-ready dict of the toxic."""
        return {
            "id": self.id,
            "kind": self.kind,
            "direction": self.direction,
            "toxicity": self.toxicity,
            "attributes": dict(self.attributes),
        }


def make_toxic(
    kind: str,
    *,
    id: str,
    direction: str = "downstream",
    toxicity: float = 1.0,
    attributes: Mapping[str, Any] | None = None,
) -> Toxic:
    """Validate everything and build a :class:`Toxic`; ConfigError (a ValueError) naming
    the bad kind, direction, toxicity or attribute.
    """
    if not isinstance(kind, str) or kind not in _SCHEMAS:
        raise ConfigError(f"unknown toxic kind {kind!r}; the kinds are {', '.join(TOXIC_KINDS)}")
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {', '.join(DIRECTIONS)}, not {direction!r}")
    if (
        isinstance(toxicity, bool)
        or not isinstance(toxicity, (int, float))
        or not 0 <= toxicity <= 1
    ):
        raise ConfigError(f"toxicity must be a number within 0..1, not {toxicity!r}")
    if not isinstance(id, str) or not id:
        raise ConfigError(f"a toxic's name must be a non-empty string, not {_shown(id)}")
    given = dict(attributes or {})
    schema = _SCHEMAS[kind]
    unknown = sorted(set(given) - {a.name for a in schema})
    if unknown:
        takes = ", ".join(a.name for a in schema)
        raise ConfigError(f"{kind} has no attribute {unknown[0]!r}; it takes: {takes}")
    values: dict[str, Any] = {}
    for attr in schema:
        if attr.name in given:
            values[attr.name] = attr.check(kind, given[attr.name])
        elif attr.default is _REQUIRED:
            raise ConfigError(f"{kind} needs the attribute {attr.name!r} ({attr.unit})")
        else:
            values[attr.name] = attr.default
    if kind == "slicer" and values["size_variation"] >= values["average_size"]:
        raise ConfigError("slicer attribute 'size_variation' must be below 'average_size'")
    return Toxic(
        id=id,
        kind=kind,
        direction="both" if kind == "down" else direction,
        toxicity=float(toxicity),
        attributes=MappingProxyType(values),
    )


class ToxicSet:
    """The ordered, mutable toxics of one proxy; tells subscribers about every change.

    Order matters: a chunk passes the toxics in the order they were added.
    Subscribers (the running pumps) are called synchronously after each
    change, so a change applies to open connections from their next chunk.
    """

    def __init__(self) -> None:
        self._toxics: dict[str, Toxic] = {}
        self._counts: dict[Toxic, list[int]] = {}  # [connections applied, skipped]
        self._subscribers: list[Callable[[], None]] = []
        self._serial = 0

    def add(
        self,
        kind: str,
        *,
        direction: str = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
        **attributes: Any,
    ) -> Toxic:
        """Validate and append a toxic (see :func:`make_toxic`); nothing changes on error.

        ``name`` defaults to ``"<kind>-<n>"``; an empty name, or one already in
        use, is a ConfigError.
        """
        toxic = make_toxic(
            kind,
            id=kind if name is None else name,
            direction=direction,
            toxicity=toxicity,
            attributes=attributes,
        )
        if name is None:
            while name is None or name in self._toxics:
                self._serial += 1
                name = f"{kind}-{self._serial}"
            toxic = dataclasses.replace(toxic, id=name)
        elif toxic.id in self._toxics:
            raise ConfigError(f"a toxic named {toxic.id!r} already exists")
        self._toxics[toxic.id] = toxic
        self._counts[toxic] = [0, 0]
        self._notify()
        return toxic

    def remove(self, toxic: str | Toxic) -> bool:
        """Remove a toxic (by name or object); False if it was not present."""
        name = toxic.id if isinstance(toxic, Toxic) else toxic
        current = self._toxics.get(name)
        if current is None or (isinstance(toxic, Toxic) and current is not toxic):
            return False
        del self._toxics[name]
        self._counts.pop(current, None)
        self._notify()
        return True

    def clear(self) -> int:
        """Remove every toxic; return how many there were."""
        count = len(self._toxics)
        self._toxics.clear()
        self._counts.clear()
        if count:
            self._notify()
        return count

    def toxics(self) -> list[Toxic]:
        """The present toxics, in order."""
        return list(self._toxics.values())

    def __contains__(self, toxic: object) -> bool:
        return isinstance(toxic, Toxic) and self._toxics.get(toxic.id) is toxic

    def __len__(self) -> int:
        return len(self._toxics)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (synchronously, must not raise) after every change."""
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        """Stop calling ``callback`` (no error if it was not subscribed)."""
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def record_decision(self, toxic: Toxic, applies: bool) -> None:
        """Count one connection's toxicity decision for ``toxic``."""
        counts = self._counts.get(toxic)
        if counts is not None:
            counts[0 if applies else 1] += 1

    def statistics(self) -> dict[str, dict[str, Any]]:
        """``{name: {id, kind, direction, toxicity, attributes, connections, skipped}}``:
        ``connections`` it applied to, ``skipped`` ones its toxicity spared.
        """
        counts = self._counts
        return {
            t.id: {**t.describe(), "connections": counts[t][0], "skipped": counts[t][1]}
            for t in self._toxics.values()
        }

    def _notify(self) -> None:
        for callback in list(self._subscribers):
            callback()


# ------------------------------------------------------------------ behaviour


class PumpEnd(enum.Enum):
    """Why a pump stopped (see :func:`~qdb_client.testing.proxy.pump`)."""

    #: The source ended cleanly; the EOF was forwarded to the sink.
    EOF = "eof"
    #: A toxic (``timeout``, ``limit_data``, ``down``) closes the connection.
    CLOSED = "closed"
    #: ``reset_peer``: the connection is to be reset.
    RESET = "reset"
    #: The source or the sink failed (reset by the peer, closed under us).
    BROKEN = "broken"


class StopPump(Exception):
    """Raised inside a toxic's :meth:`Behaviour.chunk` to end the connection."""

    def __init__(self, end: PumpEnd) -> None:
        super().__init__(end.value)
        self.end = end


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes read from the source, with the (trio) time they were read."""

    data: bytes | bytearray
    received_at: float


#: Passes a chunk to the next toxic (or, after the last one, to the sink).
Emit = Callable[[Chunk], Awaitable[None]]


class Behaviour:
    """What one toxic does to one direction of one connection (the base: nothing)."""

    def __init__(self, toxic: Toxic, rng: random.Random, since: float) -> None:
        #: The toxic.
        self.toxic = toxic
        #: When the toxic started to act on this connection (``trio.current_time()``).
        self.since = since
        self._rng = rng
        self._a = toxic.attributes

    def deadline(self) -> float:
        """When the toxic ends the connection by itself (``inf``: never)."""
        return math.inf

    def expire(self) -> PumpEnd:
        """How the connection ends once :meth:`deadline` has passed."""
        return PumpEnd.CLOSED

    async def chunk(self, chunk: Chunk, emit: Emit) -> None:
        """Handle one chunk: pass it on with ``await emit(...)`` (or not), or raise StopPump."""
        await emit(chunk)

    async def eof(self) -> None:
        """The source ended; return when the EOF may go on."""


class _Latency(Behaviour):
    async def chunk(self, chunk: Chunk, emit: Emit) -> None:
        delay, jitter = self._a["latency"], self._a["jitter"]
        if jitter:
            delay += self._rng.uniform(-jitter, jitter)
        await trio.sleep_until(chunk.received_at + max(delay, 0) / 1000)
        await emit(chunk)


class _Bandwidth(Behaviour):
    # The link is busy until epoch + sent / rate; it restarts after an idle gap.
    _IDLE_SLACK = 1e-6

    def __init__(self, toxic: Toxic, rng: random.Random, since: float) -> None:
        super().__init__(toxic, rng, since)
        self._rate = self._a["rate"] * 1024.0  # bytes per second
        self._piece = max(1, int(self._rate / 10))  # 100 ms worth
        self._epoch = since
        self._sent = 0

    async def chunk(self, chunk: Chunk, emit: Emit) -> None:
        data = chunk.data
        for start in range(0, len(data), self._piece):
            piece = data[start : start + self._piece]
            now = trio.current_time()
            if now > self._epoch + self._sent / self._rate + self._IDLE_SLACK:
                self._epoch, self._sent = now, 0
            self._sent += len(piece)
            await trio.sleep_until(self._epoch + self._sent / self._rate)
            await emit(Chunk(piece, chunk.received_at))


class _SlowClose(Behaviour):
    async def eof(self) -> None:
        await trio.sleep(self._a["delay"] / 1000)


class _Timeout(Behaviour):
    def deadline(self) -> float:
        timeout = self._a["timeout"]
        return self.since + timeout / 1000 if timeout > 0 else math.inf

    async def chunk(self, chunk: Chunk, emit: Emit) -> None:
        await trio.lowlevel.checkpoint()  # dropped


class _ResetPeer(Behaviour):
    def deadline(self) -> float:
        return self.since + self._a["timeout"] / 1000

    def expire(self) -> PumpEnd:
        return PumpEnd.RESET


class _Slicer(Behaviour):
    async def chunk(self, chunk: Chunk, emit: Emit) -> None:
        average, variation = self._a["average_size"], self._a["size_variation"]
        data, start = chunk.data, 0
        while start < len(data):
            size = average + (self._rng.randint(-variation, variation) if variation else 0)
            if self._a["delay"]:
                await trio.sleep(self._a["delay"] / 1_000_000)
            await emit(Chunk(data[start : start + size], chunk.received_at))
            start += size


class _LimitData(Behaviour):
    def __init__(self, toxic: Toxic, rng: random.Random, since: float) -> None:
        super().__init__(toxic, rng, since)
        self._passed = 0

    async def chunk(self, chunk: Chunk, emit: Emit) -> None:
        allowed = chunk.data[: self._a["bytes"] - self._passed]
        if allowed:
            self._passed += len(allowed)
            await emit(Chunk(allowed, chunk.received_at))
        if self._passed >= self._a["bytes"]:
            raise StopPump(PumpEnd.CLOSED)


class _Down(Behaviour):
    def deadline(self) -> float:
        return self.since if self._a["mode"] == "refuse" else math.inf

    async def chunk(self, chunk: Chunk, emit: Emit) -> None:
        await trio.lowlevel.checkpoint()  # blackhole: dropped


_BEHAVIOURS: dict[str, type[Behaviour]] = {
    "latency": _Latency,
    "bandwidth": _Bandwidth,
    "slow_close": _SlowClose,
    "timeout": _Timeout,
    "reset_peer": _ResetPeer,
    "slicer": _Slicer,
    "limit_data": _LimitData,
    "down": _Down,
}


def make_behaviour(toxic: Toxic, rng: random.Random, since: float) -> Behaviour:
    """A fresh :class:`Behaviour` of ``toxic`` for one direction of one connection."""
    return _BEHAVIOURS[toxic.kind](toxic, rng, since)
