"""``python -m qdb_client.testing``: run one test node (see :mod:`qdb_client.testing.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
