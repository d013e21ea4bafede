"""``python -m qdb_client.testing``: run one test node (see :mod:`qdb_client.testing.cli`).

``python -m qdb_client.testing proxy ...`` runs fault proxies instead
(see :mod:`qdb_client.testing.proxy_cli`).
"""

import sys

from .cli import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["proxy"]:
        from .proxy_cli import main as proxy_main

        sys.exit(proxy_main(sys.argv[2:]))
    sys.exit(main())
