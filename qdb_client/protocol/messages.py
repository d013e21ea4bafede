"""Message kinds of protocol v1 and their CBOR bodies.

Each message is a frozen attrs class. ``encode_message`` turns one into
frame bytes; ``decode_message`` turns a :class:`Frame` back into a message,
validating the body against the kind's schema (a wrong body is a
:class:`MessageError`). Body keys are short lowercase words; optional keys
are omitted rather than sent as null. See docs/protocol.md for the contract.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from .codec import decode_body, encode_body, encode_flat_body
from .codes import ErrorCode
from .errors import MessageError, ValueNotEncodable
from .frames import MAX_REQUEST_ID, Frame, checked_frame, encode_frame
from .stream_codec import decode_page_body

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
    "error_message",
]

#: Smallest max-frame size a peer may announce (room for any ERROR or GOAWAY).
MIN_FRAME_LIMIT = 1024
#: Largest value of a ``uint`` field (counts, ids, sizes, milliseconds): u64.
MAX_UINT = 2**64 - 1
#: ERROR ``code`` is a 3-digit numeric class, as in HTTP.
MIN_ERROR_CODE, MAX_ERROR_CODE = 100, 999
#: A protocol version is one byte's worth, 1..255 (HELLO ``versions``, WELCOME ``version``).
MIN_VERSION, MAX_VERSION = 1, 255

#: Protocol versions this package speaks, newest last.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)


class Kind(enum.IntEnum):
    """The message-kind byte of a frame header."""

    HELLO = 0x01
    WELCOME = 0x02
    REQUEST = 0x10
    RESPONSE = 0x11
    ERROR = 0x12
    CANCEL = 0x13
    PING = 0x20
    PONG = 0x21
    GOAWAY = 0x22
    STREAM_PAGE = 0x30
    STREAM_END = 0x31
    STREAM_CREDIT = 0x32
    EVENT = 0x40


class _Body:
    """Typed access to a decoded body; every mistake is a MessageError."""

    def __init__(self, raw: Any, frame: Frame) -> None:
        self._frame = frame
        if not isinstance(raw, dict):
            self.fail(f"body must be a map, not {type(raw).__name__}")
        self._raw: dict[str, Any] = raw

    def fail(self, why: str) -> None:
        name = _kind_name(self._frame.kind)
        raise MessageError(
            f"invalid {name} body: {why}",
            request_id=self._frame.request_id,
            kind=self._frame.kind,
        )

    def get(self, key: str, types: type | tuple[type, ...], default: Any = attrs.NOTHING) -> Any:
        if key not in self._raw:
            if default is attrs.NOTHING:
                self.fail(f"missing {key!r}")
            return default
        value = self._raw[key]
        # bool is an int in Python; an int field must not accept True.
        allowed = _tuple(types)
        if not isinstance(value, allowed) or (
            isinstance(value, bool) and int in allowed and bool not in allowed
        ):
            self.fail(f"{key!r} must be {_type_names(types)}, not {type(value).__name__}")
        return value

    def frame_limit(self, key: str, default: Any = attrs.NOTHING) -> Any:
        """A max-frame announcement: at least MIN_FRAME_LIMIT bytes, at most u64."""
        return self.int_in(key, MIN_FRAME_LIMIT, MAX_UINT, default, unit=" bytes")

    def count(self, key: str, default: Any = attrs.NOTHING) -> Any:
        """A ``uint`` field: an integer within 0..2**64-1."""
        return self.int_in(key, 0, MAX_UINT, default)

    def int_in(
        self, key: str, low: int, high: int, default: Any = attrs.NOTHING, *, unit: str = ""
    ) -> Any:
        """An integer field within ``low..high`` (booleans refused); absent: ``default``."""
        present = key in self._raw
        value = self.get(key, int, default)
        if not present:
            return value
        if value < low:
            if low == 0:
                self.fail(f"{key!r} must not be negative, not {_int_text(value)}")
            self.fail(f"{key!r} must be at least {low}{unit}, not {_int_text(value)}")
        if value > high:
            self.fail(f"{key!r} must be at most {_int_text(high)}{unit}, not {_int_text(value)}")
        return value


def _int_text(value: int) -> str:
    """An integer for an error message, short whatever its size.

    ``str()`` of an integer above 4300 digits raises ValueError, and one of a
    few hundred digits helps nobody: past 20 digits only the size is shown.
    """
    if value == MAX_UINT:
        return "2**64-1"
    if -(10**20) < value < 10**20:
        return str(value)
    return f"{'-' if value < 0 else ''}an integer of {value.bit_length()} bits"


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def _type_names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in _tuple(types))


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f"kind {kind:#04x}"


def _omit_none(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _redacted(value: Any) -> str:
    """``repr`` of a secret field: ``'***'`` (None shows as None)."""
    return "None" if value is None else "'***'"


def _redacted_auth(value: Any) -> str:
    """``repr`` of HELLO ``auth``: the user shows, the password is ``'***'``."""
    if value is None:
        return "None"
    if not isinstance(value, Mapping):
        return "'***'"
    return repr({k: ("***" if k != "user" else v) for k, v in value.items()})


class Message:
    """Base of all message classes."""

    kind: ClassVar[Kind]
    request_id: int
    #: Integer fields and their bounds (low, high), checked before encoding so
    #: that what this side sends is what a receiver accepts (None: absent).
    _bounds: ClassVar[dict[str, tuple[int, int]]] = {}

    def body(self) -> dict[str, Any]:
        """The CBOR map this message travels as."""
        raise NotImplementedError

    @classmethod
    def from_body(cls, frame: Frame, body: _Body) -> Message:
        raise NotImplementedError


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
    credentials: Mapping[str, str] | None = attrs.field(default=None, repr=_redacted_auth)
    resume_session: str | None = None
    max_frame_size: int | None = None
    request_id: int = 0
    #: A session token from an earlier WELCOME (section 7.4); ``repr`` shows ``'***'``.
    session_token: str | None = attrs.field(default=None, repr=_redacted)

    def body(self) -> dict[str, Any]:
        return _omit_none(
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
    def from_body(cls, frame: Frame, body: _Body) -> Hello:
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
    session_token: str | None = attrs.field(default=None, repr=_redacted)
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
    def from_body(cls, frame: Frame, body: _Body) -> Welcome:
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
        return _omit_none(
            {
                "method": self.method,
                "args": dict(self.args),
                "deadline_ms": self.deadline_ms,
                "idem_key": self.idempotency_key,
            }
        )

    @classmethod
    def from_body(cls, frame: Frame, body: _Body) -> Request:
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
    def from_body(cls, frame: Frame, body: _Body) -> Response:
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
        return _omit_none(
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
    def from_body(cls, frame: Frame, body: _Body) -> Error:
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
    def from_body(cls, frame: Frame, body: _Body) -> Cancel:
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
    def from_body(cls, frame: Frame, body: _Body) -> Ping:
        return cls(request_id=frame.request_id)


@attrs.frozen
class Pong(Message):
    """Answer to the PING with the same ``request_id``."""

    kind: ClassVar[Kind] = Kind.PONG
    request_id: int

    def body(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_body(cls, frame: Frame, body: _Body) -> Pong:
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
    def from_body(cls, frame: Frame, body: _Body) -> GoAway:
        return cls(
            reason=body.get("reason", str),
            last_request_id=body.count("last_request_id"),
            message=body.get("message", str, ""),
        )


# -------------------------------------------------------------------- streams


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
        return _omit_none(
            {
                "seq": self.seq,
                "rows": list(self.rows),
                "token": self.resume_token,
                "columns": list(self.columns) if self.columns is not None else None,
                "types": list(self.types) if self.types is not None else None,
            }
        )

    @classmethod
    def from_body(cls, frame: Frame, body: _Body) -> StreamPage:
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
    def from_body(cls, frame: Frame, body: _Body) -> StreamEnd:
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
    def from_body(cls, frame: Frame, body: _Body) -> StreamCredit:
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
    def from_body(cls, frame: Frame, body: _Body) -> Event:
        return cls(
            request_id=frame.request_id,
            topic=body.get("topic", str),
            data=body.get("data", dict, {}),
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
            f"{message.kind.name} {name} must be within {_int_text(low)}..{_int_text(high)},"
            f" not {_int_text(value)}"
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
        page = StreamPage.from_body(frame, _Body(raw, frame))
        return attrs.evolve(page, rows_encoding=rows_encoding)
    raw = decode_body(frame.body, request_id=frame.request_id, kind=frame.kind)
    return cls.from_body(frame, _Body(raw, frame))


def error_message(request_id: int, code: ErrorCode, message: str, **extra: Any) -> Error:
    """Build an ERROR for ``code`` with its numeric class and retryable flag filled in."""
    return Error(
        request_id=request_id,
        code=code.code,
        name=code.value,
        message=message,
        retryable=code.retryable,
        **extra,
    )
