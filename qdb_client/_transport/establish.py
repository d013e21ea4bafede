"""Opening a ready connection: TCP connect, handshake, reader/writer started."""

from __future__ import annotations

import trio

from ..errors import ConnectError, ConnectTimeout, QdbError
from ..protocol import Hello
from .connection import Connection, ConnectionListener
from .connector import open_tcp

__all__ = ["establish"]


async def establish(
    address: str,
    *,
    nursery: trio.Nursery,
    hello: Hello,
    connect_timeout: float,
    max_frame_size: int,
    max_in_flight: int,
    listener: ConnectionListener | None = None,
) -> Connection:
    """Connect to ``address`` and complete the handshake within ``connect_timeout``.

    The connection's tasks run in ``nursery``. Raises ConnectError,
    ConnectTimeout, HandshakeError (VersionMismatch) or the node's
    ServerError (e.g. CapacityExceeded, Unauthenticated).
    """
    try:
        with trio.fail_after(connect_timeout):
            stream = await open_tcp(address)
            connection = Connection(
                stream,
                address=address,
                max_frame_size=max_frame_size,
                max_in_flight=max_in_flight,
                listener=listener,
            )
            await nursery.start(connection.run, hello)
    except trio.TooSlowError as exc:
        raise ConnectTimeout(
            f"connecting to {address} took longer than {connect_timeout:g} s", node=address
        ) from exc
    except QdbError:
        raise
    except Exception as exc:  # never let a surprise escape into a background task
        raise ConnectError(f"connecting to {address} failed: {exc!r}", node=address) from exc
    return connection
