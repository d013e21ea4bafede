"""Transactions: one leased connection, the node's transaction id, commit or
rollback (see :mod:`.transaction` for what can go wrong and what is raised)."""

from .block import run_in_transaction, transaction
from .common import TransactionCounters, rows_affected
from .transaction import Transaction

__all__ = [
    "Transaction",
    "TransactionCounters",
    "rows_affected",
    "run_in_transaction",
    "transaction",
]
