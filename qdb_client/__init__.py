"""qdb_client: a trio-native driver for the QDB distributed SQL database."""

from .errors import *  # noqa: F403
from .errors import __all__ as _error_names

__version__ = "0.1.0"

__all__ = ["__version__", *_error_names]
