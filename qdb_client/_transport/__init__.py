"""One connection to one node: connector, multiplexed connection, handshake."""

from .connection import ORPHAN_GRACE, Connection, ConnectionListener, PendingRequest
from .connector import open_tcp

__all__ = ["ORPHAN_GRACE", "Connection", "ConnectionListener", "PendingRequest", "open_tcp"]
