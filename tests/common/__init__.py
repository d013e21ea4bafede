"""Helpers shared by the test-server tests: a raw protocol client and node fixtures."""
