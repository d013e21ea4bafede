"""Sans-IO state machine of one protocol v1 connection, for either side.

In the manner of h11: ``send(message)`` returns the bytes to write,
``receive_data(bytes)`` takes what was read, ``next_event()`` returns the
next :class:`Message`, a :class:`BadMessage` (a frame whose content was
unusable; the connection goes on), or None when it needs more bytes.
Connection-level faults raise :class:`FrameError` or
:class:`ProtocolViolation`, after which the connection must be closed.

States: HANDSHAKE until the server sent WELCOME (or the client received
it), OPEN, then CLOSED after a handshake ERROR or end of input. A GOAWAY in
either direction is recorded; after receiving one, a client may not send
new REQUESTs. GOAWAY is the farewell before closing and may be sent in any
state, so a connection-level fault during the handshake can still be
answered with ERROR (request id 0), then GOAWAY ``protocol_error``.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from .codec import BodyDecoder
from .errors import FrameTooLarge, MessageError, ProtocolViolation
from .frames import DEFAULT_MAX_FRAME_SIZE, Frame, FrameDecoder
from .messages import (
    PROTOCOL_VERSIONS,
    Error,
    GoAway,
    Hello,
    Kind,
    Message,
    Request,
    Response,
    Welcome,
    decode_message,
    encode_message,
    encode_request,
)

__all__ = ["BadMessage", "ProtocolConnection", "Role", "State", "choose_version"]


class Role(enum.Enum):
    """Which end of the connection this state machine is."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Connection lifecycle."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


@attrs.frozen
class BadMessage:
    """Event: a whole frame arrived whose content can't be used."""

    error: MessageError

    @property
    def request_id(self) -> int:
        """The request the frame claimed to belong to (0 if none)."""
        return self.error.request_id


_SENT_BY = {
    Role.CLIENT: frozenset(
        {
            Kind.HELLO,
            Kind.REQUEST,
            Kind.CANCEL,
            Kind.PING,
            Kind.PONG,
            Kind.GOAWAY,
            Kind.STREAM_CREDIT,
        }
    ),
    Role.SERVER: frozenset(
        {
            Kind.WELCOME,
            Kind.RESPONSE,
            Kind.ERROR,
            Kind.PING,
            Kind.PONG,
            Kind.GOAWAY,
            Kind.STREAM_PAGE,
            Kind.STREAM_END,
            Kind.EVENT,
        }
    ),
}
#: The kind the reply fast path looks for, as a plain int (compared per frame).
_RESPONSE = int(Kind.RESPONSE)
_HANDSHAKE_KINDS = {Role.CLIENT: {Kind.HELLO}, Role.SERVER: {Kind.WELCOME, Kind.ERROR}}


def choose_version(
    offered: tuple[int, ...], supported: tuple[int, ...] = PROTOCOL_VERSIONS
) -> int | None:
    """The newest version both sides speak, or None."""
    common = set(offered) & set(supported)
    return max(common) if common else None


