"""The node's answer to HELLO: protocol version, credentials, WELCOME.

Pure decisions, no I/O. :func:`answer_hello` answers a HELLO on a node
without sessions (no credentials configured, or when the session store is
not involved); :mod:`.sessions` adds the session store's part for a node
that requires credentials (docs/protocol.md sections 7.1 to 7.4) and builds
its WELCOME with :func:`welcome_for`.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Callable, Mapping

import attrs

from ..config import Secret
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
from .control_token import tokens_match

__all__ = [
    "HelloAnswer",
    "answer_hello",
    "authenticated",
    "control_identity",
    "password_user",
    "unauthenticated",
    "version_refusal",
    "welcome_for",
]

#: How many of the client's versions a VERSION_MISMATCH message lists.
_SHOWN_VERSIONS = 8


@attrs.frozen
class HelloAnswer:
    """What to send for a HELLO, and who the client turned out to be.

    ``user``: the authenticated user (None on a node without credentials, and
    for the control tool without credentials);
    ``control_client``: the HELLO carried the node's control token.
    """

    reply: Welcome | Error
    user: str | None = None
    control_client: bool = False

    @property
    def accepted(self) -> bool:
        """Whether the reply is a WELCOME (the connection opens)."""
        return isinstance(self.reply, Welcome)


def _password(value: str | Secret) -> str:
    return value.reveal() if isinstance(value, Secret) else value


def authenticated(credentials: Mapping[str, str | Secret] | None, hello: Hello) -> bool:
    """Whether HELLO ``auth`` matches ``credentials`` (always, when there are none).

    Passwords are compared in constant time.
    """
    if credentials is None:
        return True
    return password_user(credentials, hello) is not None


def password_user(credentials: Mapping[str, str | Secret], hello: Hello) -> str | None:
    """The user HELLO ``auth`` proves to be (right password), else None."""
    auth = hello.credentials or {}
    user, password = auth.get("user"), auth.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or user not in credentials:
        return None
    expected = _password(credentials[user]).encode()
    return user if hmac.compare_digest(expected, password.encode()) else None


def version_refusal(hello: Hello) -> Error | None:
    """VERSION_MISMATCH when the HELLO offers no version this node speaks."""
    if choose_version(hello.versions) is not None:
        return None
    supported = list(PROTOCOL_VERSIONS)
    offered = ", ".join(str(v) for v in hello.versions[:_SHOWN_VERSIONS])
    if len(hello.versions) > _SHOWN_VERSIONS:
        offered += f", ... ({len(hello.versions)} versions)"
    text = f"no common protocol version: client offers [{offered}], node speaks {supported}"
    details = {"supported_versions": supported}
    return error_message(0, ErrorCode.VERSION_MISMATCH, text, details=details)


def unauthenticated(reason: str) -> Error:
    """The handshake ERROR for refused credentials (``reason`` ``credentials``) or a
    refused session token with no password beside it (``session``)."""
    if reason == "session":
        text = "the session token is unknown, expired or revoked: log in with the password"
    elif reason == "control_token":
        text = "wrong control token (see the node's readiness line or its state directory)"
    else:
        text = "bad or missing credentials"
    return error_message(0, ErrorCode.UNAUTHENTICATED, text, details={"reason": reason})


def welcome_for(
    hello: Hello,
    config: ServerConfig,
    *,
    node_id: str,
    members: tuple[Member, ...],
    session_id: str,
    token: str | None = None,
) -> Welcome:
    """The WELCOME of an accepted HELLO (with a session token when one was issued)."""
    version = choose_version(hello.versions)
    assert version is not None
    return Welcome(
        version=version,
        node_id=node_id,
        session_id=session_id,
        max_frame_size=config.max_frame_size,
        max_in_flight=config.max_in_flight,
        idle_timeout_ms=round(config.client_idle_timeout * 1000),
        members=members,
        server_name=config.server_name,
        session_token=token,
        session_expires_ms=None if token is None else round(config.session_ttl * 1000),
    )


def control_identity(hello: Hello, config: ServerConfig, control_token: str | None) -> bool | Error:
    """Whether ``hello`` comes from the control tool: True when its ``auth`` carries
    the node's control token (a node in test mode only), UNAUTHENTICATED
    (reason ``control_token``) when it carries another one, else False.

    A node outside test mode has no control methods: it ignores the key.
    """
    offered = (hello.credentials or {}).get("control_token")
    if offered is None or not config.test_mode or control_token is None:
        return False
    if tokens_match(offered, control_token):
        return True
    return unauthenticated("control_token")


def answer_hello(
    hello: Hello,
    config: ServerConfig,
    *,
    node_id: str,
    members: Callable[[], tuple[Member, ...]],
    control_token: str | None = None,
) -> HelloAnswer:
    """Answer ``hello`` without the session store.

    No common version: VERSION_MISMATCH with ``details.supported_versions``;
    a wrong control token (:func:`control_identity`), wrong or missing
    credentials: UNAUTHENTICATED; otherwise a WELCOME with a fresh session
    id (no token) and ``members()`` (called only then). The control tool
    (``control_token``) needs no credentials.
    """
    refusal = version_refusal(hello)
    if refusal is not None:
        return HelloAnswer(refusal)
    control = control_identity(hello, config, control_token)
    if isinstance(control, Error):
        return HelloAnswer(control)
    user = None
    if config.credentials is not None and (not control or "password" in (hello.credentials or {})):
        user = password_user(config.credentials, hello)
        if user is None:
            return HelloAnswer(unauthenticated("credentials"))
    welcome = welcome_for(
        hello, config, node_id=node_id, members=members(), session_id=uuid.uuid4().hex
    )
    return HelloAnswer(welcome, user=user, control_client=control)
