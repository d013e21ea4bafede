"""What the driver does, as typed events for listeners and log lines.

Pass listeners to :func:`qdb_client.open_client` (``listeners=[...]``): each
is any callable taking one event. Every event is a frozen attrs object of a
class below; the same event also becomes one log line under the
``qdb_client`` logger tree (quiet by default: the package installs a
``NullHandler``). A listener that raises is logged and counted, never breaks
the driver. With no listener registered and DEBUG logging off, request
events are not even built.

Events never carry SQL parameters or credentials; SQL text neither.

======================  ========================  =======
event                   logger                    level
======================  ========================  =======
ConnectionCreated       qdb_client.connection     DEBUG
ConnectionReady         qdb_client.connection     DEBUG
ConnectionOpenFailed    qdb_client.connection     DEBUG (WARNING when the node goes DOWN)
ConnectionClosed        qdb_client.connection     DEBUG
PoolCleared             qdb_client.pool           INFO
RequestStarted          qdb_client.request        DEBUG
RequestSucceeded        qdb_client.request        DEBUG
RequestFailed           qdb_client.request        DEBUG (INFO when not retried)
RetryScheduled          qdb_client.request        DEBUG
RequestHedged           qdb_client.request        DEBUG
IdempotentReplay        qdb_client.request        INFO
TransactionEnded        qdb_client.transaction    DEBUG (INFO when not committed)
HeartbeatSucceeded      qdb_client.cluster        DEBUG
HeartbeatFailed         qdb_client.cluster        INFO
NodeStateChanged        qdb_client.cluster        INFO (WARNING to DOWN)
BreakerStateChanged     qdb_client.cluster        INFO (WARNING to OPEN)
MemberAdded             qdb_client.cluster        INFO
MemberSkipped           qdb_client.cluster        WARNING
MemberForgotten         qdb_client.cluster        INFO
AuthenticationRefused   qdb_client.cluster        WARNING
======================  ========================  =======

(docs/observability.md lists every event with its fields.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import attrs

__all__ = [
    "AuthenticationRefused",
    "BreakerStateChanged",
    "ConnectionClosed",
    "ConnectionCreated",
    "ConnectionOpenFailed",
    "ConnectionReady",
    "Event",
    "EventBus",
    "HeartbeatFailed",
    "HeartbeatSucceeded",
    "IdempotentReplay",
    "Listener",
    "MemberAdded",
    "MemberForgotten",
    "MemberSkipped",
    "NodeStateChanged",
    "PoolCleared",
    "RequestFailed",
    "RequestHedged",
    "RequestStarted",
    "RequestSucceeded",
    "RetryScheduled",
    "TransactionEnded",
]

logging.getLogger("qdb_client").addHandler(logging.NullHandler())


class Event:
    """Base of every event: ``at`` is the trio time it happened."""

    #: The logger (under ``qdb_client``) its log line goes to.
    logger_name: ClassVar[str] = "qdb_client"
    #: Its log level (some events raise it for serious cases: see ``level``).
    base_level: ClassVar[int] = logging.DEBUG
    #: The highest level an event of this class logs at.
    top_level: ClassVar[int] = logging.DEBUG
    #: Set by attrs on every concrete event class (all are ``@attrs.frozen``).
    __attrs_attrs__: ClassVar[tuple[attrs.Attribute[Any], ...]]
    at: float

    @property
    def level(self) -> int:
        """The log level of this event."""
        return self.base_level

    def describe(self) -> str:
        """One line for the log (fields as ``name=value``)."""
        fields = (f"{f.name}={getattr(self, f.name)!r}" for f in attrs.fields(type(self)))
        return f"{type(self).__name__} " + " ".join(fields)


#: A listener: any callable taking one event.
Listener = Callable[[Event], Any]


# --------------------------------------------------------------- connections


@attrs.frozen
class ConnectionCreated(Event):
    """A connection to ``node`` is being opened (TCP connect and handshake)."""

    logger_name: ClassVar[str] = "qdb_client.connection"
    at: float
    node: str


@attrs.frozen
class ConnectionReady(Event):
    """A connection completed its handshake: ``connection_id`` is its serial,
    ``node_id`` the node's own name, ``duration`` the seconds it took."""

    logger_name: ClassVar[str] = "qdb_client.connection"
    at: float
    node: str
    connection_id: int
    node_id: str
    duration: float


