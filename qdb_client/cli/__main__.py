"""``python -m qdb_client.cli``: the ``qdb`` command (see :mod:`qdb_client.cli`)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
