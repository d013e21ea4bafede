"""TLS on the test node: its server context, and the TLS handshake of each accepted socket.

A node started with ``tls_cert`` (``--tls-cert``) speaks TLS only. Each
accepted TCP socket gets ``tls_handshake_timeout`` seconds to complete a TLS
handshake (``trio.SSLStream``) before anything of QDB happens on it; then
the connection is served inside TLS exactly as a plain one is.

A client that speaks plain QDB to a TLS node is recognised by its first two
bytes, the frame magic ``QD`` (a TLS ClientHello starts with ``0x16``): it
is answered, in plain text, one ERROR ``PARSE_ERROR`` with
``details.tls_required = true`` (docs/protocol.md 7.1), and the socket is
closed. Anything else that fails the TLS handshake (a wrong certificate
authority on the client, a missing client certificate, garbage, silence
past the timeout) is closed without a word. Nothing here raises: the
caller gets a stream, or None for a socket that is already closed.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable

import trio

from ..errors import ConfigError
from ..protocol import ErrorCode, ProtocolConnection, Role, error_message
from .config import ServerConfig
from .outgoing import COURTESY_SECONDS, close_stream

__all__ = ["accept_tls", "server_context"]

logger = logging.getLogger("qdb_client.testing")

#: The first bytes of every QDB frame (docs/protocol.md section 2).
_FRAME_MAGIC = b"QD"


def server_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The node's TLS context (None when it speaks plain TCP); ConfigError if the
    certificate, key or client authority can't be loaded."""
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
        if config.tls_client_ca is not None:
            context.load_verify_locations(cafile=config.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the node's TLS certificate or key: {exc}") from exc
    return context


async def accept_tls(
    sock: trio.socket.SocketType,
    context: ssl.SSLContext,
    *,
    within: float,
    peer: str,
    timed_out: Callable[[], None] | None = None,
) -> trio.SSLStream[trio.SocketStream] | None:
    """The TLS stream of an accepted socket once its handshake completed (within
    ``within`` seconds), else None (the socket is closed: a plain client was told
    to use TLS, others are dropped). ``timed_out`` is called if it took too long."""
    raw = trio.SocketStream(sock)
    with trio.move_on_after(within) as scope:
        try:
            head = await sock.recv(len(_FRAME_MAGIC), socket.MSG_PEEK)
        except OSError:
            head = b""
        if head.startswith(_FRAME_MAGIC):
            await _tell_plain_client(raw, peer)
            return None
        if not head:
            await trio.aclose_forcefully(raw)
            return None
        stream = trio.SSLStream(raw, context, server_side=True)
        try:
            await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            logger.info("TLS handshake with %s failed: %s", peer, _why(exc))
            await trio.aclose_forcefully(stream)
            return None
        return stream
    if scope.cancelled_caught:
        logger.info("TLS handshake with %s took longer than %g s: closed", peer, within)
        if timed_out is not None:
            timed_out()
    await trio.aclose_forcefully(raw)
    return None


async def _tell_plain_client(raw: trio.SocketStream, peer: str) -> None:
    logger.info("plain-text client %s on a TLS node: told to use TLS", peer)
    data = ProtocolConnection(Role.SERVER).send(
        error_message(
            0,
            ErrorCode.PARSE_ERROR,
            "this node speaks TLS only: connect with TLS (qdb_client: tls=True)",
            details={"tls_required": True},
        )
    )
    with trio.move_on_after(COURTESY_SECONDS):
        try:
            await raw.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    await close_stream(raw, linger=True)


def _why(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return repr(exc)
