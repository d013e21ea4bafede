"""One connection to one node: connector, multiplexed connection, handshake."""

from .connection import Connection, PendingRequest
from .connector import open_tcp

__all__ = ["Connection", "PendingRequest", "open_tcp"]
