"""The messages of result streams and subscriptions: STREAM_PAGE, STREAM_END,
STREAM_CREDIT and EVENT (docs/protocol.md sections 12 and 13)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from .frames import Frame
from .message_base import MAX_UINT, Body, Kind, Message, omit_none

__all__ = ["Event", "StreamCredit", "StreamEnd", "StreamPage"]


@attrs.frozen
class StreamPage(Message):
    """One page of the result stream opened by request ``request_id``.

    ``seq`` counts pages from 0. ``resume_token`` lets any node continue the
    stream after this page. ``columns`` and ``types`` (declared column types,
    None where unknown) are sent with page 0 only. ``rows_encoding`` is, on a
    received page, the bytes of its rows as they travelled (the stream
    digest's input, section 12.4; see :mod:`.stream_codec`); it is not part
    of the message's value.
    """

    kind: ClassVar[Kind] = Kind.STREAM_PAGE
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {"seq": (0, MAX_UINT)}
    request_id: int
    seq: int
    rows: tuple[Any, ...]
    resume_token: bytes
    columns: tuple[str, ...] | None = None
    types: tuple[str | None, ...] | None = None
    rows_encoding: bytes = attrs.field(default=b"", eq=False, repr=False, kw_only=True)

    def body(self) -> dict[str, Any]:
        return omit_none(
            {
                "seq": self.seq,
                "rows": list(self.rows),
                "token": self.resume_token,
                "columns": list(self.columns) if self.columns is not None else None,
                "types": list(self.types) if self.types is not None else None,
            }
        )

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> StreamPage:
        columns = body.get("columns", list, None)
        if columns is not None and not all(isinstance(c, str) for c in columns):
            body.fail("'columns' must be a list of text")
        types = body.get("types", list, None)
        if types is not None and not all(t is None or isinstance(t, str) for t in types):
            body.fail("'types' must be a list of text or null")
        rows = body.get("rows", list)
        if not all(isinstance(row, list) for row in rows):
            body.fail("'rows' must be a list of arrays")
        return cls(
            request_id=frame.request_id,
            seq=body.count("seq"),
            rows=tuple(rows),
            resume_token=body.get("token", bytes),
            columns=tuple(columns) if columns is not None else None,
            types=tuple(types) if types is not None else None,
        )


@attrs.frozen
class StreamEnd(Message):
    """End of stream ``request_id``: last page number, row count and digest.

    ``digest`` is SHA-256 over the CBOR encoding of every row in order, so a
    resumed stream can prove it delivered exactly the original result.
    """

    kind: ClassVar[Kind] = Kind.STREAM_END
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {
        "seq": (0, MAX_UINT),
        "row_count": (0, MAX_UINT),
    }
    request_id: int
    seq: int
    row_count: int
    digest: bytes

    def body(self) -> dict[str, Any]:
        return {"seq": self.seq, "row_count": self.row_count, "digest": self.digest}

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> StreamEnd:
        return cls(
            request_id=frame.request_id,
            seq=body.count("seq"),
            row_count=body.count("row_count"),
            digest=body.get("digest", bytes),
        )


@attrs.frozen
class StreamCredit(Message):
    """The client grants stream ``request_id`` permission for ``pages`` more pages."""

    kind: ClassVar[Kind] = Kind.STREAM_CREDIT
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {"pages": (1, MAX_UINT)}
    request_id: int
    pages: int

    def body(self) -> dict[str, Any]:
        return {"pages": self.pages}

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> StreamCredit:
        pages = body.count("pages")
        if pages == 0:
            body.fail("'pages' must be positive")
        return cls(request_id=frame.request_id, pages=pages)


@attrs.frozen
class Event(Message):
    """Server push: ``topic`` and ``data``; ``request_id`` is the subscription (0: none)."""

    kind: ClassVar[Kind] = Kind.EVENT
    topic: str
    data: Mapping[str, Any] = attrs.field(factory=dict)
    request_id: int = 0

    def body(self) -> dict[str, Any]:
        return {"topic": self.topic, "data": dict(self.data)}

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Event:
        return cls(
            request_id=frame.request_id,
            topic=body.get("topic", str),
            data=body.get("data", dict, {}),
        )