@attrs.frozen
class ConnectionOpenFailed(Event):
    """Opening a connection to ``node`` failed (``error``: class and message)."""

    logger_name: ClassVar[str] = "qdb_client.connection"
    at: float
    node: str
    error: str


@attrs.frozen
class ConnectionClosed(Event):
    """A connection closed: ``reason`` is ``idle``, ``lifetime``, ``drained``
    (after a GOAWAY or a retirement), ``lost: ...`` (it failed) or ``client``."""

    logger_name: ClassVar[str] = "qdb_client.connection"
    at: float
    node: str
    connection_id: int
    reason: str


@attrs.frozen
class PoolCleared(Event):
    """The node's pool stopped serving (the node is DOWN, merged or forgotten)."""

    logger_name: ClassVar[str] = "qdb_client.pool"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.INFO
    at: float
    node: str
    reason: str


# ------------------------------------------------------------------ requests


@attrs.frozen
class RequestStarted(Event):
    """Attempt ``attempt`` (from 1) of a call to ``method`` was sent to ``node``
    as request ``request_id`` on connection ``connection_id``. A statement of a
    transaction is one attempt (1) on the transaction's node and connection."""

    logger_name: ClassVar[str] = "qdb_client.request"
    at: float
    method: str
    node: str
    attempt: int
    request_id: int
    connection_id: int


@attrs.frozen
class RequestSucceeded(Event):
    """The attempt got its reply after ``duration`` seconds."""

    logger_name: ClassVar[str] = "qdb_client.request"
    at: float
    method: str
    node: str
    attempt: int
    request_id: int
    duration: float


@attrs.frozen
class RequestFailed(Event):
    """An attempt failed: ``outcome`` is its kind (the outcome table of
    docs/resilience.md), ``error`` its class and message, ``retried`` whether
    another attempt follows. ``node``/``request_id`` are empty/0 for an attempt
    that never reached a node."""

    logger_name: ClassVar[str] = "qdb_client.request"
    top_level: ClassVar[int] = logging.INFO
    at: float
    method: str
    node: str
    attempt: int
    request_id: int
    duration: float
    outcome: str
    error: str
    retried: bool

    @property
    def level(self) -> int:
        return logging.DEBUG if self.retried else logging.INFO


@attrs.frozen
class RetryScheduled(Event):
    """Attempt ``attempt`` follows after ``delay`` seconds, because ``reason``."""

    logger_name: ClassVar[str] = "qdb_client.request"
    at: float
    method: str
    attempt: int
    delay: float
    reason: str


@attrs.frozen
class RequestHedged(Event):
    """A read had no answer ``waited`` seconds after it started, so hedge
    ``hedge`` (from 1) of it goes to another node than ``waiting_on`` (the
    nodes its other copies wait on). The first copy to answer wins; the others
    are cancelled. Each copy's attempts have events of their own, numbered
    from 1."""

    logger_name: ClassVar[str] = "qdb_client.request"
    at: float
    method: str
    hedge: int
    waited: float
    waiting_on: tuple[str, ...]


@attrs.frozen
class IdempotentReplay(Event):
    """``node`` answered a keyed write from its stored outcome (it did not run again)."""

    logger_name: ClassVar[str] = "qdb_client.request"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.INFO
    at: float
    method: str
    node: str
    idempotency_key: str


@attrs.frozen
class TransactionEnded(Event):
    """Transaction ``tx`` on ``node`` ended after ``duration`` seconds: ``outcome``
    is ``committed``, ``rolled back`` (the block raised or was cancelled),
    ``aborted`` (the commit failed, nothing applied) or ``outcome unknown``."""

    logger_name: ClassVar[str] = "qdb_client.transaction"
    top_level: ClassVar[int] = logging.INFO
    at: float
    node: str
    tx: str
    outcome: str
    duration: float

    @property
    def level(self) -> int:
        return logging.DEBUG if self.outcome in ("committed", "rolled back") else logging.INFO


