"""qdb_client: a trio-native driver for the QDB distributed SQL database.

::

    async with qdb_client.open_client(["127.0.0.1:7000", "127.0.0.1:7001"]) as client:
        await client.execute("INSERT INTO t (name) VALUES (?)", ["ada"])
        result = await client.query("SELECT id, name FROM t")
        for row in result:
            print(row["id"], row["name"])

Every error raised is a :class:`QdbError` (see :mod:`qdb_client.errors`).
"""

from ._client import Client, Params, Statement, open_client
from ._prepared import PreparedStatement
from ._streams import ChangeEvent, ResultPage, ResultStream, Subscription
from ._transaction import Transaction
from ._version import __version__
from .config import ClientConfig, Credentials
from .errors import *  # noqa: F403
from .errors import __all__ as _error_names
from .results import ExecuteResult, QueryResult, Row
from .values import Json

__all__ = [
    "ChangeEvent",
    "Client",
    "ClientConfig",
    "Credentials",
    "ExecuteResult",
    "Json",
    "Params",
    "PreparedStatement",
    "QueryResult",
    "ResultPage",
    "ResultStream",
    "Row",
    "Statement",
    "Subscription",
    "Transaction",
    "__version__",
    "open_client",
    *_error_names,
]
