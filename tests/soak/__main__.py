"""``python -m tests.soak``: run the soak (see :mod:`tests.soak.runner`)."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
