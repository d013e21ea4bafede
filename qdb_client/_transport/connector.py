"""Opening TCP and TLS streams: the only place the driver creates sockets.

TLS (``tls=True`` or an ``ssl.SSLContext``) wraps the TCP stream in a
``trio.SSLStream`` and completes the TLS handshake here, before any frame
(and so any credential) is sent. The certificate chain and the host name
are checked by the context (``ssl.create_default_context()`` checks both);
the host name is the address's host unless ``server_hostname`` overrides
it. Every ``ssl`` or trio failure becomes a :class:`~qdb_client.errors.TlsError`.
"""

from __future__ import annotations

import ssl

import trio

from ..config import parse_address
from ..errors import ConnectError, TlsError

__all__ = ["open_tcp", "ssl_cause", "start_tls", "tls_error"]

#: OpenSSL reasons that mean "the peer does not speak TLS" (a plain-text node).
_NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "UNKNOWN_PROTOCOL",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "HTTP_REQUEST",
        "UNEXPECTED_RECORD",
        "RECORD_TOO_LARGE",
        "UNSUPPORTED_PROTOCOL",
    }
)


async def open_tcp(address: str) -> trio.SocketStream:
    """Open a TCP stream to ``host:port`` with TCP_NODELAY set.

    OS-level failures (refused, unreachable, DNS) become ConnectError. No
    timeout here: the caller wraps this in its connect deadline.
    """
    host, port = parse_address(address)
    try:
        # happy_eyeballs_delay=None: try addresses one by one, so a refused
        # IPv6 attempt does not hide the IPv4 answer's error.
        return await trio.open_tcp_stream(host, port, happy_eyeballs_delay=None)
    except (OSError, ValueError) as exc:  # ValueError: e.g. an unencodable host name
        raise ConnectError(f"cannot connect to {address}: {exc}", node=address) from exc


async def start_tls(
    stream: trio.abc.Stream,
    address: str,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
) -> trio.SSLStream[trio.abc.Stream]:
    """Wrap ``stream`` in TLS and complete the handshake (no timeout here either).

    The certificate must name ``server_hostname`` (default: the host of
    ``address``). Any failure closes ``stream`` and raises TlsError.
    """
    host = server_hostname or parse_address(address)[0]
    try:
        tls = trio.SSLStream(stream, context, server_hostname=host)
    except (ssl.SSLError, ValueError) as exc:  # e.g. a server-side context, a bad name
        await trio.aclose_forcefully(stream)
        raise TlsError(f"cannot start TLS with {address}: {exc}", node=address) from exc
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        await trio.aclose_forcefully(tls)
        raise tls_error(address, exc, during="the TLS handshake") from exc
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return tls


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind ``exc`` (itself, or in its causes), if any."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, ssl.SSLError):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def tls_error(address: str, exc: BaseException, *, during: str) -> TlsError:
    """The TlsError for a failure of TLS with ``address`` (``exc`` from trio or ssl)."""
    cause = ssl_cause(exc)
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or cause.reason or str(cause)
        return TlsError(
            f"TLS: the certificate of {address} was refused ({why}); check the certificate"
            " authority the client trusts (tls=...) and the host name it must name"
            " (tls_server_hostname)",
            node=address,
            verification_failed=True,
        )
    if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
        reason = cause.reason or type(cause).__name__
        if reason in _NOT_TLS:
            hint = ": the node does not seem to speak TLS (is it started with --tls-cert?)"
        elif "CERTIFICATE" in reason or "ALERT" in reason:
            hint = ": the node refused the TLS handshake (does it require a client certificate?)"
        else:
            hint = ""
        return TlsError(f"TLS with {address} failed during {during} ({reason}){hint}", node=address)
    return TlsError(
        f"{address} closed the connection during {during}: {exc!r:.200}",
        node=address,
        retryable=True,
    )
