"""Configuration of one test node: :class:`ServerConfig` and address helpers.

Every value is validated when the config is built; a bad value raises
:class:`qdb_client.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from ..config import Secret
from ..errors import ConfigError
from ..validation import boolean, int_in, parse_address, positive_seconds, text

__all__ = [
    "DEFAULT_SERVER_NAME",
    "ServerConfig",
    "format_address",
    "parse_address",
    "peer_node_id",
]

#: The ``server`` field of every WELCOME this package sends.
DEFAULT_SERVER_NAME = "qdb-test-node/0.1"

#: Smallest ``max_frame_size`` a node accepts (a WELCOME must fit).
MIN_FRAME_SIZE = 1024


def format_address(host: str, port: int) -> str:
    """Inverse of :func:`parse_address` (brackets an IPv6 host)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_node_id(address: str) -> str:
    """The node id a cluster member at ``address`` announces: ``node-<port>``."""
    return f"node-{parse_address(address)[1]}"


# ------------------------------------------------------------------ validators


def _optional_text(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None:
        text(instance, attribute, value)


def _to_peers(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, Iterable):
        raise ConfigError(f"peers must be a list of 'host:port', not {value!r}")
    peers = tuple(str(item).strip() if isinstance(item, str) else item for item in value)
    for peer in peers:
        parse_address(peer)
    return peers


def _to_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"path must be text or a path, not {value!r}")
    path = os.fspath(value)
    if not path:
        raise ConfigError("path must not be empty")
    return str(path)


