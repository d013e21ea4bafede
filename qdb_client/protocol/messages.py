"""The messages of protocol v1's handshake, requests and liveness, and the
encoding and decoding of every message (streams' own are in
:mod:`.stream_messages`, the base and the kinds in :mod:`.message_base`).

Each message is a frozen attrs class. ``encode_message`` turns one into
frame bytes; ``decode_message`` turns a :class:`Frame` back into a message,
validating the body against the kind's schema (a wrong body is a
:class:`MessageError`). Body keys are short lowercase words; optional keys
are omitted rather than sent as null. See docs/protocol.md for the contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from .codec import decode_body, encode_body, encode_flat_body
from .errors import MessageError, ValueNotEncodable
from .frames import MAX_REQUEST_ID, Frame, checked_frame, encode_frame
from .message_base import (
    MAX_ERROR_CODE,
    MAX_UINT,
    MAX_VERSION,
    MIN_ERROR_CODE,
    MIN_FRAME_LIMIT,
    MIN_VERSION,
    PROTOCOL_VERSIONS,
    Body,
    Kind,
    Message,
    int_text,
    omit_none,
    redacted,
    redacted_auth,
)
from .stream_codec import decode_page_body
from .stream_messages import Event, StreamCredit, StreamEnd, StreamPage

__all__ = [
    "PROTOCOL_VERSIONS",
    "Cancel",
    "Error",
    "Event",
    "GoAway",
    "Hello",
    "Kind",
    "Member",
    "Message",
    "Ping",
    "Pong",
    "Request",
    "Response",
    "StreamCredit",
    "StreamEnd",
    "StreamPage",
    "Welcome",
    "decode_message",
    "encode_message",
    "encode_request",
]

# ------------------------------------------------------------------ handshake


@attrs.frozen
class Member:
    """A cluster node as announced in WELCOME."""

    node_id: str
    address: str


@attrs.frozen
class Hello(Message):
    """Client's opening message: versions spoken, identity, optional auth/session."""

    kind: ClassVar[Kind] = Kind.HELLO
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {"max_frame_size": (MIN_FRAME_LIMIT, MAX_UINT)}
    versions: tuple[int, ...]
    client_name: str = "qdb_client"
    client_version: str = ""
    #: ``{"user", "password"}``; the password never shows in ``repr``.
    credentials: Mapping[str, str] | None = attrs.field(default=None, repr=redacted_auth)
    resume_session: str | None = None
    max_frame_size: int | None = None
    request_id: int = 0
    #: A session token from an earlier WELCOME (section 7.4); ``repr`` shows ``'***'``.
    session_token: str | None = attrs.field(default=None, repr=redacted)

    def body(self) -> dict[str, Any]:
        return omit_none(
            {
                "versions": list(self.versions),
                "client": self.client_name,
                "client_version": self.client_version,
                "auth": dict(self.credentials) if self.credentials is not None else None,
                "session": self.resume_session,
                "session_token": self.session_token,
                "max_frame": self.max_frame_size,
            }
        )

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Hello:
        versions = body.get("versions", list)
        if not versions or not all(
            isinstance(v, int) and not isinstance(v, bool) and MIN_VERSION <= v <= MAX_VERSION
            for v in versions
        ):
            body.fail(
                f"'versions' must be a non-empty list of integers {MIN_VERSION}..{MAX_VERSION}"
            )
        auth = body.get("auth", dict, None)
        if auth is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in auth.items()
        ):
            body.fail("'auth' must map text to text")
        return cls(
            versions=tuple(versions),
            client_name=body.get("client", str, ""),
            client_version=body.get("client_version", str, ""),
            credentials=auth,
            resume_session=body.get("session", str, None),
            max_frame_size=body.frame_limit("max_frame", None),
            session_token=body.get("session_token", str, None),
        )


