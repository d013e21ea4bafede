"""Opening TCP streams: the only place the driver creates sockets."""

from __future__ import annotations

import trio

from ..config import parse_address
from ..errors import ConnectError

__all__ = ["open_tcp"]


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
