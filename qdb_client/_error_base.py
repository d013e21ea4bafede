"""The root of the error tree and the facts every error carries.

Kept apart from :mod:`qdb_client.errors` so that the pure protocol layer can
define its own error classes on this root without importing the rest of the
public tree (which re-exports them).
"""

from __future__ import annotations

import attrs

__all__ = ["Attempt", "InvalidArgument", "QdbError"]


@attrs.frozen
class Attempt:
    """One try of a client call, as recorded in ``QdbError.attempts``.

    ``started`` and ``elapsed`` are seconds from the start of the call and
    of the attempt; ``outcome`` is ``"ok"`` or the error's class and
    message; ``retried`` and ``reason`` say whether another attempt followed
    and why (or why not). ``sent`` tells whether the attempt's request was
    written to the node, ``maybe_applied`` whether a write may have taken
    effect through this attempt.
    """

    number: int
    node: str | None
    started: float
    elapsed: float
    outcome: str
    retried: bool
    reason: str
    sent: bool = False
    maybe_applied: bool = False

    def __str__(self) -> str:
        verdict = "retried" if self.retried else "not retried"
        sent = "sent" if self.sent else "not sent"
        return (
            f"#{self.number} on {self.node or '(no node)'} at +{self.started:.3f}s"
            f" took {self.elapsed:.3f}s ({sent}): {self.outcome}; {verdict}: {self.reason}"
        )


class QdbError(Exception):
    """Base class of every error raised by qdb_client.

    Every error carries facts about the call that raised it:

    - ``retryable``: repeating the request (perhaps on another node) may succeed;
    - ``attempts``: one :class:`Attempt` per try (empty if none was made);
    - ``request_sent``: the request reached the wire at least once;
    - ``maybe_applied``: a write may have been applied by a node although the
      call failed (False for reads, and for writes a node refused or rolled
      back);
    - ``idempotency_key``: the key the write was sent with (None for reads and
      unkeyed writes): retrying with ``idempotency_key=error.idempotency_key``
      applies it exactly once.
    """

    retryable: bool = False  # each class's default; some errors set it per instance
    attempts: tuple[Attempt, ...] = ()
    request_sent: bool = False
    maybe_applied: bool = False
    idempotency_key: str | None = None


class InvalidArgument(QdbError, TypeError):
    """A driver method was called with an argument of the wrong type or shape.

    Raised at the call site; nothing was sent.
    """
