"""Test server, cluster harness and fault controls for QDB protocol v1.

Public, like ``trio.testing``: applications test their use of the driver
against it. Built only on :mod:`qdb_client.protocol`, :mod:`qdb_client.errors`,
trio and the standard library. See docs/testing.md.

- :class:`QdbNode` / :func:`open_node`: one node (TCP, or ``serve_connection``
  over any trio stream), configured by :class:`ServerConfig`.
- :class:`Faults` (``node.faults``): synchronous fault injection;
  :class:`NodeControl` / :func:`open_node_control`: the same over the wire.
- :class:`TestCluster` / :class:`TestServer`: 1..N nodes on one SQLite file,
  in-process, as subprocesses, or external (``TEST_SERVER_PORTS``).
- :class:`FaultProxy` / :func:`open_fault_proxy`: a TCP proxy whose toxics
  (latency, bandwidth, timeout, reset_peer, ...) degrade the traffic;
  :class:`ProxyControl` / :func:`open_proxy_control`: its control port.
"""

from .cli import READY_PATTERN
from .cluster import TestCluster, TestServer
from .config import DEFAULT_SERVER_NAME, ServerConfig, format_address, parse_address
from .control import NodeControl, open_node_control, wait_for_nodes
from .faults import FailRule, Faults, resolve_error_code
from .proxy import ConnectionToxics, FaultProxy, ToxicHandle, open_fault_proxy, pump
from .proxy_cli import PROXY_READY_PATTERN
from .proxy_control import ProxyControl, ProxyControlError, open_proxy_control
from .server import QdbNode, open_node
from .stats import CONTROL_CLIENT_NAME, NodeStatistics
from .toxics import TOXIC_KINDS, PumpEnd, Toxic, ToxicSet

__all__ = [
    "CONTROL_CLIENT_NAME",
    "DEFAULT_SERVER_NAME",
    "PROXY_READY_PATTERN",
    "READY_PATTERN",
    "TOXIC_KINDS",
    "ConnectionToxics",
    "FailRule",
    "FaultProxy",
    "Faults",
    "NodeControl",
    "NodeStatistics",
    "ProxyControl",
    "ProxyControlError",
    "PumpEnd",
    "QdbNode",
    "ServerConfig",
    "TestCluster",
    "TestServer",
    "Toxic",
    "ToxicHandle",
    "ToxicSet",
    "format_address",
    "open_fault_proxy",
    "open_node",
    "open_node_control",
    "open_proxy_control",
    "parse_address",
    "pump",
    "resolve_error_code",
    "wait_for_nodes",
]
