"""The node's side of the wire: REQUEST arguments read with the node's own tag handling.

The protocol codec (:mod:`qdb_client.protocol.codec`), which driver and node
share, turns the typed values of docs/protocol.md section 10.1 into Python
values: a date-time, a decimal, the *parsed* value of embedded JSON. That is
what a client wants of a result, but a node can't work with it: embedded JSON
``[1, 2]`` and an untagged array ``[1, 2]`` (which the node must refuse) would
be the same list, tag 1 (an epoch time) would pass for tag 0, and a tag whose
content is wrong (a date-time without an offset) would make the whole body
undecodable (PARSE_ERROR) instead of a refused parameter (INVALID_REQUEST with
``details.parameter``).

:class:`NodeProtocol` is the server's :class:`~qdb_client.protocol.ProtocolConnection`
with one change: for a REQUEST whose body holds a tag, it decodes the body
once more with the limits of the codec (depth 32, definite lengths, text or
byte keys, no duplicate keys, no shared values) but every tag other than the
bignums (2, 3) left as a :class:`~.typed.Tagged` value, and hands the
handlers those arguments. The message itself (method, deadline, key) is the
one the protocol layer decoded and checked; a REQUEST the codec refused only
because of what a tag held is rebuilt with its arguments read this way, so its
handler can refuse the parameter. The tag check is one regular-expression scan
for a byte that may start a tag (``0xc0`` to ``0xdb``); a body without one
decodes once, as before.
"""

from __future__ import annotations

import io
import re
from typing import Any

import attrs
import cbor2

from ..protocol import (
    BadMessage,
    Frame,
    FrameDecoder,
    Kind,
    Message,
    MessageError,
    ProtocolConnection,
    Request,
    Role,
    State,
    decode_message,
)
from ..protocol.codec import MAX_DEPTH
from .typed import Tagged

__all__ = ["NodeProtocol", "decode_raw_request"]

#: A byte that may be the head of a CBOR tag (major type 6, additional info 0..27).
_TAG_HEAD = re.compile(rb"[\xc0-\xdb]")
#: Tags cbor2 decodes into Python values by itself; read raw instead.
_BUILT_IN = (0, 1, 4, 5, 25, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 262, 1004, 1008)
#: Shared-value tags, refused as the codec refuses them.
_SHARED = (28, 29)


def _raw(tag: int) -> Any:
    def decode(value: Any, immutable: bool = False) -> Tagged:
        return Tagged(tag, value)

    return decode


def _refuse(value: Any, immutable: bool = False) -> Any:
    raise cbor2.CBORDecodeError("shared-value tags (28/29) are not allowed")


def _unknown(tag: cbor2.CBORTag, immutable: bool = False) -> Tagged:
    return Tagged(tag.tag, tag.value)


_DECODERS: dict[int, Any] = {
    **{tag: _raw(tag) for tag in _BUILT_IN},
    **dict.fromkeys(_SHARED, _refuse),
}


def decode_raw_request(body: bytes) -> dict[str, Any] | None:
    """A REQUEST body with its tags left raw; None if it is not a decodable map."""
    fp = io.BytesIO(body)
    try:
        value = cbor2.CBORDecoder(
            fp,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            strict_hashable_types=True,
            allow_duplicate_keys=False,
            semantic_decoders=_DECODERS,
            tag_hook=_unknown,
        ).decode()
    except Exception:  # anything cbor2 refuses: the codec's verdict stands
        return None
    if fp.tell() != len(body) or type(value) is not dict:
        return None
    return value


class NodeProtocol(ProtocolConnection):
    """The server side's protocol state machine, handing REQUESTs their raw-tag arguments.

    Frames are also parsed by a second :class:`~qdb_client.protocol.FrameDecoder`
    fed the same bytes, in step with the events (one frame each), to reach
    the body of each REQUEST.
    """

    def __init__(self, *, max_frame_size: int) -> None:
        super().__init__(Role.SERVER, max_frame_size=max_frame_size)
        self._frames = FrameDecoder(max_frame_size)

    def receive_data(self, data: bytes | bytearray) -> None:
        """Take bytes read from the peer."""
        super().receive_data(data)
        self._frames.feed(data)

    def next_event(self) -> Message | BadMessage | None:
        """The next message (see ProtocolConnection), with REQUEST arguments read raw."""
        event = super().next_event()
        if event is None:
            return None
        try:
            frame = self._frames.next_frame()
        except MessageError:  # a bad checksum: the event is the same BadMessage
            return event
        if frame is None or frame.kind != Kind.REQUEST or self.state is not State.OPEN:
            return event
        if isinstance(event, Request):
            if not _TAG_HEAD.search(frame.body):
                return event
            raw = decode_raw_request(frame.body)
            args = raw.get("args") if raw is not None else None
            return attrs.evolve(event, args=args) if type(args) is dict else event
        if isinstance(event, BadMessage):
            return _rebuilt(frame) or event
        return event


def _rebuilt(frame: Frame) -> Request | None:
    """The REQUEST in ``frame`` the codec refused, if only its arguments' tags were wrong."""
    raw = decode_raw_request(frame.body)
    if raw is None or type(raw.get("args", {})) is not dict:
        return None
    envelope = {key: value for key, value in raw.items() if key != "args"}
    try:
        checked = decode_message(attrs.evolve(frame, body=cbor2.dumps(envelope)))
    except (MessageError, cbor2.CBOREncodeError, TypeError, ValueError):
        return None  # a tag outside the arguments, or a bad envelope: PARSE_ERROR
    if not isinstance(checked, Request):
        return None
    return attrs.evolve(checked, args=raw.get("args", {}))
