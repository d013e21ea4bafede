"""The request pipeline of one client call.

A call picks a node, sends its request there within one deadline, and lets
the attempt's outcome decide what comes next: the reply, or a retry after a
backoff (on another node when one is left), or the error that says truthfully
what happened.

Each attempt is bounded by the call's deadline, lowered to the attempt
timeout once the request is out (a multiple of the node's observed reply
time, only while another node is left to try and only for requests that are
safe to repeat), so a node that stalls costs one attempt timeout, not the
whole deadline. An attempt that can send at once waits under the client's
expiry timer, one that must wait for a node or a pool slot in a cancel
scope (``attempt.py``); calls, retries and errors are ``pipeline.py``; a
read with no answer after ``hedge_delay`` is sent again elsewhere and the
first answer wins (``hedge.py``).
What happened to the attempt is classified once (``_policies.outcome``);
that one outcome feeds the node's breaker, its
latency tracker and its health monitor, and the retry policy. Every attempt
is recorded, and every error that leaves the pipeline carries the list and
the facts: whether the request was sent, whether a write may have been
applied, and the idempotency key it was sent with.
"""

from .attempt import parsed_reply
from .hedge import Hedging
from .pipeline import RequestPipeline, retry_backoff
from .state import Arguments, PipelineCounters

__all__ = [
    "Arguments",
    "Hedging",
    "PipelineCounters",
    "RequestPipeline",
    "parsed_reply",
    "retry_backoff",
]
