"""``python -m qdb_client.testing.wait ADDRESS[,ADDRESS...]``: wait until nodes answer ``ping``.

Exit status 0 once every node answered, 1 if one did not within
``--timeout`` seconds (with its last error on stderr). ``--tls-ca PEM``
for TLS nodes (their certificates must be signed by that authority);
``--credentials-file PATH`` (``user:password`` lines, the first is used) to
log in where no control token is known (nodes behind a proxy).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import ConfigError, QdbError
from .cli import parse_credentials
from .control import wait_for_nodes

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m qdb_client.testing.wait")
    p.add_argument("addresses", help="comma-separated host:port list")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds (default %(default)s)")
    p.add_argument("--tls-ca", metavar="PEM", help="TLS nodes: the authority of their certificates")
    p.add_argument("--credentials-file", metavar="PATH", help="log in as its first user")
    ns = p.parse_args(argv)
    addresses = [a.strip() for a in ns.addresses.split(",") if a.strip()]
    errors: dict[str, QdbError] = {}
    options: dict[str, Any] = {}
    if ns.tls_ca:
        options["tls"] = ssl.create_default_context(cafile=ns.tls_ca)
    if ns.credentials_file:
        try:
            with open(ns.credentials_file, encoding="utf-8") as f:
                users = parse_credentials(f.read(), source=ns.credentials_file)
        except (OSError, ConfigError) as exc:
            print(f"error: --credentials-file: {exc}", file=sys.stderr)
            return 2
        for user, password in users.items():
            options["credentials"] = {"user": user, "password": password}
            break

    async def run() -> bool:
        with trio.move_on_after(ns.timeout):
            await wait_for_nodes(addresses, last_errors=errors, **options)
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
