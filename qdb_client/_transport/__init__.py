"""One connection to one node: connector, multiplexed connection, handshake."""

from .connection import ORPHAN_GRACE, Connection, ConnectionListener, PendingRequest
from .connector import open_tcp
from .pending import Expired, Expiries

__all__ = [
    "ORPHAN_GRACE",
    "Connection",
    "ConnectionListener",
    "Expired",
    "Expiries",
    "PendingRequest",
    "open_tcp",
]
