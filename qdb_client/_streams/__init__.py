"""Result streams and table subscriptions: requests answered by many frames.

- :class:`ResultStream` (``client.stream``, ``tx.stream``): pages with
  credit, checked page by page, resumed on any node after a failure;
- :class:`Subscription` (``client.subscribe``): committed changes of a table,
  resumed after the last event received;
- :class:`ResultPage` and :class:`ChangeEvent`: what they hand out.

docs/protocol.md sections 12 and 13 are the contract; docs/resilience.md
says how both recover.
"""

from .stream import ResultStream
from .subscription import Subscription
from .tx_stream import TransactionStream
from .types import ChangeEvent, ResultPage

__all__ = ["ChangeEvent", "ResultPage", "ResultStream", "Subscription", "TransactionStream"]
