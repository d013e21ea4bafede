"""Write a throwaway certificate authority and a node certificate for a local test cluster.

    python scripts/make-test-certs.py DIR [HOST ...]

Creates, unless ``DIR/ca.pem`` exists already (run twice, it keeps them):

- ``DIR/ca.pem``: the authority clients trust (``ssl.create_default_context(cafile=...)``);
- ``DIR/node.pem`` and ``DIR/node.key``: the nodes' certificate chain and private key
  (mode 0600), valid for ``127.0.0.1``, ``localhost`` and every ``HOST`` given.

The authority's own key is not kept: nothing else can ever be signed by it. Needs
``trustme`` (the ``demo`` and ``test`` extras of setup.cfg).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    directory = Path(argv[0])
    names = list(dict.fromkeys(["127.0.0.1", "localhost", *argv[1:]]))
    if (directory / "ca.pem").exists():
        return 0
    try:
        import trustme
    except ImportError:
        print("make-test-certs: needs trustme (pip install -e '.[demo]')", file=sys.stderr)
        return 1
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="qdb test cluster")
    cert = ca.issue_cert(*names)
    _write(directory / "node.key", cert.private_key_pem.bytes(), 0o600)
    _write(directory / "node.pem", b"".join(blob.bytes() for blob in cert.cert_chain_pems), 0o644)
    _write(directory / "ca.pem", ca.cert_pem.bytes(), 0o644)  # last: it marks the set complete
    print(f"make-test-certs: a new authority and node certificate in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