@attrs.frozen
class Welcome(Message):
    """Server's acceptance of a HELLO: chosen version, identity and limits."""

    kind: ClassVar[Kind] = Kind.WELCOME
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {
        "version": (MIN_VERSION, MAX_VERSION),
        "max_frame_size": (MIN_FRAME_LIMIT, MAX_UINT),
        "max_in_flight": (0, MAX_UINT),
        "idle_timeout_ms": (0, MAX_UINT),
        "session_expires_ms": (0, MAX_UINT),
    }
    version: int
    node_id: str
    session_id: str
    max_frame_size: int
    max_in_flight: int
    idle_timeout_ms: int
    members: tuple[Member, ...] = ()
    server_name: str = ""
    request_id: int = 0
    #: A new secret token for ``session_id`` (section 7.4); ``repr`` shows ``'***'``.
    session_token: str | None = attrs.field(default=None, repr=redacted)
    #: Milliseconds ``session_token`` stays valid from now (None without a token).
    session_expires_ms: int | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "version": self.version,
            "node_id": self.node_id,
            "session": self.session_id,
            "max_frame": self.max_frame_size,
            "max_in_flight": self.max_in_flight,
            "idle_timeout_ms": self.idle_timeout_ms,
            "members": [{"node_id": m.node_id, "address": m.address} for m in self.members],
            "server": self.server_name,
        }
        if self.session_token is not None:
            body["session_token"] = self.session_token
        if self.session_expires_ms is not None:
            body["session_expires_ms"] = self.session_expires_ms
        return body

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Welcome:
        members = []
        for item in body.get("members", list, []):
            if not (
                isinstance(item, dict)
                and isinstance(item.get("node_id"), str)
                and isinstance(item.get("address"), str)
            ):
                body.fail("each member must be a map with text 'node_id' and 'address'")
            members.append(Member(item["node_id"], item["address"]))
        return cls(
            version=body.int_in("version", MIN_VERSION, MAX_VERSION),
            node_id=body.get("node_id", str),
            session_id=body.get("session", str),
            max_frame_size=body.frame_limit("max_frame"),
            max_in_flight=body.count("max_in_flight"),
            idle_timeout_ms=body.count("idle_timeout_ms"),
            members=tuple(members),
            server_name=body.get("server", str, ""),
            session_token=body.get("session_token", str, None),
            session_expires_ms=body.count("session_expires_ms", None),
        )


# ------------------------------------------------------------------- requests


@attrs.frozen
class Request(Message):
    """Call ``method`` with ``args``; the reply echoes ``request_id``."""

    kind: ClassVar[Kind] = Kind.REQUEST
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {"deadline_ms": (0, MAX_UINT)}
    request_id: int
    method: str
    args: Mapping[str, Any] = attrs.field(factory=dict)
    deadline_ms: int | None = None
    idempotency_key: str | None = None

    def body(self) -> dict[str, Any]:
        return omit_none(
            {
                "method": self.method,
                "args": dict(self.args),
                "deadline_ms": self.deadline_ms,
                "idem_key": self.idempotency_key,
            }
        )

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Request:
        return cls(
            request_id=frame.request_id,
            method=body.get("method", str),
            args=body.get("args", dict, {}),
            deadline_ms=body.count("deadline_ms", None),
            idempotency_key=body.get("idem_key", str, None),
        )


@attrs.frozen
class Response(Message):
    """Successful result of the request ``request_id``."""

    kind: ClassVar[Kind] = Kind.RESPONSE
    request_id: int
    result: Any = None
    #: The node answered a keyed write from its stored outcome (section 8.5).
    replayed: bool = False

    def body(self) -> dict[str, Any]:
        if self.replayed:
            return {"result": self.result, "replayed": True}
        return {"result": self.result}

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Response:
        return cls(
            request_id=frame.request_id,
            result=body.get("result", object),
            replayed=body.get("replayed", bool, False),
        )


@attrs.frozen
class Error(Message):
    """Structured failure of request ``request_id`` (0: of the connection)."""

    kind: ClassVar[Kind] = Kind.ERROR
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {
        "code": (MIN_ERROR_CODE, MAX_ERROR_CODE),
        "retry_after_ms": (0, MAX_UINT),
    }
    request_id: int
    code: int
    name: str
    message: str
    retryable: bool
    retry_after_ms: int | None = None
    details: Mapping[str, Any] = attrs.field(factory=dict)

    def body(self) -> dict[str, Any]:
        return omit_none(
            {
                "code": self.code,
                "name": self.name,
                "message": self.message,
                "retryable": self.retryable,
                "retry_after_ms": self.retry_after_ms,
                "details": dict(self.details) if self.details else None,
            }
        )

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Error:
        return cls(
            request_id=frame.request_id,
            code=body.int_in("code", MIN_ERROR_CODE, MAX_ERROR_CODE),
            name=body.get("name", str),
            message=body.get("message", str),
            retryable=body.get("retryable", bool),
            retry_after_ms=body.count("retry_after_ms", None),
            details=body.get("details", dict, {}),
        )


@attrs.frozen
class Cancel(Message):
    """Client abandons request ``request_id``; the server may stop working on it."""

    kind: ClassVar[Kind] = Kind.CANCEL
    request_id: int

    def body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Cancel:
        return cls(request_id=frame.request_id)


# ------------------------------------------------------------------- liveness


@attrs.frozen
class Ping(Message):
    """Liveness probe; answered by a PONG with the same ``request_id``."""

    kind: ClassVar[Kind] = Kind.PING
    request_id: int

    def body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Ping:
        return cls(request_id=frame.request_id)


@attrs.frozen
class Pong(Message):
    """Answer to the PING with the same ``request_id``."""

    kind: ClassVar[Kind] = Kind.PONG
    request_id: int

    def body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> Pong:
        return cls(request_id=frame.request_id)


