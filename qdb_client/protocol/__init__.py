"""Protocol v1 of QDB: frames, CBOR bodies, message kinds, connection state.

Pure code: no trio, no sockets. Both the driver and the test server
(:mod:`qdb_client.testing`) are built on it. The byte-level contract is
docs/protocol.md.
"""

from .codec import decode_body, encode_body
from .codes import RETRYABLE_CLASSES, ErrorCode
from .connection import BadMessage, ProtocolConnection, Role, State, choose_version
from .errors import (
    FrameError,
    FrameTooLarge,
    MessageError,
    ProtocolError,
    ProtocolViolation,
    ValueNotEncodable,
)
from .frames import DEFAULT_MAX_FRAME_SIZE, HEADER_SIZE, MAGIC, Frame, FrameDecoder, encode_frame
from .messages import (
    PROTOCOL_VERSIONS,
    Cancel,
    Error,
    Event,
    GoAway,
    Hello,
    Kind,
    Member,
    Message,
    Ping,
    Pong,
    Request,
    Response,
    StreamCredit,
    StreamEnd,
    StreamPage,
    Welcome,
    decode_message,
    encode_message,
)
from .reader import READ_SIZE, receive_event, receive_events
from .server_errors import ServerError, error_from_message, error_message, server_error_from_wire

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "PROTOCOL_VERSIONS",
    "READ_SIZE",
    "RETRYABLE_CLASSES",
    "BadMessage",
    "Cancel",
    "Error",
    "ErrorCode",
    "Event",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameTooLarge",
    "GoAway",
    "Hello",
    "Kind",
    "Member",
    "Message",
    "MessageError",
    "Ping",
    "Pong",
    "ProtocolConnection",
    "ProtocolError",
    "ProtocolViolation",
    "Request",
    "Response",
    "Role",
    "ServerError",
    "State",
    "StreamCredit",
    "StreamEnd",
    "StreamPage",
    "ValueNotEncodable",
    "Welcome",
    "choose_version",
    "decode_body",
    "decode_message",
    "encode_body",
    "encode_frame",
    "encode_message",
    "error_from_message",
    "error_message",
    "receive_event",
    "receive_events",
    "server_error_from_wire",
]
