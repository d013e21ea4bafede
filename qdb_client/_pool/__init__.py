"""Per-node connection pools: pure decisions (_state) and the trio wrapper (_pool)."""

from ._pool import NodePool, PoolListener
from ._state import ConnectionRecord, PoolLimits, PoolState

__all__ = ["ConnectionRecord", "NodePool", "PoolLimits", "PoolListener", "PoolState"]