# ------------------------------------------------------------------- cluster


@attrs.frozen
class HeartbeatSucceeded(Event):
    """A heartbeat round of ``node`` was answered; ``rtt`` the last round trip."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    at: float
    node: str
    rtt: float | None


@attrs.frozen
class HeartbeatFailed(Event):
    """A heartbeat (or probe) of ``node`` failed, because ``reason``."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.INFO
    at: float
    node: str
    reason: str


@attrs.frozen
class NodeStateChanged(Event):
    """``node`` went from ``previous`` to ``state`` (UP/SUSPECT/DOWN), because ``reason``."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.WARNING
    at: float
    node: str
    previous: str
    state: str
    reason: str | None

    @property
    def level(self) -> int:
        return logging.WARNING if self.state == "DOWN" else logging.INFO


@attrs.frozen
class BreakerStateChanged(Event):
    """``node``'s circuit breaker went from ``previous`` to ``state``;
    ``opened_by`` the causes of the failures that opened it."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.WARNING
    at: float
    node: str
    previous: str
    state: str
    opened_by: tuple[str, ...]

    @property
    def level(self) -> int:
        return logging.WARNING if self.state == "OPEN" else logging.INFO


@attrs.frozen
class MemberAdded(Event):
    """A node announced by the cluster joined the rotation."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.INFO
    at: float
    node: str
    node_id: str | None


@attrs.frozen
class MemberSkipped(Event):
    """A member announced in a WELCOME was not added: ``reason`` says why (its
    host is none of the configured hosts, so the client's credentials are not
    sent there: ``trust_announced_members``; or ``max_members`` are known).
    Reported once per address."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    base_level: ClassVar[int] = logging.WARNING
    top_level: ClassVar[int] = logging.WARNING
    at: float
    node: str
    node_id: str | None
    reason: str


@attrs.frozen
class AuthenticationRefused(Event):
    """``node`` refused the client's credentials (or its session token): it is
    marked AUTH_FAILED and nothing is sent to it until ``reauthenticate``."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    base_level: ClassVar[int] = logging.WARNING
    top_level: ClassVar[int] = logging.WARNING
    at: float
    node: str
    reason: str


@attrs.frozen
class MemberForgotten(Event):
    """A discovered node no longer announced and DOWN for long was dropped."""

    logger_name: ClassVar[str] = "qdb_client.cluster"
    base_level: ClassVar[int] = logging.INFO
    top_level: ClassVar[int] = logging.INFO
    at: float
    node: str


# ----------------------------------------------------------------------- bus


class EventBus:
    """Delivers events to listeners and to the ``qdb_client`` loggers.

    ``wants(cls)`` tells whether building an event of that class is worth it
    (a listener is registered, or its logger is enabled for its level); the
    driver checks it before building request events, so they cost nothing
    when nobody listens.
    """

    def __init__(self, listeners: Iterable[Listener] = ()) -> None:
        self.listeners: tuple[Listener, ...] = tuple(listeners)
        #: Exceptions raised by listeners (logged, never propagated).
        self.listener_errors = 0
        self._loggers: dict[str, logging.Logger] = {}

    def _logger(self, name: str) -> logging.Logger:
        logger = self._loggers.get(name)
        if logger is None:
            logger = self._loggers[name] = logging.getLogger(name)
        return logger

    def wants(self, cls: type[Event]) -> bool:
        """Whether an event of class ``cls`` would reach anyone."""
        return bool(self.listeners) or self._logger(cls.logger_name).isEnabledFor(cls.top_level)

    def emit(self, event: Event) -> None:
        """Log ``event`` and hand it to every listener."""
        logger = self._logger(event.logger_name)
        level = event.level
        if logger.isEnabledFor(level):
            logger.log(level, "%s", _Lazy(event))
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                self.listener_errors += 1
                self._logger("qdb_client.events").warning(
                    "event listener %r raised on %s", listener, type(event).__name__, exc_info=True
                )


class _Lazy:
    """Formats an event only if a handler actually emits the record."""

    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event

    def __str__(self) -> str:
        return self.event.describe()