class ProtocolConnection:
    """Protocol state of one connection, without any I/O."""

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
    ) -> None:
        self.role = role
        self.versions = versions
        self.state = State.HANDSHAKE
        #: Version chosen in the handshake (None before WELCOME).
        self.version: int | None = None
        #: Largest frame the peer accepts; sends above it raise FrameTooLarge.
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        #: The GOAWAY received from the peer, if any.
        self.received_goaway: GoAway | None = None
        #: Whether this side sent GOAWAY.
        self.sent_goaway = False
        self._decoder = FrameDecoder(max_frame_size)
        self._bodies = BodyDecoder()
        self._peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT

    @property
    def max_frame_size(self) -> int:
        """Largest frame this side accepts."""
        return self._decoder.max_frame_size

    # ------------------------------------------------------------------ send

    def send(self, message: Message) -> bytes:
        """Validate ``message`` against role and state; return its frame bytes."""
        kind = message.kind
        if kind not in _SENT_BY[self.role]:
            raise ProtocolViolation(f"a {self.role.value} cannot send {kind.name}")
        if kind is Kind.GOAWAY:
            pass  # the farewell before closing: allowed in every state
        elif self.state is State.CLOSED:
            raise ProtocolViolation(f"cannot send {kind.name} on a closed connection")
        elif self.state is State.HANDSHAKE and kind not in _HANDSHAKE_KINDS[self.role]:
            raise ProtocolViolation(f"cannot send {kind.name} before the handshake completed")
        elif self.state is State.OPEN and kind in (Kind.HELLO, Kind.WELCOME):
            raise ProtocolViolation(f"handshake already completed; cannot send {kind.name}")
        if isinstance(message, Request) and self.received_goaway is not None:
            raise ProtocolViolation("peer sent GOAWAY; no new requests on this connection")
        data = encode_message(message)
        if len(data) > self.peer_max_frame_size:
            raise FrameTooLarge(len(data), self.peer_max_frame_size)
        self._after_send(message)
        return data

    def send_request(
        self,
        request_id: int,
        method: str,
        args: dict[str, Any],
        deadline_ms: int | None = None,
        idempotency_key: str | None = None,
    ) -> bytes:
        """``send(Request(...))`` without building the message: the same checks,
        the same bytes (the request path is hot)."""
        if self.role is not Role.CLIENT or self.state is not State.OPEN:
            raise ProtocolViolation(f"cannot send REQUEST as a {self.role.value} in {self.state}")
        if self.received_goaway is not None:
            raise ProtocolViolation("peer sent GOAWAY; no new requests on this connection")
        data = encode_request(request_id, method, args, deadline_ms, idempotency_key)
        if len(data) > self.peer_max_frame_size:
            raise FrameTooLarge(len(data), self.peer_max_frame_size)
        return data

    def _after_send(self, message: Message) -> None:
        if isinstance(message, Welcome):
            self.state = State.OPEN
            self.version = message.version
        elif isinstance(message, Error) and self.state is State.HANDSHAKE:
            self.state = State.CLOSED
        elif isinstance(message, GoAway):
            self.sent_goaway = True

    # --------------------------------------------------------------- receive

    def receive_data(self, data: bytes | bytearray) -> None:
        """Take bytes read from the peer."""
        self._decoder.feed(data)

    def receive_eof(self) -> None:
        """The peer closed its side; raises FrameError if a frame was cut short."""
        self.state = State.CLOSED
        self._decoder.check_eof()

    def next_event(self) -> Message | BadMessage | None:
        """The next message or bad message received, or None if more bytes are needed."""
        try:
            taken = self._decoder.take()
            if taken is None:
                return None
            kind, request_id, body, flags = taken
            if kind == _RESPONSE and self.role is Role.CLIENT and self.state is State.OPEN:
                # The reply fast path: a RESPONSE is a map with a "result".
                raw = self._bodies.decode(body, request_id=request_id, kind=kind)
                if type(raw) is dict and "result" in raw and len(raw) == 1:
                    return Response(request_id, raw["result"])
            frame = Frame(kind=kind, request_id=request_id, body=body, flags=flags)
            message = decode_message(frame)
        except MessageError as exc:
            return BadMessage(exc)
        # A fault is answered with the id of the frame it came in: a HELLO or
        # WELCOME decodes with request id 0 (its sender must write 0), but the
        # answer to a stray one goes to the id its frame carried.
        if message.kind not in _SENT_BY[self._peer]:
            return BadMessage(
                MessageError(
                    f"a {self._peer.value} cannot send {message.kind.name}",
                    request_id=frame.request_id,
                    kind=message.kind,
                )
            )
        return self._after_receive(message, frame.request_id)

    def _after_receive(self, message: Message, frame_id: int) -> Message | BadMessage:
        if self.state is State.HANDSHAKE:
            return self._handshake_receive(message)
        if isinstance(message, (Hello, Welcome)):
            return BadMessage(
                MessageError(
                    f"{message.kind.name} after the handshake",
                    request_id=frame_id,
                    kind=message.kind,
                )
            )
        if isinstance(message, GoAway):
            self.received_goaway = message
        return message

    def _handshake_receive(self, message: Message) -> Message:
        if self.role is Role.SERVER:
            if not isinstance(message, Hello):
                raise ProtocolViolation(f"expected HELLO, received {message.kind.name}")
            if message.max_frame_size is not None:
                self.peer_max_frame_size = message.max_frame_size
            return message
        if isinstance(message, Welcome):
            if message.version not in self.versions:
                raise ProtocolViolation(
                    f"server chose protocol version {message.version}, not offered"
                )
            self.state = State.OPEN
            self.version = message.version
            self.peer_max_frame_size = message.max_frame_size
            return message
        if isinstance(message, Error):
            self.state = State.CLOSED
            return message
        raise ProtocolViolation(f"expected WELCOME, received {message.kind.name}")
