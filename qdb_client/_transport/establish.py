"""Opening a ready connection: TCP connect, TLS, handshake, reader/writer started."""

from __future__ import annotations

import ssl

import attrs
import trio

from ..errors import (
    AuthenticationFailed,
    ConnectError,
    ConnectTimeout,
    HandshakeError,
    ParseError,
    QdbError,
    TlsError,
)
from ..protocol import Hello
from .auth import Authenticator, HelloAuth, Retry
from .connection import Connection, ConnectionListener
from .connector import open_tcp, ssl_cause, start_tls, tls_error

__all__ = ["TlsSettings", "establish"]


@attrs.frozen
class TlsSettings:
    """TLS for every connection of a client: the context (which decides what
    certificates are trusted and whether host names are checked) and an
    optional host name every certificate must name instead of the address's."""

    context: ssl.SSLContext
    server_hostname: str | None = None


async def establish(
    address: str,
    *,
    nursery: trio.Nursery,
    hello: Hello,
    connect_timeout: float,
    max_frame_size: int,
    max_in_flight: int,
    listener: ConnectionListener | None = None,
    tls: TlsSettings | None = None,
    auth: Authenticator | None = None,
) -> Connection:
    """Connect to ``address`` and complete the handshake within ``connect_timeout``.

    With ``tls``, the TLS handshake comes first: nothing is sent before the
    node's certificate was accepted. With ``auth``, the HELLO carries the
    client's session token, or its password (docs/protocol.md 7.3, 7.4); a
    refused token is followed, within the same ``connect_timeout``, by one
    login with the password (never another token) on a new connection, if
    the password was kept. When the credentials are replaced
    (``reauthenticate``) while a handshake is under way, its outcome is
    dropped, whatever it is: a welcomed connection is closed unused, and the
    attempt logs in again, on a new connection, with the new credentials.

    The connection's tasks run in ``nursery``. Raises ConnectError,
    ConnectTimeout, TlsError, HandshakeError (VersionMismatch),
    AuthenticationFailed or another of the node's ServerErrors (e.g.
    CapacityExceeded).
    """
    settings = _Settings(address, nursery, hello, max_frame_size, max_in_flight, listener, tls)
    try:
        with trio.fail_after(connect_timeout):
            if auth is not None:
                return await _log_in(settings, auth)
            stream = await _open_stream(address, tls)
            try:
                return await _handshake(stream, settings, hello)
            except BaseException:
                await trio.aclose_forcefully(stream)  # a no-op once the connection owned it
                raise
    except trio.TooSlowError as exc:
        raise ConnectTimeout(
            f"connecting to {address} took longer than {connect_timeout:g} s", node=address
        ) from exc
    except QdbError:
        raise
    except Exception as exc:  # never let a surprise escape into a background task
        raise ConnectError(f"connecting to {address} failed: {exc!r}", node=address) from exc


@attrs.frozen
class _Settings:
    address: str
    nursery: trio.Nursery
    hello: Hello
    max_frame_size: int
    max_in_flight: int
    listener: ConnectionListener | None
    tls: TlsSettings | None


async def _log_in(settings: _Settings, auth: Authenticator) -> Connection:
    """One authenticated connection: each pass is a new socket and one HELLO.

    Passes after the first: the password after a refused token (once), or
    the new credentials after a ``reauthenticate`` during the handshake
    (nothing was sent on that connection, so nothing is lost by starting
    over; each such pass needs another change of credentials, and all of
    them share the caller's deadline).
    """
    address = settings.address
    password = False  # log in with the password even if a token is valid
    while True:
        auth.fields(trio.current_time(), address, password=password)  # nothing to send? no socket
        stream = await _open_stream(address, settings.tls)
        login: HelloAuth | None = None
        try:
            login = await auth.begin(address, password=password)
            connection = await _handshake(stream, settings, login.apply(settings.hello))
        except AuthenticationFailed as exc:
            retry = Retry.NO if login is None else auth.refused(login, address, exc)
            await trio.aclose_forcefully(stream)
            if retry is Retry.AFRESH:
                password = False
                continue
            if retry is Retry.PASSWORD and not password:
                password = True  # the token is gone: log in with the password
                continue
            raise
        except BaseException:
            await trio.aclose_forcefully(stream)  # a no-op once the connection owned it
            raise
        finally:
            if login is not None:
                auth.end(login)
        welcome = connection.welcome
        now = trio.current_time()
        if auth.succeeded(login, welcome, now) if welcome is not None else auth.current(login):
            return connection
        # Logged in with credentials replaced meanwhile: as someone the client
        # no longer is. Nothing was sent on it yet; never let it be used.
        await connection.aclose()
        password = False


async def _open_stream(address: str, tls: TlsSettings | None) -> trio.abc.Stream:
    stream: trio.abc.Stream = await open_tcp(address)
    if tls is not None:
        stream = await start_tls(stream, address, tls.context, server_hostname=tls.server_hostname)
    return stream


async def _handshake(stream: trio.abc.Stream, settings: _Settings, hello: Hello) -> Connection:
    address, tls = settings.address, settings.tls is not None
    connection = Connection(
        stream,
        address=address,
        max_frame_size=settings.max_frame_size,
        max_in_flight=settings.max_in_flight,
        listener=settings.listener,
    )
    try:
        await settings.nursery.start(connection.run, hello)
    except ParseError as exc:
        if exc.details.get("tls_required") is True:
            raise TlsError(
                f"{address} speaks TLS only: connect with tls=True (or an ssl.SSLContext)",
                node=address,
                tls_required=True,
            ) from exc
        raise
    except (ConnectError, HandshakeError) as exc:
        # Over TLS 1.3 the node checks a client certificate after the client's
        # TLS handshake is done: a refusal shows on the first read, as a TLS
        # alert or (the alert lost) as the node closing before any frame.
        if not tls or isinstance(exc, (TlsError, ConnectTimeout)):
            raise
        cause = ssl_cause(exc)
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLEOFError):
            raise tls_error(address, exc, during="the QDB handshake") from exc
        if isinstance(exc, ConnectError):
            raise TlsError(
                f"{address} closed the connection right after the TLS handshake, before"
                " answering HELLO: it may require a client certificate that the client did"
                " not present (tls=an ssl.SSLContext with load_cert_chain)",
                node=address,
            ) from exc
        raise
    return connection
