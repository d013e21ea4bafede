"""Fixtures shared by the unit tests."""

from .fake_network import network

__all__ = ["network"]
