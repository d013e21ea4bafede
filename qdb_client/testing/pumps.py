"""The engine of the fault proxy: one direction of one connection through its toxics.

:func:`pump` copies a source stream to a sink, chunk by chunk, through the
toxics (:mod:`qdb_client.testing.toxics`) acting on its direction. It reads
time only from ``trio.current_time()`` and works over any trio streams, so a
``MockClock`` measures every toxic exactly over memory streams.
:class:`ConnectionToxics` is one connection's view of the proxy's toxics
(which ones apply to it), shared by its two pumps.

A reader task reads ahead of the toxics (:data:`READ_AHEAD_BYTES` /
:data:`READ_AHEAD_CHUNKS`, then the source feels backpressure) and
timestamps each chunk as it is read. A change of toxics rebuilds the chain
at once (the chunk in progress keeps its own), and one timer ends the
connection at the earliest toxic deadline (``timeout``, ``reset_peer``,
``down``).
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable
from typing import Any

import trio

from ..errors import ConfigError
from .toxics import Behaviour, Chunk, PumpEnd, StopPump, Toxic, ToxicSet, make_behaviour

__all__ = [
    "READ_AHEAD_BYTES",
    "READ_AHEAD_CHUNKS",
    "RECEIVE_SIZE",
    "ConnectionToxics",
    "pump",
]

logger = logging.getLogger("qdb_client.testing")

_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: Bytes read from a source at a time.
RECEIVE_SIZE = 16384
#: How far a pump reads ahead of its toxics (then the source feels backpressure). Chunks
#: are timestamped when read, so latency stays exact while less than this is in flight.
READ_AHEAD_BYTES = 256 * 1024
READ_AHEAD_CHUNKS = 1024
_EOF = object()
_BROKEN = object()


class ConnectionToxics:
    """One connection's view of a :class:`ToxicSet`: which toxics apply to it.

    Each toxic's ``toxicity`` is rolled once per connection (with ``rng``),
    the first time the connection meets the toxic; both directions share it.
    """

    def __init__(self, toxics: ToxicSet, rng: random.Random | None = None) -> None:
        #: The proxy's toxics.
        self.toxics = toxics
        #: The random source of this connection's toxics (toxicity, jitter, slice sizes).
        self.rng = rng if rng is not None else random.Random()
        self._decisions: dict[Toxic, bool] = {}

    def selected(self, toxic: Toxic) -> bool:
        """Whether ``toxic`` applies to this connection (decided on first call)."""
        decision = self._decisions.get(toxic)
        if decision is None:
            if toxic.toxicity >= 1.0 or toxic.toxicity <= 0.0:
                decision = toxic.toxicity >= 1.0
            else:
                decision = self.rng.random() < toxic.toxicity
            self._decisions[toxic] = decision
            self.toxics.record_decision(toxic, decision)
        return decision

    def active(self, direction: str) -> list[Toxic]:
        """The toxics acting on ``direction`` of this connection, in order."""
        return [t for t in self.toxics.toxics() if t.applies_to(direction) and self.selected(t)]

    def down_mode(self) -> str | None:
        """``"refuse"`` or ``"blackhole"`` if a ``down`` toxic applies, else None."""
        for toxic in self.active("upstream"):
            if toxic.kind == "down":
                return str(toxic.attributes["mode"])
        return None


async def pump(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    toxics: ToxicSet | ConnectionToxics,
    *,
    direction: str = "downstream",
    rng: random.Random | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> PumpEnd:
    """Copy ``source`` to ``sink`` through the toxics acting on ``direction``.

    ``toxics`` is a :class:`ToxicSet` (viewed as a new connection, toxicity
    rolled with ``rng``) or a connection's :class:`ConnectionToxics` (shared by
    its two directions). ``on_bytes(n)`` counts the bytes written to the sink.

    Returns why it stopped (:class:`PumpEnd`). Only ``EOF`` touches the sink's
    lifetime (``send_eof``, or ``aclose`` if it can't half-close); otherwise
    closing or resetting is the caller's job. Stream failures are ``BROKEN``.
    """
    if direction not in ("upstream", "downstream"):
        raise ConfigError(f"a pump's direction is 'upstream' or 'downstream', not {direction!r}")
    if isinstance(toxics, ToxicSet):
        toxics = ConnectionToxics(toxics, rng)
    return await _Pump(source, sink, toxics, direction, on_bytes).run()


class _Pump:
    def __init__(
        self,
        source: trio.abc.ReceiveStream,
        sink: trio.abc.SendStream,
        view: ConnectionToxics,
        direction: str,
        on_bytes: Callable[[int], None] | None,
    ) -> None:
        self._source = source
        self._sink = sink
        self._view = view
        self._direction = direction
        self._on_bytes = on_bytes
        self._states: dict[Toxic, Behaviour] = {}
        self._chain: list[Behaviour] = []
        self._timer: trio.CancelScope | None = None
        self._due: Behaviour | None = None  # the toxic whose deadline comes first
        self._armed: Behaviour | None = None  # the one the timer is set for
        self._busy = False  # a chunk (or the EOF) is inside the toxics
        self._buffered = 0  # bytes read but not yet taken by the toxics
        self._taken = trio.Event()

    async def run(self) -> PumpEnd:
        send, receive = trio.open_memory_channel[Any](READ_AHEAD_CHUNKS)
        self._view.toxics.subscribe(self._refresh)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, send)
                end = await self._forward(receive)
                nursery.cancel_scope.cancel()
        finally:
            self._view.toxics.unsubscribe(self._refresh)
        logger.debug("pump %s ended: %s", self._direction, end.value)
        return end

    def _refresh(self) -> None:
        """Rebuild the chain after a change of toxics (sync: runs inside ``add``/``remove``)."""
        now = trio.current_time()
        states = {}
        for toxic in self._view.active(self._direction):
            state = self._states.get(toxic)
            states[toxic] = (
                state if state is not None else make_behaviour(toxic, self._view.rng, now)
            )
        self._states = states
        self._chain = list(states.values())  # a new list: a chunk in progress keeps its own
        self._due = min(self._chain, key=lambda b: b.deadline(), default=None)
        if self._timer is not None and not self._timer.cancel_called:  # not fired yet
            self._armed = self._due
            self._timer.deadline = self._due.deadline() if self._due is not None else math.inf

    async def _read(self, send: trio.MemorySendChannel[Any]) -> None:
        async with send:
            while True:
                while self._buffered >= READ_AHEAD_BYTES:
                    self._taken = trio.Event()
                    await self._taken.wait()
                try:
                    data = await self._source.receive_some(RECEIVE_SIZE)
                except _TRANSPORT_ERRORS as exc:
                    logger.debug("pump %s: source failed: %r", self._direction, exc)
                    await send.send(_BROKEN)
                    return
                if not data:
                    await send.send(_EOF)
                    return
                self._buffered += len(data)
                await send.send(Chunk(data, trio.current_time()))

    async def _forward(self, receive: trio.MemoryReceiveChannel[Any]) -> PumpEnd:
        while True:
            self._timer = timer = trio.CancelScope()
            self._refresh()  # arms the timer
            try:
                with timer:
                    while True:
                        item = await receive.receive()
                        if item is _BROKEN:
                            return PumpEnd.BROKEN
                        self._busy = True
                        if item is _EOF:
                            return await self._finish()
                        self._buffered -= len(item.data)
                        self._taken.set()
                        await self._emit(self._chain, 0, item)
                        self._busy = False
            except StopPump as stop:
                return stop.end
            finally:
                self._timer = None
            end = self._expired()
            if end is not None:
                return end

    def _expired(self) -> PumpEnd | None:
        """The timer fired: how the connection ends, or None to carry on.

        Normally the earliest deadline passed and that toxic ends the
        connection. But the toxic may have been removed (or replaced) in the
        very instant its timer fired, before this task ran: then, if nothing
        was interrupted, the pump carries on; a chunk or EOF cut off inside
        the toxics can't be resumed, so the toxic that fired still ends it.
        """
        due = self._due
        if due is not None and due.deadline() <= trio.current_time():
            return due.expire()
        if self._busy:
            return self._armed.expire() if self._armed is not None else PumpEnd.CLOSED
        return None

    async def _emit(self, chain: list[Behaviour], index: int, chunk: Chunk) -> None:
        if index < len(chain):
            await chain[index].chunk(chunk, functools.partial(self._emit, chain, index + 1))
            return
        try:
            await self._sink.send_all(chunk.data)
        except _TRANSPORT_ERRORS as exc:
            logger.debug("pump %s: sink failed: %r", self._direction, exc)
            raise StopPump(PumpEnd.BROKEN) from exc
        if self._on_bytes is not None:
            self._on_bytes(len(chunk.data))

    async def _finish(self) -> PumpEnd:
        for behaviour in self._chain:
            await behaviour.eof()
        try:
            if isinstance(self._sink, trio.abc.HalfCloseableStream):
                await self._sink.send_eof()
            else:
                await self._sink.aclose()
        except _TRANSPORT_ERRORS:
            return PumpEnd.BROKEN
        return PumpEnd.EOF
