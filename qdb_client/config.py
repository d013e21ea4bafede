"""Configuration of the driver: attrs classes validated at construction.

A bad value raises :class:`~qdb_client.errors.ConfigError` naming the option
and what it accepts, before any connection is attempted.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import attrs

from ._options import (
    DEFAULT_FLOOR,
    FLOORS,
    JITTER_MODES,
    LOAD_BALANCING,
    Credentials,
    check_number,
    check_optional_hostname,
    check_tls,
    seconds_option,
    to_credentials,
    to_hosts,
    to_listeners,
)
from .errors import ConfigError
from .protocol.frames import HEADER_SIZE
from .uri import Secret, is_uri, parse_uri
from .validation import MAX_SECONDS, _show, boolean, int_in, parse_address, text

__all__ = [
    "DEFAULT_FLOOR",
    "ENV_HOSTS",
    "ENV_PASSWORD",
    "ENV_PREFIX",
    "ENV_URL",
    "ENV_USER",
    "FLOORS",
    "LOAD_BALANCING",
    "ClientConfig",
    "Credentials",
    "Secret",
    "option_from_text",
    "parse_address",
    "text_options",
]


@attrs.frozen(kw_only=True)
class ClientConfig:
    """Everything :func:`qdb_client.open_client` can be told.

    Every option, its default and the reference it follows is listed in
    docs/configuration.md. Times are in seconds.
    """

    hosts: tuple[str, ...] = attrs.field(converter=to_hosts)
    # Connections
    connect_timeout: float = attrs.field(default=5.0, validator=seconds_option("connect_timeout"))
    request_timeout: float = attrs.field(default=5.0, validator=seconds_option("request_timeout"))
    max_frame_size: int = attrs.field(default=1024 * 1024, validator=int_in(4096, 2**31 - 1))
    max_in_flight: int = attrs.field(default=256, validator=int_in(1, 65536))
    close_timeout: float = attrs.field(default=2.0, validator=seconds_option("close_timeout"))
    credentials: Credentials | None = attrs.field(default=None, converter=to_credentials)
    client_name: str = attrs.field(default="qdb_client", validator=text)
    # Trust: TLS, sessions, where credentials go (docs/security.md)
    tls: bool | ssl.SSLContext = attrs.field(default=False, validator=check_tls)
    tls_server_hostname: str | None = attrs.field(default=None, validator=check_optional_hostname)
    keep_password: bool = attrs.field(default=True, validator=boolean)
    trust_announced_members: bool = attrs.field(default=False, validator=boolean)
    # Per-node pools
    min_connections: int = attrs.field(default=1, validator=int_in(0, 1000))
    max_connections: int = attrs.field(default=8, validator=int_in(1, 1000))
    max_connecting: int = attrs.field(default=2, validator=int_in(1, 100))
    idle_timeout: float = attrs.field(default=60.0, validator=seconds_option("idle_timeout"))
    max_lifetime: float = attrs.field(default=1800.0, validator=seconds_option("max_lifetime"))
    pool_acquire_timeout: float = attrs.field(
        default=5.0, validator=seconds_option("pool_acquire_timeout")
    )
    max_waiters: int = attrs.field(default=1000, validator=int_in(0, 10**6))
    # Health checks and reconnection
    heartbeat_interval: float = attrs.field(
        default=5.0, validator=seconds_option("heartbeat_interval")
    )
    ping_timeout: float = attrs.field(default=2.0, validator=seconds_option("ping_timeout"))
    failures_to_down: int = attrs.field(default=3, validator=int_in(1, 100))
    suspect_interval: float = attrs.field(default=0.5, validator=seconds_option("suspect_interval"))
    reconnect_initial: float = attrs.field(
        default=1.0, validator=seconds_option("reconnect_initial")
    )
    reconnect_max: float = attrs.field(default=30.0, validator=seconds_option("reconnect_max"))
    reconnect_multiplier: float = attrs.field(default=1.6)
    reconnect_jitter: float = attrs.field(default=0.2)
    # Node selection
    node_selection_timeout: float = attrs.field(
        default=2.0, validator=seconds_option("node_selection_timeout")
    )
    load_balancing: str = attrs.field(default="round_robin")
    slow_start: float = attrs.field(default=5.0)
    discover_members: bool = attrs.field(default=True, validator=boolean)
    random_seed: int | None = attrs.field(default=None)
    # Retries
    max_retries: int = attrs.field(default=3, validator=int_in(0, 100))
    retry_initial_backoff: float = attrs.field(
        default=0.1, validator=seconds_option("retry_initial_backoff")
    )
    retry_max_backoff: float = attrs.field(
        default=5.0, validator=seconds_option("retry_max_backoff")
    )
    retry_multiplier: float = attrs.field(default=2.0)
    retry_jitter: str = attrs.field(default="proportional")
    retry_jitter_factor: float = attrs.field(default=0.1)
    min_attempt_time: float = attrs.field(
        default=0.01, validator=seconds_option("min_attempt_time")
    )
    retry_budget_ratio: float = attrs.field(default=0.2)
    retry_budget_min_per_second: float = attrs.field(default=10.0)
    retry_budget_window: float = attrs.field(
        default=10.0, validator=seconds_option("retry_budget_window")
    )
    idempotency_keys: bool = attrs.field(default=True, validator=boolean)
    # Circuit breakers (per node)
    breaker_failure_threshold: int = attrs.field(default=5, validator=int_in(1, 10**6))
    breaker_success_threshold: int = attrs.field(default=2, validator=int_in(1, 10**6))
    breaker_open_timeout: float = attrs.field(
        default=30.0, validator=seconds_option("breaker_open_timeout")
    )
    breaker_half_open_probes: int = attrs.field(default=1, validator=int_in(1, 10**6))
    # Bulkheads
    max_concurrent_requests: int = attrs.field(default=10_000, validator=int_in(1, 10**7))
    # Attempt timeouts and membership (gray failures: stalled nodes, departed members)
    attempt_timeout_factor: float = attrs.field(default=3.0)
    attempt_timeout_min: float = attrs.field(
        default=0.25, validator=seconds_option("attempt_timeout_min")
    )
    max_members: int = attrs.field(default=64, validator=int_in(1, 10_000))
    # Hedged reads (docs/resilience.md, "Hedged reads"): off unless hedge_delay is set
    hedge_delay: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(seconds_option("hedge_delay"))
    )
    max_hedges: int = attrs.field(default=1, validator=int_in(1, 8))
    # Observability
    listeners: tuple[Any, ...] = attrs.field(
        default=(), converter=to_listeners, eq=False, repr=False
    )
    forget_members_after: float = attrs.field(
        default=60.0, validator=seconds_option("forget_members_after")
    )
    # Result streams and subscriptions (docs/resilience.md, "Result streams")
    stream_page_rows: int = attrs.field(default=1000, validator=int_in(1, 100_000))
    stream_page_bytes: int = attrs.field(default=64 * 1024, validator=int_in(1024, 2**31 - 1))
    stream_credit: int = attrs.field(default=4, validator=int_in(1, 1024))
    stream_page_timeout: float = attrs.field(
        default=10.0, validator=seconds_option("stream_page_timeout")
    )
    stream_max_resumes: int = attrs.field(default=5, validator=int_in(0, 1000))
    subscription_credit: int = attrs.field(default=256, validator=int_in(1, 4096))

    def __attrs_post_init__(self) -> None:
        if self.min_connections > self.max_connections:
            raise ConfigError(
                f"min_connections ({self.min_connections}) exceeds"
                f" max_connections ({self.max_connections})"
            )
        if self.reconnect_max < self.reconnect_initial:
            raise ConfigError("reconnect_max must not be below reconnect_initial")
        check_number("reconnect_multiplier", self.reconnect_multiplier, 1, 10)
        check_number("reconnect_jitter", self.reconnect_jitter, 0, 0.999)
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
        check_number("attempt_timeout_factor", self.attempt_timeout_factor, 0, 1000)
        check_number("retry_multiplier", self.retry_multiplier, 1, 10)
        check_number("retry_jitter_factor", self.retry_jitter_factor, 0, 0.999)
        check_number("retry_budget_ratio", self.retry_budget_ratio, 0, 100)
        check_number("retry_budget_min_per_second", self.retry_budget_min_per_second, 0, 10**6)
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
        """Build a config from ``hosts`` and keyword options; an unknown option is a ConfigError.

        ``hosts`` is a list of ``"host:port"``, one string of them separated
        by commas (``"h1:7000,h2:7001"``), a ``qdb://`` URI (see
        :meth:`from_uri`), or None: then the environment names them (see
        :meth:`from_environment`). Keyword options override what a URI or
        the environment says.
        """
        _check_known(options)
        if hosts is None:
            return cls.from_environment(**options)
        if is_uri(hosts):
            return cls.from_uri(hosts, **options)
        return cls(hosts=hosts, **options)

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> ClientConfig:
        """Build a config from ``qdb://[user[:password]@]host[:port],.../?option=value&...``.

        Hosts without a port get 7000; user and password become
        ``credentials``; every option is a field of this class, its value
        parsed by the field's type (see :func:`option_from_text`). Keyword
        ``options`` override the URI's. Errors are ConfigError naming the
        option, and never quote the password. The grammar is in
        :mod:`qdb_client.uri`.
        """
        return cls._from_uri(uri, options, label="the URI")

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, **options: Any
    ) -> ClientConfig:
        """Build a config from environment variables (``os.environ`` unless ``environ``).

        ``QDB_URL``, when set, is the whole configuration (a ``qdb://`` URI).
        Otherwise ``QDB_HOSTS`` (``"h1:7000,h2:7001"``) names the hosts,
        ``QDB_USER`` and ``QDB_PASSWORD`` the credentials, and
        ``QDB_<OPTION>`` any option (``QDB_REQUEST_TIMEOUT=2``), parsed as
        in a URI. ``QDB_URL`` beside any of the others is a ConfigError
        rather than a guess at which one wins. A variable set to the empty
        string counts as unset; other ``QDB_*`` variables are ignored.
        Keyword ``options`` override the environment.
        """
        _check_known(options)
        env = os.environ if environ is None else environ
        url = env.get(ENV_URL, "")
        if url.strip():
            others = sorted(name for name in _env_names() if env.get(name, "").strip())
            if others:
                raise ConfigError(
                    f"{ENV_URL} is set, and so is {', '.join(others)}: set the options in the"
                    f" URL (?name=value), or unset {ENV_URL}"
                )
            return cls._from_uri(url, options, label=ENV_URL)
        hosts = env.get(ENV_HOSTS, "")
        if not hosts.strip():
            raise ConfigError(
                f"no hosts: pass hosts to open_client(), or set {ENV_URL}"
                f" (qdb://host:port,...) or {ENV_HOSTS} (host:port,...)"
            )
        if is_uri(hosts):
            raise ConfigError(f"{ENV_HOSTS} holds a URI; set it as {ENV_URL} instead")
        settings: dict[str, Any] = {}
        sources = {"hosts": ENV_HOSTS}
        for name in text_options():
            variable = ENV_PREFIX + name.upper()
            value = env.get(variable, "")
            if value.strip():
                settings[name] = option_from_text(name, value, source=variable)
                sources[name] = variable
        user, password = env.get(ENV_USER, ""), env.get(ENV_PASSWORD, "")
        if user.strip():
            settings["credentials"] = Credentials(user=user, password=password)
            sources["credentials"] = ENV_USER
        elif password:
            raise ConfigError(f"{ENV_PASSWORD} is set but {ENV_USER} is not")
        return _built(lambda: cls(hosts=hosts, **{**settings, **options}), sources, options)

    @classmethod
    def _from_uri(cls, uri: str, options: dict[str, Any], *, label: str) -> ClientConfig:
        _check_known(options)
        parsed = parse_uri(uri)
        settings: dict[str, Any] = {}
        sources = {"hosts": label}
        for name, value in parsed.options:
            if name not in _TEXT_OPTION_KINDS:
                _not_a_text_option(name, source=label)
            settings[name] = option_from_text(name, value, source=label)
            sources[name] = label
        if parsed.user is not None:
            password = parsed.password if parsed.password is not None else Secret("")
            settings["credentials"] = Credentials(user=parsed.user, password=password)
            sources["credentials"] = label
        return _built(lambda: cls(hosts=parsed.hosts, **{**settings, **options}), sources, options)


# --------------------------------------------------- options written as text
# URIs, environment variables and the command line give options as text;
# each is parsed by its field's type, then validated by ClientConfig itself.

#: Prefix of the environment variables read by ClientConfig.from_environment.
ENV_PREFIX = "QDB_"
#: A whole configuration as a ``qdb://`` URI.
ENV_URL = "QDB_URL"
#: Hosts, ``host:port,host:port`` (when QDB_URL is not set).
ENV_HOSTS = "QDB_HOSTS"
#: User name and password of the credentials (when QDB_URL is not set).
ENV_USER = "QDB_USER"
ENV_PASSWORD = "QDB_PASSWORD"

#: Fields text cannot set, and where they come from instead.
_NOT_TEXT_OPTIONS = {
    "hosts": "list the hosts after qdb:// (or in QDB_HOSTS)",
    "credentials": "write user:password@ before the hosts (or set QDB_USER and QDB_PASSWORD)",
    "listeners": "listeners are callables: pass listeners=[...] to open_client()",
}
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
_INTEGER = re.compile(r"[+-]?[0-9]{1,40}")
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


def _parse_float(name: str, text: str) -> float:
    if not _NUMBER.fullmatch(text):
        raise ConfigError(f"{name} must be a number, not {_show(text)}")
    return float(text)


def _parse_int(name: str, text: str) -> int:
    if not _INTEGER.fullmatch(text):
        raise ConfigError(f"{name} must be an integer, not {_show(text)}")
    return int(text)


def _parse_optional_int(name: str, text: str) -> int | None:
    return None if text.lower() == "none" else _parse_int(name, text)


def _parse_optional_float(name: str, text: str) -> float | None:
    return None if text.lower() == "none" else _parse_float(name, text)


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be true, false, 1 or 0, not {_show(text)}")


def _parse_str(name: str, text: str) -> str:
    return text


def _parse_optional_str(name: str, text: str) -> str | None:
    return None if text.lower() == "none" or not text else text


#: How the text of each annotation is parsed (``attrs.fields(...).type`` is
#: the annotation's text). A field whose type is missing here is not settable
#: from text; tests/unit/test_uri.py checks that every field is either here
#: or in _NOT_TEXT_OPTIONS.
_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "float": _parse_float,
    "float | None": _parse_optional_float,
    "int": _parse_int,
    "int | None": _parse_optional_int,
    "bool": _parse_bool,
    "str": _parse_str,
    "str | None": _parse_optional_str,
    # tls=true in a URI or QDB_TLS=1: the system's trusted certificate authorities
    # (an ssl.SSLContext can only be passed as a keyword).
    "bool | ssl.SSLContext": _parse_bool,
}
_TEXT_OPTION_KINDS: dict[str, str] = {
    field.name: str(field.type)
    for field in attrs.fields(ClientConfig)
    if field.name not in _NOT_TEXT_OPTIONS and str(field.type) in _PARSERS
}


def text_options() -> list[str]:
    """Names of the options a URI, an environment variable or the CLI can set, sorted."""
    return sorted(_TEXT_OPTION_KINDS)


def option_from_text(name: str, value: str, *, source: str = "text") -> Any:
    """The value of option ``name`` written as ``value``, parsed by the field's type.

    Numbers (``2``, ``0.5``, ``1e3``) for float fields, integers for int
    fields, ``true``/``false``/``1``/``0`` (any case) for booleans, the text
    itself for strings, ``none`` or an integer for ``random_seed``.
    Surrounding whitespace is ignored. Range checks are ClientConfig's, when
    it is built. A bad value or an unknown name is a ConfigError naming the
    option and ``source``.
    """
    kind = _TEXT_OPTION_KINDS.get(name)
    if kind is None:
        _not_a_text_option(name, source=source)
    try:
        return _PARSERS[kind](name, value.strip())
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from {source})") from None


def _not_a_text_option(name: str, *, source: str) -> NoReturn:
    if name in _NOT_TEXT_OPTIONS:
        raise ConfigError(
            f"{name} cannot be set as an option of {source}: {_NOT_TEXT_OPTIONS[name]}"
        )
    raise ConfigError(
        f"unknown option {_show(name)} in {source}; known options: {', '.join(text_options())}"
    )


def _env_names() -> list[str]:
    return [ENV_HOSTS, ENV_USER, ENV_PASSWORD, *(ENV_PREFIX + n.upper() for n in text_options())]


def _check_known(options: Mapping[str, Any]) -> None:
    known = {a.name for a in attrs.fields(ClientConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown}; known options: {sorted(known - {'hosts'})}"
        )


def _built(
    build: Callable[[], ClientConfig], sources: dict[str, str], overrides: Mapping[str, Any]
) -> ClientConfig:
    """``build()``, with a ConfigError about an option from text saying where it came from."""
    try:
        return build()
    except ConfigError as exc:
        message = str(exc)
        for name in sorted(sources, key=len, reverse=True):
            if name not in overrides and message.startswith(name):
                raise ConfigError(f"{message} (from {sources[name]})") from None
        raise


assert HEADER_SIZE < 4096  # max_frame_size's lower bound leaves room for any header
