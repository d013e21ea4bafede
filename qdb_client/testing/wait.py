"""``python -m qdb_client.testing.wait ADDRESS[,ADDRESS...]``: wait until nodes answer ``ping``.

Exit status 0 once every node answered, 1 if one did not within
``--timeout`` seconds (with its last error on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from ..errors import QdbError
from .control import wait_for_nodes

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m qdb_client.testing.wait")
    p.add_argument("addresses", help="comma-separated host:port list")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds (default %(default)s)")
    ns = p.parse_args(argv)
    addresses = [a.strip() for a in ns.addresses.split(",") if a.strip()]
    errors: dict[str, QdbError] = {}

    async def run() -> bool:
        with trio.move_on_after(ns.timeout):
            await wait_for_nodes(addresses, last_errors=errors)
            return True
        return False

    if trio.run(run):
        return 0
    for address in addresses:
        if address in errors:
            print(f"{address}: not ready: {errors[address]}", file=sys.stderr)
    print(f"error: nodes not ready after {ns.timeout} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
