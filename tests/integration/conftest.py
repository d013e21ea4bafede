"""Fixtures of the integration tests.

The repository root is put on sys.path so that ``qdb_client`` and
``tests.common`` import without an installed package.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.common.fixtures import control, node  # noqa: E402, F401
