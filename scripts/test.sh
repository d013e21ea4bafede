#!/usr/bin/env bash
# Set up .venv and run everything CI runs: lint, format check, type check, the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check qdb_client tests bench scripts examples
.venv/bin/ruff format --check qdb_client tests bench scripts examples
.venv/bin/mypy qdb_client
.venv/bin/python -m pytest "$@"
