"""Configuration of the driver: attrs classes validated at construction.

A bad value raises :class:`~qdb_client.errors.ConfigError` naming the option
and what it accepts, before any connection is attempted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from .errors import ConfigError
from .protocol.frames import HEADER_SIZE
from .validation import MAX_SECONDS, _show, boolean, int_in, parse_address, seconds_at_least, text

__all__ = ["FLOORS", "LOAD_BALANCING", "ClientConfig", "Credentials", "parse_address"]

#: The smallest value of each time option, in seconds (docs/configuration.md
#: gives the reason for each). Every time option is at most MAX_SECONDS.
#: A floor keeps a typo (``heartbeat_interval=1e-6``) from turning a
#: background loop into a busy loop, and a timeout from expiring before a
#: round trip could possibly complete.
FLOORS: dict[str, float] = {
    "connect_timeout": 0.01,
    "request_timeout": 0.001,
    "close_timeout": 0.001,
    "idle_timeout": 0.1,
    "max_lifetime": 0.1,
    "pool_acquire_timeout": 0.001,
    "heartbeat_interval": 0.05,
    "ping_timeout": 0.01,
    "suspect_interval": 0.05,
    "reconnect_initial": 0.01,
    "reconnect_max": 0.01,
    "node_selection_timeout": 0.001,
    "retry_initial_backoff": 0.001,
    "retry_max_backoff": 0.001,
    "min_attempt_time": 0.001,
    "retry_budget_window": 1.0,
    "breaker_open_timeout": 0.01,
    "attempt_timeout_min": 0.001,
    "forget_members_after": 0.01,
}
#: Floor of a time option not listed in FLOORS.
DEFAULT_FLOOR = 0.001


def _seconds(name: str) -> Any:
    """Validator of the time option ``name``: FLOORS[name] .. MAX_SECONDS."""
    return seconds_at_least(FLOORS.get(name, DEFAULT_FLOOR))


#: Names accepted by ``retry_jitter``.
JITTER_MODES = frozenset({"none", "proportional", "full", "decorrelated"})


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number within {low}..{high}, not {_show(value)}")


#: Names accepted by ``load_balancing``.
LOAD_BALANCING = frozenset({"round_robin", "latency_aware"})


def _hosts(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Iterable):
        raise ConfigError(f"hosts must be 'host:port' strings, not {_show(value)}")
    hosts = tuple(value)
    if not hosts:
        raise ConfigError("hosts must name at least one 'host:port'")
    for host in hosts:
        parse_address(host)
    if len(set(hosts)) != len(hosts):
        raise ConfigError(f"hosts lists an address twice: {_show(list(hosts), 400)}")
    return hosts


@attrs.frozen(kw_only=True)
class Credentials:
    """User name and password sent in the handshake."""

    user: str = attrs.field(validator=text)
    password: str = attrs.field(repr=False, validator=attrs.validators.instance_of(str))


def _listeners(value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if callable(value) or isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError("listeners must be a list of callables (each taking one event)")
    listeners = tuple(value)
    for listener in listeners:
        if not callable(listener):
            raise ConfigError(
                f"listeners must be callables taking one event, not {_show(listener)}"
            )
    return listeners


def _credentials(value: Any) -> Credentials | None:
    if value is None or isinstance(value, Credentials):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return Credentials(user=value[0], password=value[1])
    raise ConfigError("credentials must be a Credentials or a (user, password) tuple")


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Everything :func:`qdb_client.open_client` can be told.

    Every option, its default and the reference it follows is listed in
    docs/configuration.md. Times are in seconds.
    """

    hosts: tuple[str, ...] = attrs.field(converter=_hosts)
    # Connections
    connect_timeout: float = attrs.field(default=5.0, validator=_seconds("connect_timeout"))
    request_timeout: float = attrs.field(default=5.0, validator=_seconds("request_timeout"))
    max_frame_size: int = attrs.field(default=1024 * 1024, validator=int_in(4096, 2**31 - 1))
    max_in_flight: int = attrs.field(default=256, validator=int_in(1, 65536))
    close_timeout: float = attrs.field(default=2.0, validator=_seconds("close_timeout"))
    credentials: Credentials | None = attrs.field(default=None, converter=_credentials)
    client_name: str = attrs.field(default="qdb_client", validator=text)
    # Per-node pools
    min_connections: int = attrs.field(default=1, validator=int_in(0, 1000))
    max_connections: int = attrs.field(default=8, validator=int_in(1, 1000))
    max_connecting: int = attrs.field(default=2, validator=int_in(1, 100))
    idle_timeout: float = attrs.field(default=60.0, validator=_seconds("idle_timeout"))
    max_lifetime: float = attrs.field(default=1800.0, validator=_seconds("max_lifetime"))
    pool_acquire_timeout: float = attrs.field(
        default=5.0, validator=_seconds("pool_acquire_timeout")
    )
    max_waiters: int = attrs.field(default=1000, validator=int_in(0, 10**6))
    # Health checks and reconnection
    heartbeat_interval: float = attrs.field(default=5.0, validator=_seconds("heartbeat_interval"))
    ping_timeout: float = attrs.field(default=2.0, validator=_seconds("ping_timeout"))
    failures_to_down: int = attrs.field(default=3, validator=int_in(1, 100))
    suspect_interval: float = attrs.field(default=0.5, validator=_seconds("suspect_interval"))
    reconnect_initial: float = attrs.field(default=1.0, validator=_seconds("reconnect_initial"))
    reconnect_max: float = attrs.field(default=30.0, validator=_seconds("reconnect_max"))
    reconnect_multiplier: float = attrs.field(default=1.6)
    reconnect_jitter: float = attrs.field(default=0.2)
    # Node selection
    node_selection_timeout: float = attrs.field(
        default=2.0, validator=_seconds("node_selection_timeout")
    )
    load_balancing: str = attrs.field(default="round_robin")
    slow_start: float = attrs.field(default=5.0)
    discover_members: bool = attrs.field(default=True, validator=boolean)
    random_seed: int | None = attrs.field(default=None)
    # Retries
    max_retries: int = attrs.field(default=3, validator=int_in(0, 100))
    retry_initial_backoff: float = attrs.field(
        default=0.1, validator=_seconds("retry_initial_backoff")
    )
    retry_max_backoff: float = attrs.field(default=5.0, validator=_seconds("retry_max_backoff"))
    retry_multiplier: float = attrs.field(default=2.0)
    retry_jitter: str = attrs.field(default="proportional")
    retry_jitter_factor: float = attrs.field(default=0.1)
    min_attempt_time: float = attrs.field(default=0.01, validator=_seconds("min_attempt_time"))
    retry_budget_ratio: float = attrs.field(default=0.2)
    retry_budget_min_per_second: float = attrs.field(default=10.0)
    retry_budget_window: float = attrs.field(
        default=10.0, validator=_seconds("retry_budget_window")
    )
    idempotency_keys: bool = attrs.field(default=True, validator=boolean)
    # Circuit breakers (per node)
    breaker_failure_threshold: int = attrs.field(default=5, validator=int_in(1, 10**6))
    breaker_success_threshold: int = attrs.field(default=2, validator=int_in(1, 10**6))
    breaker_open_timeout: float = attrs.field(
        default=30.0, validator=_seconds("breaker_open_timeout")
    )
    breaker_half_open_probes: int = attrs.field(default=1, validator=int_in(1, 10**6))
    # Bulkheads
    max_concurrent_requests: int = attrs.field(default=10_000, validator=int_in(1, 10**7))
    # Attempt timeouts and membership (gray failures: stalled nodes, departed members)
    attempt_timeout_factor: float = attrs.field(default=3.0)
    attempt_timeout_min: float = attrs.field(
        default=0.25, validator=_seconds("attempt_timeout_min")
    )
    max_members: int = attrs.field(default=64, validator=int_in(1, 10_000))
    # Observability
    listeners: tuple[Any, ...] = attrs.field(default=(), converter=_listeners, eq=False, repr=False)
    forget_members_after: float = attrs.field(
        default=60.0, validator=_seconds("forget_members_after")
    )

    def __attrs_post_init__(self) -> None:
        if self.min_connections > self.max_connections:
            raise ConfigError(
                f"min_connections ({self.min_connections}) exceeds"
                f" max_connections ({self.max_connections})"
            )
        if self.reconnect_max < self.reconnect_initial:
            raise ConfigError("reconnect_max must not be below reconnect_initial")
        _check_number("reconnect_multiplier", self.reconnect_multiplier, 1, 10)
        _check_number("reconnect_jitter", self.reconnect_jitter, 0, 0.999)
        if self.load_balancing not in LOAD_BALANCING:
            raise ConfigError(
                f"load_balancing must be one of {sorted(LOAD_BALANCING)},"
                f" not {_show(self.load_balancing)}"
            )
        if isinstance(self.slow_start, bool) or not (
            isinstance(self.slow_start, (int, float)) and 0 <= self.slow_start <= MAX_SECONDS
        ):
            raise ConfigError(
                "slow_start must be a non-negative number of seconds, at most"
                f" {MAX_SECONDS}, not {_show(self.slow_start)}"
            )
        _check_number("attempt_timeout_factor", self.attempt_timeout_factor, 0, 1000)
        _check_number("retry_multiplier", self.retry_multiplier, 1, 10)
        _check_number("retry_jitter_factor", self.retry_jitter_factor, 0, 0.999)
        _check_number("retry_budget_ratio", self.retry_budget_ratio, 0, 100)
        _check_number("retry_budget_min_per_second", self.retry_budget_min_per_second, 0, 10**6)
        if self.retry_jitter not in JITTER_MODES:
            raise ConfigError(
                f"retry_jitter must be one of {sorted(JITTER_MODES)},"
                f" not {_show(self.retry_jitter)}"
            )
        if self.retry_max_backoff < self.retry_initial_backoff:
            raise ConfigError("retry_max_backoff must not be below retry_initial_backoff")
        if self.random_seed is not None and (
            isinstance(self.random_seed, bool) or not isinstance(self.random_seed, int)
        ):
            raise ConfigError(
                f"random_seed must be an integer or None, not {_show(self.random_seed)}"
            )

    @classmethod
    def from_options(cls, hosts: Any, **options: Any) -> ClientConfig:
        """Build a config from keyword options; an unknown option is a ConfigError."""
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown}; known options: {sorted(known - {'hosts'})}"
            )
        return cls(hosts=hosts, **options)


assert HEADER_SIZE < 4096  # max_frame_size's lower bound leaves room for any header