def _to_credentials(value: Any) -> Mapping[str, Secret] | None:
    """User -> password, each password kept as a :class:`~qdb_client.config.Secret`
    (so neither ``repr`` nor ``attrs.asdict`` of the config shows it)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, (str, Secret)) for k, v in value.items()
    ):
        raise ConfigError("credentials must map user names (text) to passwords (text)")
    return {user: v if isinstance(v, Secret) else Secret(v) for user, v in value.items()}


def _optional_file(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not os.path.isfile(value):
        raise ConfigError(f"{attribute.name}: no such file: {value!r}")


def _optional_int_in(low: int, high: int) -> Any:
    check = int_in(low, high)

    def optional(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None:
            check(instance, attribute, value)

    return optional


def _session_ttl(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    positive_seconds(instance, attribute, value)
    if value < 1.0 or value > 7 * 24 * 3600:
        raise ConfigError(f"session_ttl must be within 1 s .. 7 days (604800 s), not {value!r}")


# ---------------------------------------------------------------------- config


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything one test node needs to know; immutable and validated.

    ``port=0`` binds an ephemeral port; the node id then defaults to
    ``node-<bound port>``. ``database=None`` gives the node a private
    temporary SQLite file; nodes of one cluster share a path. ``peers`` are
    the ``host:port`` addresses of the other members, announced in WELCOME;
    ``peers_file`` names a file of such addresses (one per line), re-read on
    every handshake, for clusters whose ports are only known after start.
    ``credentials`` (user -> password), when set, makes authentication
    mandatory: HELLO ``auth``, or a session token that a WELCOME issued
    (valid ``session_ttl`` seconds; docs/protocol.md 7.3, 7.4). ``tls_cert``
    (and ``tls_key``, unless the key is in the certificate file) makes the
    node speak TLS only; ``tls_client_ca`` also requires client
    certificates signed by that authority; a TLS handshake must complete
    within ``tls_handshake_timeout``. Control methods (``control.*``) exist
    only when ``test_mode``.
    ``idempotency_ttl`` is how long (seconds) the outcome of a write with an
    idempotency key is kept for replay. ``foreign_keys`` switches SQLite's
    foreign key enforcement on for every pooled connection (a ``PRAGMA`` sent
    through ``execute`` only lasts for its own request).
    ``transaction_idle_timeout`` is the default and cap (seconds) of how long
    a ``begin`` transaction may stay idle between requests before the node
    rolls it back; ``max_transactions`` bounds the transactions open on the
    node at once (each holds a SQLite connection of its own); ``max_prepared``
    bounds the prepared statements of one session (least recently used
    dropped).

    Limits against clients that misbehave (docs/security.md): a socket must
    complete its handshake within ``handshake_timeout`` (at most
    ``max_pending_handshakes`` at once: a newer one evicts the oldest);
    ``max_connections_per_address``
    bounds the connections of one client host; a write that blocks for
    ``write_timeout``, or replies beyond ``max_queued_reply_bytes`` waiting
    to be written, disconnect a client that does not read; no result is
    larger than ``max_result_size``, nor any string or blob a statement builds.
    """

    host: str = attrs.field(default="127.0.0.1", validator=text)
    port: int = attrs.field(default=0, validator=int_in(0, 65535))
    node_id: str | None = attrs.field(default=None, validator=_optional_text)
    database: str | None = attrs.field(default=None, converter=_to_path)
    peers: tuple[str, ...] = attrs.field(default=(), converter=_to_peers)
    peers_file: str | None = attrs.field(default=None, converter=_to_path)
    client_idle_timeout: float = attrs.field(default=30.0, validator=positive_seconds)
    max_connections: int = attrs.field(default=1000, validator=int_in(1, 1_000_000))
    request_timeout: float = attrs.field(default=5.0, validator=positive_seconds)
    max_frame_size: int = attrs.field(
        default=1024 * 1024, validator=int_in(MIN_FRAME_SIZE, 2**32 - 1)
    )
    max_in_flight: int = attrs.field(default=256, validator=int_in(1, 1_000_000))
    test_mode: bool = attrs.field(default=False, validator=boolean)
    credentials: Mapping[str, Secret] | None = attrs.field(
        default=None, converter=_to_credentials, eq=False, repr=False
    )
    session_ttl: float = attrs.field(default=900.0, validator=_session_ttl)
    tls_cert: str | None = attrs.field(default=None, converter=_to_path, validator=_optional_file)
    tls_key: str | None = attrs.field(default=None, converter=_to_path, validator=_optional_file)
    tls_client_ca: str | None = attrs.field(
        default=None, converter=_to_path, validator=_optional_file
    )
    tls_handshake_timeout: float = attrs.field(default=10.0, validator=positive_seconds)
    sqlite_pool_size: int = attrs.field(default=4, validator=int_in(1, 64))
    idempotency_ttl: float = attrs.field(default=3600.0, validator=positive_seconds)
    server_name: str = attrs.field(default=DEFAULT_SERVER_NAME, validator=text)
    foreign_keys: bool = attrs.field(default=False, validator=boolean)
    transaction_idle_timeout: float = attrs.field(default=30.0, validator=positive_seconds)
    max_transactions: int = attrs.field(default=64, validator=int_in(1, 10_000))
    max_prepared: int = attrs.field(default=256, validator=int_in(1, 100_000))
    #: Seconds a spooled result stream is kept after its last page or resume (section 12).
    stream_retention: float = attrs.field(default=300.0, validator=positive_seconds)
    #: Seconds the change log keeps a change for subscriptions (section 13).
    change_retention: float = attrs.field(default=3600.0, validator=positive_seconds)
    #: Seconds from accepting a socket until its handshake is done (TLS included, HELLO
    #: answered); then it is closed.
    handshake_timeout: float = attrs.field(default=5.0, validator=positive_seconds)
    #: Connections whose handshake is not done yet, at once; a new one beyond evicts the oldest.
    max_pending_handshakes: int = attrs.field(default=128, validator=int_in(1, 1_000_000))
    #: Open connections from one client address (host); None: no limit.
    max_connections_per_address: int | None = attrs.field(
        default=None, validator=_optional_int_in(1, 1_000_000)
    )
    #: Seconds one write to a client may block (it does not read); then it is disconnected.
    write_timeout: float = attrs.field(default=10.0, validator=positive_seconds)
    #: Bytes of replies waiting to be written on one connection; beyond, it is disconnected.
    max_queued_reply_bytes: int = attrs.field(
        default=16 * 1024 * 1024, validator=int_in(MIN_FRAME_SIZE, 2**40)
    )
    #: Largest result the node builds and largest string or blob a statement may make.
    max_result_size: int = attrs.field(
        default=16 * 1024 * 1024, validator=int_in(MIN_FRAME_SIZE, 2**31 - 1)
    )

    def __attrs_post_init__(self) -> None:
        if self.tls_cert is None and (self.tls_key is not None or self.tls_client_ca is not None):
            raise ConfigError("tls_key and tls_client_ca need tls_cert (the node's certificate)")

    @property
    def tls(self) -> bool:
        """Whether the node speaks TLS (only)."""
        return self.tls_cert is not None

    def evolve(self, **changes: Any) -> ServerConfig:
        """A copy with ``changes`` applied (and validated)."""
        return attrs.evolve(self, **changes)
