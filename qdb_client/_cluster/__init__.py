"""The cluster as the client sees it: nodes, health, balancing."""

from .balancer import Balancer, LatencyAware, RoundRobin, make_balancer
from .cluster import Cluster, ClusterSettings
from .health import HealthMonitor, HealthSettings
from .node import Node, NodeState

__all__ = [
    "Balancer",
    "Cluster",
    "ClusterSettings",
    "HealthMonitor",
    "HealthSettings",
    "LatencyAware",
    "Node",
    "NodeState",
    "RoundRobin",
    "make_balancer",
]
