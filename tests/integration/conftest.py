"""Fixtures of the integration tests: an in-process test node and a control connection."""

from ..common.fixtures import control, node

__all__ = ["control", "node"]
