"""A scripted node side of result streams and subscriptions, for driver unit tests.

:class:`FakeStreams` is a FakeNetwork handler (one object for every address,
so a stream "spooled" through one node resumes through another, as with the
shared store). It serves ``query_stream``/``resume_stream`` from a fixed list
of rows, honouring credit, and records what the client sent (requests,
credit, CANCELs). A test script hooks in through :attr:`FakeStreams.before_page`,
called before each page: it may return an action ("drop" the connection,
"stall", "error", a replacement message...) to stage a fault. Everything
runs in virtual time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import attrs
import trio

from qdb_client.protocol import (
    Cancel,
    ErrorCode,
    Event,
    Message,
    Request,
    Response,
    StreamCredit,
    StreamEnd,
    StreamPage,
    error_message,
)
from qdb_client.protocol.stream_codec import encode_row

from .fake_peer import FakeNode


def token(seq: int) -> bytes:
    return b"tok-" + seq.to_bytes(4, "big")


def seq_of(token_bytes: bytes) -> int:
    return int.from_bytes(token_bytes[4:], "big")


@attrs.define
class Served:
    """One stream request as the fake node sees it."""

    node: FakeNode
    request: Request
    credit: int
    next_seq: int
    cancelled: bool = False
    wake: trio.Event = attrs.field(factory=trio.Event)
    #: Most credit outstanding at any time (the client's window, as seen here).
    max_credit: int = 0


class FakeStreams:
    """Serves streams of ``rows`` (``columns``) in pages of ``page_rows``."""

    def __init__(
        self,
        nursery: trio.Nursery,
        columns: tuple[str, ...],
        rows: list[list[Any]],
        *,
        page_rows: int = 2,
    ) -> None:
        self.nursery = nursery
        self.columns = columns
        self.rows = rows
        self.page_rows = page_rows
        self.pages = [rows[i : i + page_rows] for i in range(0, len(rows), page_rows)] or [[]]
        self.digest = hashlib.sha256(b"".join(encode_row(r) for r in rows)).digest()
        #: (node id, method, args) of every stream request, in order.
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        #: (node id, request id) of every CANCEL received.
        self.cancels: list[tuple[str, int]] = []
        #: (node id, request id, pages) of every STREAM_CREDIT.
        self.credits: list[tuple[str, int, int]] = []
        self.served: list[Served] = []
        #: Called as before_page(served, seq) -> None or an action (see _serve).
        self.before_page: Callable[[Served, int], Any] = lambda served, seq: None
        #: Answers to the next stream requests instead of serving them (an ERROR...).
        self.answers: list[Message | str] = []
        #: Other methods: request -> result (default {}).
        self.other: Callable[[Request], Any] = lambda request: {}

    async def __call__(self, node: FakeNode, request: Request) -> None:
        if request.method not in ("query_stream", "resume_stream"):
            await node.reply(request, self.other(request))
            return
        self.requests.append((node.node_id, request.method, dict(request.args)))
        if self.answers:
            answer = self.answers.pop(0)
            if answer == "silence":
                return
            assert isinstance(answer, Message)
            await node.send(attrs.evolve(answer, request_id=request.request_id))
            return
        start = 0 if request.method == "query_stream" else seq_of(request.args["token"]) + 1
        served = Served(node, request, request.args["credit"], start)
        served.max_credit = served.credit
        self.served.append(served)
        self.nursery.start_soon(self._serve, served)

    async def frame(self, node: FakeNode, message: Any) -> None:
        for served in self.served:
            if served.node is node and served.request.request_id == message.request_id:
                if isinstance(message, StreamCredit):
                    served.credit += message.pages
                    served.max_credit = max(served.max_credit, served.credit)
                    self.credits.append((node.node_id, message.request_id, message.pages))
                elif isinstance(message, Cancel):
                    served.cancelled = True
                    self.cancels.append((node.node_id, message.request_id))
                served.wake.set()
                return
        if isinstance(message, Cancel):
            self.cancels.append((node.node_id, message.request_id))

    def page(self, served: Served, seq: int) -> StreamPage:
        return StreamPage(
            served.request.request_id,
            seq,
            tuple(self.pages[seq]),
            token(seq),
            columns=self.columns if seq == 0 else None,
        )

    def end(self, served: Served) -> StreamEnd:
        rid = served.request.request_id
        return StreamEnd(rid, len(self.pages) - 1, len(self.rows), self.digest)

    async def _serve(self, served: Served) -> None:
        rid = served.request.request_id
        try:
            while served.next_seq < len(self.pages):
                while served.credit <= 0 and not served.cancelled:
                    served.wake = trio.Event()
                    await served.wake.wait()
                if served.cancelled:
                    await served.node.send(error_message(rid, ErrorCode.CANCELLED, "cancelled"))
                    return
                seq = served.next_seq
                action = self.before_page(served, seq)
                if action == "drop":
                    await served.node.stream.aclose()
                    return
                if action == "stall":
                    await trio.sleep_forever()
                if isinstance(action, (Message, bytes)):
                    if isinstance(action, bytes):
                        await served.node.send_raw(action)
                    else:
                        await served.node.send(action)
                    if not isinstance(action, StreamPage):
                        return  # an ERROR or a STREAM_END ends the request
                    served.credit -= 1
                    served.next_seq += 1
                    continue
                await served.node.send(self.page(served, seq))
                served.credit -= 1
                served.next_seq += 1
            await served.node.send(self.end(served))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class FakeChanges:
    """Serves ``subscribe``: answers, then pushes the queued events as credit allows."""

    def __init__(self, nursery: trio.Nursery, *, newest: int = 0) -> None:
        self.nursery = nursery
        self.newest = newest
        #: (node id, args) of every subscribe.
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.cancels: list[tuple[str, int]] = []
        #: Per subscribe, in order: the events to send (data maps) or an ERROR to answer.
        self.scripts: list[list[Any] | Message] = []
        self.credit: dict[int, int] = {}

    async def __call__(self, node: FakeNode, request: Request) -> None:
        if request.method != "subscribe":
            await node.reply(request, {})
            return
        self.requests.append((node.node_id, dict(request.args)))
        script = self.scripts.pop(0) if self.scripts else []
        if isinstance(script, Message):
            await node.send(attrs.evolve(script, request_id=request.request_id))
            return
        rid = request.request_id
        self.credit[rid] = request.args["credit"]
        await node.send(Response(rid, {"subscription": rid, "last_event_id": self.newest}))
        for item in script:
            if isinstance(item, Message):
                await node.send(attrs.evolve(item, request_id=rid))
            elif item == "drop":
                await node.stream.aclose()
                return
            else:
                await node.send(Event("change", item, request_id=rid))

    async def frame(self, node: FakeNode, message: Any) -> None:
        if isinstance(message, Cancel):
            self.cancels.append((node.node_id, message.request_id))
            await node.send(error_message(message.request_id, ErrorCode.CANCELLED, "cancelled"))
        elif isinstance(message, StreamCredit):
            self.credit[message.request_id] = self.credit.get(message.request_id, 0) + message.pages


def change(event_id: int, kind: str = "insert", key: int = 1, **row: Any) -> dict[str, Any]:
    """The data of a ``change`` EVENT."""
    return {"event_id": event_id, "kind": kind, "table": "t", "key": key, "row": row or {"id": key}}
