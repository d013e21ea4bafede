"""Version of the qdb_client package."""

__version__ = "0.1.0"
