"""Fault injection state of one node, operated synchronously.

``node.faults`` is a :class:`Faults`; the ``control.*`` methods and
:class:`~qdb_client.testing.NodeControl` reach the same object over the
wire. Faults apply to data methods (``ping``, ``execute``, ``query``,
``batch``) and never to control methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from ..protocol import ErrorCode
from ._failure import RequestFailed

__all__ = ["WRITE_METHODS", "FailRule", "Faults", "resolve_error_code"]

#: Latency key that applies to every data method without its own entry.
ANY_METHOD = "*"
#: Methods ``drop_after_commit`` applies to by default: the writes.
WRITE_METHODS = frozenset({"execute", "batch"})


def resolve_error_code(code: str | int | ErrorCode) -> ErrorCode:
    """Turn a symbolic name (``"UNAVAILABLE"``) or numeric class (``503``) into an ErrorCode.

    A class picks the first ErrorCode of that class in declaration order
    (503 -> UNAVAILABLE, 500 -> INTERNAL, 408 -> TIMEOUT). ValueError if
    nothing matches.
    """
    if isinstance(code, ErrorCode):
        return code
    if isinstance(code, bool):
        raise ValueError(f"error code must be a name or a numeric class, not {code!r}")
    if isinstance(code, int):
        for candidate in ErrorCode:
            if candidate.code == code:
                return candidate
        raise ValueError(f"no error code has the numeric class {code}")
    if isinstance(code, str):
        try:
            return ErrorCode(code.strip().upper())
        except ValueError:
            raise ValueError(f"unknown error code name {code!r}") from None
    raise ValueError(f"error code must be a name or a numeric class, not {code!r}")


@attrs.define
class FailRule:
    """One ``fail_next`` instruction: fail ``remaining`` more matching requests."""

    remaining: int
    code: ErrorCode
    message: str
    methods: frozenset[str] | None = None
    retry_after_ms: int | None = None

    def matches(self, method: str) -> bool:
        """Whether a request for ``method`` is one this rule fails."""
        return self.remaining > 0 and (self.methods is None or method in self.methods)


class Faults:
    """The faults a node is currently injecting, and the operations that change them.

    Built by the node, which passes the hooks that act on its sockets:
    ``refuse`` (stop/restart listening), ``drop`` (close client
    connections), ``stats`` and ``reset_counters``.
    """

    def __init__(
        self,
        *,
        refuse: Callable[[bool], None],
        drop: Callable[[], int],
        stats: Callable[[], dict[str, Any]],
        reset_counters: Callable[[], None],
    ) -> None:
        self._refuse_hook = refuse
        self._drop_hook = drop
        self._stats_hook = stats
        self._reset_counters_hook = reset_counters
        self._rules: list[FailRule] = []
        self._latency: dict[str, float] = {}
        self._pings_stopped = False
        self._refusing = False
        self._drops_after_commit = 0
        self._drop_methods: frozenset[str] = WRITE_METHODS

    # ------------------------------------------------------------ operations

    def fail_next(
        self,
        count: int,
        code: str | int | ErrorCode = ErrorCode.UNAVAILABLE,
        *,
        message: str | None = None,
        methods: Iterable[str] | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests with ERROR ``code``, without executing them.

        ``code`` is a name (``"INTERNAL"``) or a numeric class (``503`` means
        the first code of that class, UNAVAILABLE); ``retryable`` follows the
        class. ``methods`` limits the rule to those method names (default:
        every data method). Rules queue up and are used in order;
        ``count=0`` removes every pending rule.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, not {count!r}")
        resolved = resolve_error_code(code)
        if message is not None and not isinstance(message, str):
            raise ValueError("message must be text")
        method_set: frozenset[str] | None = None
        if methods is not None:
            if isinstance(methods, str):
                methods = [methods]
            method_set = frozenset(methods)
            if not all(isinstance(m, str) for m in method_set):
                raise ValueError("methods must be a list of method names")
        if retry_after_ms is not None and (
            isinstance(retry_after_ms, bool)
            or not isinstance(retry_after_ms, int)
            or retry_after_ms < 0
        ):
            raise ValueError("retry_after_ms must be a non-negative integer")
        if count == 0:
            self._rules.clear()
            return
        self._rules.append(
            FailRule(
                remaining=count,
                code=resolved,
                message=message or f"injected fault: {resolved.value}",
                methods=method_set,
                retry_after_ms=retry_after_ms,
            )
        )

    def drop_after_commit(self, count: int, methods: Iterable[str] | None = None) -> None:
        """Lose the reply of the next ``count`` matching requests that execute successfully.

        Such a request runs and commits normally; then, instead of sending
        its RESPONSE, the node closes that client connection abruptly (no
        GOAWAY; other requests in flight on it are abandoned). The client
        sees the connection drop after it sent the request: an unknown
        outcome, which an idempotency key makes safe to retry. ``methods``
        defaults to ``execute`` and ``batch``. A keyed write answered from
        its stored result did not execute, so it is answered and does not
        use up the count. A new call replaces the previous setting;
        ``count=0`` clears it.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative integer, not {count!r}")
        method_set = WRITE_METHODS
        if methods is not None:
            if isinstance(methods, str):
                methods = [methods]
            method_set = frozenset(methods)
            if not method_set or not all(isinstance(m, str) and m for m in method_set):
                raise ValueError("methods must be a non-empty list of method names")
        self._drops_after_commit = count
        self._drop_methods = method_set

    def add_latency(self, method: str, seconds: float) -> None:
        """Delay every ``method`` request (``"*"``: every data method) by ``seconds``.

        The delay counts against the request's deadline. A method's own entry
        wins over ``"*"``. ``seconds=0`` removes the entry.
        """
        if not isinstance(method, str) or not method:
            raise ValueError("method must be a method name or '*'")
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds < 0
        ):
            raise ValueError(f"seconds must be a non-negative number, not {seconds!r}")
        if seconds == 0:
            self._latency.pop(method, None)
        else:
            self._latency[method] = float(seconds)

    def clear_latency(self) -> None:
        """Remove every latency entry."""
        self._latency.clear()

    def stop_pings(self, enabled: bool = True) -> None:
        """While enabled, PING frames get no PONG and the ``ping`` method gets no reply."""
        self._pings_stopped = bool(enabled)

    def drop_connections(self) -> int:
        """Abruptly close every client connection (no GOAWAY); return how many."""
        return self._drop_hook()

    def refuse_connections(self, enabled: bool = True) -> None:
        """Close the listening socket (connects get ECONNREFUSED) or re-open it on the same port.

        Connections already open are not affected. Raises OSError if the port
        can't be bound again.
        """
        enabled = bool(enabled)
        if enabled != self._refusing:
            self._refuse_hook(enabled)
            self._refusing = enabled

    def stats(self) -> dict[str, Any]:
        """The node's statistics (same as ``node.statistics()``)."""
        return self._stats_hook()

    def reset(self) -> None:
        """Clear every fault (re-opening the listener if refused) and zero the counters."""
        self._rules.clear()
        self._latency.clear()
        self._pings_stopped = False
        self._drops_after_commit = 0
        self._drop_methods = WRITE_METHODS
        self.refuse_connections(False)
        self._reset_counters_hook()

    # ---------------------------------------------------- queries by the node

    @property
    def pings_stopped(self) -> bool:
        """Whether pings (frames and method) are currently unanswered."""
        return self._pings_stopped

    @property
    def refusing(self) -> bool:
        """Whether the listener is closed by :meth:`refuse_connections`."""
        return self._refusing

    def latency_for(self, method: str) -> float:
        """Seconds to delay a ``method`` request (0.0 for none)."""
        return self._latency.get(method, self._latency.get(ANY_METHOD, 0.0))

    def take_failure(self, method: str) -> RequestFailed | None:
        """Consume one matching ``fail_next`` rule and return its error, or None."""
        for rule in self._rules:
            if rule.matches(method):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._rules.remove(rule)
                return RequestFailed(
                    rule.code,
                    rule.message,
                    details={"injected": True, "executed": False},
                    retry_after_ms=rule.retry_after_ms,
                )
        return None

    def take_drop_after_commit(self, method: str) -> bool:
        """Whether to drop the connection instead of replying to a ``method`` request
        that just executed successfully; consumes one ``drop_after_commit``.
        """
        if self._drops_after_commit > 0 and method in self._drop_methods:
            self._drops_after_commit -= 1
            return True
        return False

    def describe(self) -> dict[str, Any]:
        """The active faults as a plain dict (part of the statistics)."""
        return {
            "fail_next": [
                {
                    "remaining": rule.remaining,
                    "code": rule.code.value,
                    "methods": sorted(rule.methods) if rule.methods is not None else None,
                }
                for rule in self._rules
            ],
            "latency_ms": {m: round(s * 1000) for m, s in sorted(self._latency.items())},
            "pings_stopped": self._pings_stopped,
            "refusing_connections": self._refusing,
            "drop_after_commit": {
                "remaining": self._drops_after_commit,
                "methods": sorted(self._drop_methods),
            },
        }
