"""The node's answer to HELLO: protocol version, credentials, WELCOME.

Pure decisions, no I/O: :func:`answer_hello` returns the WELCOME to send,
or the handshake ERROR (request id 0) after which the node closes
(docs/protocol.md sections 7.1 to 7.3).
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable, Mapping

import attrs

from ..protocol import (
    PROTOCOL_VERSIONS,
    Error,
    ErrorCode,
    Hello,
    Member,
    Welcome,
    choose_version,
    error_message,
)
from .config import ServerConfig
from .stats import CONTROL_CLIENT_NAME

__all__ = ["HelloAnswer", "answer_hello", "authenticated"]

#: How many of the client's versions a VERSION_MISMATCH message lists.
_SHOWN_VERSIONS = 8


@attrs.frozen
class HelloAnswer:
    """What to send for a HELLO, and who the client turned out to be.

    ``user``: the authenticated user (None on a node without credentials);
    ``control_client``: the HELLO named the control tool.
    """

    reply: Welcome | Error
    user: str | None = None
    control_client: bool = False

    @property
    def accepted(self) -> bool:
        """Whether the reply is a WELCOME (the connection opens)."""
        return isinstance(self.reply, Welcome)


def authenticated(credentials: Mapping[str, str] | None, hello: Hello) -> bool:
    """Whether HELLO ``auth`` matches ``credentials`` (always, when there are none).

    Passwords are compared in constant time.
    """
    if credentials is None:
        return True
    auth = hello.credentials or {}
    user, password = auth.get("user"), auth.get("password")
    if user is None or password is None or user not in credentials:
        return False
    return hmac.compare_digest(credentials[user].encode(), password.encode())


def answer_hello(
    hello: Hello,
    config: ServerConfig,
    *,
    node_id: str,
    members: Callable[[], tuple[Member, ...]],
) -> HelloAnswer:
    """Answer ``hello`` on a node configured by ``config``.

    No common version: VERSION_MISMATCH with ``details.supported_versions``;
    wrong or missing credentials: UNAUTHENTICATED; otherwise a WELCOME with a
    fresh session id and ``members()`` (called only then).
    """
    version = choose_version(hello.versions)
    if version is None:
        supported = list(PROTOCOL_VERSIONS)
        offered = ", ".join(str(v) for v in hello.versions[:_SHOWN_VERSIONS])
        if len(hello.versions) > _SHOWN_VERSIONS:
            offered += f", ... ({len(hello.versions)} versions)"
        text = f"no common protocol version: client offers [{offered}], node speaks {supported}"
        details = {"supported_versions": supported}
        return HelloAnswer(error_message(0, ErrorCode.VERSION_MISMATCH, text, details=details))
    if not authenticated(config.credentials, hello):
        return HelloAnswer(
            error_message(0, ErrorCode.UNAUTHENTICATED, "bad or missing credentials")
        )
    user = None
    if config.credentials is not None and hello.credentials:
        user = hello.credentials.get("user")
    welcome = Welcome(
        version=version,
        node_id=node_id,
        session_id=uuid.uuid4().hex,
        max_frame_size=config.max_frame_size,
        max_in_flight=config.max_in_flight,
        idle_timeout_ms=round(config.client_idle_timeout * 1000),
        members=members(),
        server_name=config.server_name,
    )
    return HelloAnswer(welcome, user=user, control_client=hello.client_name == CONTROL_CLIENT_NAME)