@attrs.frozen
class GoAway(Message):
    """The sender will close the connection.

    Requests with ids up to ``last_request_id`` are (or will be) answered;
    later ones were not processed and may be sent elsewhere. ``reason`` is
    one of ``shutdown``, ``idle_timeout``, ``max_lifetime``, ``overloaded``,
    ``protocol_error`` or ``client_close``.
    """

    kind: ClassVar[Kind] = Kind.GOAWAY
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {"last_request_id": (0, MAX_UINT)}
    reason: str
    last_request_id: int
    message: str = ""
    request_id: int = 0

    def body(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "last_request_id": self.last_request_id,
            "message": self.message,
        }

    @classmethod
    def from_body(cls, frame: Frame, body: Body) -> GoAway:
        return cls(
            reason=body.get("reason", str),
            last_request_id=body.count("last_request_id"),
            message=body.get("message", str, ""),
        )


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.kind: cls
    for cls in (
        Hello,
        Welcome,
        Request,
        Response,
        Error,
        Cancel,
        Ping,
        Pong,
        GoAway,
        StreamPage,
        StreamEnd,
        StreamCredit,
        Event,
    )
}


def encode_message(message: Message) -> bytes:
    """Return the frame bytes of ``message``.

    Raises ValueNotEncodable (nothing to send) for a request id outside
    0..2**64-1 or an integer field outside its bounds (docs/protocol.md
    section 6): a peer would refuse the frame, so it is never built.
    """
    _check_int(message, "request_id", 0, MAX_REQUEST_ID)
    for name, (low, high) in message._bounds.items():
        _check_int(message, name, low, high)
    if isinstance(message, Hello) and not (
        message.versions
        and all(
            isinstance(v, int) and not isinstance(v, bool) and MIN_VERSION <= v <= MAX_VERSION
            for v in message.versions
        )
    ):
        raise ValueNotEncodable(
            f"HELLO versions must be a non-empty list of integers {MIN_VERSION}..{MAX_VERSION}"
        )
    return encode_frame(message.kind, message.request_id, encode_body(message.body()))


#: Integer fields that may be None (then omitted from the body).
_OPTIONAL_INTS = frozenset(
    {
        (Kind.HELLO, "max_frame_size"),
        (Kind.WELCOME, "session_expires_ms"),
        (Kind.REQUEST, "deadline_ms"),
        (Kind.ERROR, "retry_after_ms"),
    }
)


def _check_int(message: Message, name: str, low: int, high: int) -> None:
    value = getattr(message, name)
    if value is None and (message.kind, name) in _OPTIONAL_INTS:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueNotEncodable(
            f"{message.kind.name} {name} must be an integer, not {type(value).__name__}"
        )
    if not low <= value <= high:
        raise ValueNotEncodable(
            f"{message.kind.name} {name} must be within {int_text(low)}..{int_text(high)},"
            f" not {int_text(value)}"
        )


def encode_request(
    request_id: int,
    method: str,
    args: dict[str, Any],
    deadline_ms: int | None = None,
    idempotency_key: str | None = None,
) -> bytes:
    """The frame bytes of a REQUEST: the same bytes as ``encode_message(Request(...))``,
    built without the message object (the request path is hot).

    Raises ValueNotEncodable (nothing to send) for fields out of range or
    values without a CBOR form.
    """
    if type(request_id) is not int or not 0 <= request_id <= MAX_REQUEST_ID:
        raise ValueNotEncodable(f"request id must be within 0..2**64-1, not {request_id!r:.40}")
    if type(method) is not str or type(args) is not dict:
        raise ValueNotEncodable("a REQUEST needs a text method and a map of arguments")
    body: dict[str, Any] = {"method": method, "args": args}
    if deadline_ms is not None:
        if type(deadline_ms) is not int or not 0 <= deadline_ms <= MAX_UINT:
            raise ValueNotEncodable("deadline_ms must be an integer within 0..2**64-1")
        body["deadline_ms"] = deadline_ms
    if idempotency_key is not None:
        if type(idempotency_key) is not str:
            raise ValueNotEncodable("idem_key must be text")
        body["idem_key"] = idempotency_key
    return checked_frame(Kind.REQUEST, request_id, encode_flat_body(body, args))  # id checked


def decode_message(frame: Frame) -> Message:
    """Return the message a verified frame carries, or raise MessageError."""
    cls = MESSAGE_TYPES.get(frame.kind)
    if cls is None:
        raise MessageError(
            f"unknown message kind {frame.kind:#04x}", request_id=frame.request_id, kind=frame.kind
        )
    if cls is StreamPage:  # keeps the rows' bytes: the stream digest's input
        raw, rows_encoding = decode_page_body(
            frame.body, request_id=frame.request_id, kind=frame.kind
        )
        page = StreamPage.from_body(frame, Body(raw, frame))
        return attrs.evolve(page, rows_encoding=rows_encoding)
    raw = decode_body(frame.body, request_id=frame.request_id, kind=frame.kind)
    return cls.from_body(frame, Body(raw, frame))
