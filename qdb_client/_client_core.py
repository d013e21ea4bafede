"""What a :class:`~qdb_client.Client` runs on: the cluster and the request
pipeline built from its configuration, the client-wide bulkhead, idempotency
keys, and the login session the client keeps fresh.

:class:`ClientCore` holds them; ``Client`` (``_client.py``) adds the public
statement API on top. Every call goes through :meth:`ClientCore._call`,
which hands it to the request pipeline (``_request/``): deadlines, node
selection, breakers and retries live there.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import trio

from ._cluster import Cluster, ClusterSettings, HealthSettings, make_balancer
from ._policies import (
    AttemptTimeouts,
    Backoff,
    BreakerSettings,
    RetryBudget,
    RetryBudgetSettings,
    RetryPolicy,
)
from ._pool import PoolLimits
from ._request import Hedging, PipelineCounters, RequestPipeline, retry_backoff
from ._transaction import TransactionCounters
from ._transport import Connection, ConnectionListener
from ._transport.auth import Authenticator
from ._transport.establish import TlsSettings, establish
from ._version import __version__
from .config import ClientConfig, Credentials, parse_address
from .errors import (
    AuthenticationFailed,
    BulkheadFull,
    ClientClosed,
    InvalidArgument,
    NoAvailableNode,
    QdbError,
    RequestTimeout,
)
from .events import EventBus
from .metrics import ReliabilityMetrics
from .protocol import PROTOCOL_VERSIONS, Hello, encode_body
from .validation import seconds_or_error

__all__ = ["ClientCore"]

logger = logging.getLogger("qdb_client.connection")

#: Idempotency keys: 1..128 characters of this set (docs/protocol.md).
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-:.]{1,128}")


class ClientCore:
    """The machinery of :class:`~qdb_client.Client` (see the module docstring)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._rng = random.Random(config.random_seed)
        # Credentials and session tokens are added per handshake by the
        # authenticator (docs/protocol.md 7.3, 7.4); one per client, not per node.
        self._hello = Hello(
            versions=PROTOCOL_VERSIONS,
            client_name=config.client_name,
            client_version=__version__,
            max_frame_size=config.max_frame_size,
        )
        self._auth = Authenticator(config.credentials, keep_password=config.keep_password)
        self._tls = _tls_settings(config)
        self._nursery: trio.Nursery | None = None
        self._cluster: Cluster | None = None
        self._pipeline: RequestPipeline | None = None
        self._closed = False
        self._active = 0
        self._bulkhead_rejections = 0
        #: Where the driver's events go: ``config.listeners`` and the
        #: ``qdb_client`` loggers (see :mod:`qdb_client.events`).
        self.events = EventBus(config.listeners)
        #: Seed 003's reliability counters and rates (``statistics()["reliability"]``).
        self._reliability = ReliabilityMetrics()
        #: How transactions ended (``statistics()["transactions"]``).
        self._transactions = TransactionCounters()

    async def aclose(self) -> None:
        """Close every connection and stop every background task."""
        self._closed = True
        if self._cluster is not None:
            with trio.move_on_after(self.config.close_timeout, shield=True):
                await self._cluster.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------ sessions

    async def reauthenticate(
        self, user: str, password: str, *, timeout: float | None = None
    ) -> None:
        """Log in again with new credentials, after a refusal or a password change.

        The client forgets its session and every AUTH_FAILED mark, then logs in
        with ``user`` and ``password`` on one node now (within ``timeout``,
        default ``request_timeout``) and raises AuthenticationFailed at once if
        that node refuses them. Nodes refused earlier are tried again in the
        background, each once. Connections already open keep working; when
        the user changes they are retired (drained), so that later requests
        run as the new user. A wrong type is a ConfigError; nothing is sent.
        """
        credentials = Credentials(user=user, password=password)
        budget = self._budget(timeout)
        cluster = self._require_cluster()
        previous = self._auth.user
        self._auth.reset(credentials)
        self._update_trust()
        cluster.clear_auth_failures()
        if previous is not None and previous != user:
            for node in cluster.nodes:
                for connection in node.pool.connections():
                    node.pool.retire(connection)
        errors: dict[str, BaseException] = {}
        try:
            with trio.fail_after(budget):
                for node in sorted(cluster.nodes, key=lambda n: n.state.value != "UP"):
                    try:
                        connection = await cluster.connect(node.address)
                    except AuthenticationFailed:
                        raise
                    except QdbError as exc:
                        errors[node.address] = exc
                        continue
                    await connection.aclose()
                    for other in cluster.nodes:
                        other.pool.warm()
                    return
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"reauthenticate did not complete within {budget:g} s", timeout=budget
            ) from exc
        raise NoAvailableNode({a: str(e) for a, e in errors.items()}, errors)

    async def refresh_session(self, *, timeout: float | None = None) -> None:
        """Renew the session token now (the client does it by itself when half of
        its time to live has passed): one handshake with the current token on a
        new connection to a usable node, which is then closed.

        Without credentials, or on nodes that issue no tokens, it only checkpoints.
        """
        if not self._auth.has_credentials:
            await trio.lowlevel.checkpoint()
            return
        budget = self._budget(timeout)
        cluster = self._require_cluster()
        try:
            with trio.fail_after(budget):
                node = await cluster.select()
                connection = await cluster.connect(node.address)
                await connection.aclose()
        except trio.TooSlowError as exc:
            raise RequestTimeout(
                f"refresh_session did not complete within {budget:g} s", timeout=budget
            ) from exc
        self._auth.refreshes += 1

    def _reliability_totals(self) -> dict[str, int]:
        """The counters the reliability summary samples (see :mod:`qdb_client.metrics`)."""
        return self._reliability.totals(
            self._pipeline.counters if self._pipeline else PipelineCounters(),
            bulkhead_rejections=self._bulkhead_rejections,
            breakers=[] if self._cluster is None else [n.breaker for n in self._cluster.nodes],
        )

    # -------------------------------------------------------------- pipeline

    async def _start(self, nursery: trio.Nursery) -> None:
        config = self.config
        self._nursery = nursery
        settings = ClusterSettings(
            pool=PoolLimits(
                min_connections=config.min_connections,
                max_connections=config.max_connections,
                max_connecting=config.max_connecting,
                idle_timeout=config.idle_timeout,
                max_lifetime=config.max_lifetime,
            ),
            health=HealthSettings(
                heartbeat_interval=config.heartbeat_interval,
                suspect_interval=config.suspect_interval,
                ping_timeout=config.ping_timeout,
                failures_to_down=config.failures_to_down,
                reconnect=Backoff(
                    initial=config.reconnect_initial,
                    maximum=config.reconnect_max,
                    multiplier=config.reconnect_multiplier,
                    factor=config.reconnect_jitter,
                ),
            ),
            acquire_timeout=config.pool_acquire_timeout,
            max_waiters=config.max_waiters,
            selection_timeout=config.node_selection_timeout,
            # A margin past connect_timeout, so a hanging connect is reported
            # as its own ConnectTimeout rather than as the wait for it.
            startup_timeout=config.connect_timeout + 1.0,
            discover_members=config.discover_members,
            max_members=config.max_members,
            forget_after=config.forget_members_after,
            trusted_hosts=self._trusted_hosts(),
            breaker=BreakerSettings(
                failure_threshold=config.breaker_failure_threshold,
                success_threshold=config.breaker_success_threshold,
                open_timeout=config.breaker_open_timeout,
                half_open_probes=config.breaker_half_open_probes,
            ),
        )
        balancer = make_balancer(config.load_balancing, self._rng, slow_start=config.slow_start)
        self._cluster = Cluster(
            settings,
            connect=self._connect,
            nursery=nursery,
            balancer=balancer,
            rng=self._rng,
            events=self.events,
        )
        budget_settings = RetryBudgetSettings(
            ratio=config.retry_budget_ratio,
            min_per_second=config.retry_budget_min_per_second,
            ttl=config.retry_budget_window,
        )
        self._pipeline = RequestPipeline(
            self._cluster,
            policy=RetryPolicy(
                max_retries=config.max_retries,
                backoff=retry_backoff(config),
                min_attempt_time=config.min_attempt_time,
            ),
            budget=RetryBudget(budget_settings),
            rng=self._rng,
            attempt_timeouts=AttemptTimeouts(
                factor=config.attempt_timeout_factor, minimum=config.attempt_timeout_min
            ),
            events=self.events,
            hedging=None
            if config.hedge_delay is None
            else Hedging(config.hedge_delay, config.max_hedges, budget_settings),
        )
        nursery.start_soon(self._pipeline.expiries.run)
        nursery.start_soon(self._reliability.run, self._reliability_totals)
        await self._cluster.start(config.hosts)
        nursery.start_soon(self._refresh_sessions)

    def _trusted_hosts(self) -> frozenset[str] | None:
        """Hosts announced members must be on to get the credentials (None: any)."""
        if self.config.trust_announced_members or not self._auth.has_credentials:
            return None
        return frozenset(parse_address(address)[0].lower() for address in self.config.hosts)

    def _update_trust(self) -> None:
        cluster = self._require_cluster()
        cluster.settings = attrs.evolve(cluster.settings, trusted_hosts=self._trusted_hosts())
        cluster.enforce_member_trust()

    async def _refresh_sessions(self) -> None:
        """Background task: renew the session token at half its time to live, so
        that reconnects never need the password (and work that outlasts a token,
        seed 002's TC10, never meets an expired one)."""
        auth = self._auth
        last = -math.inf
        while True:
            due = auth.refresh_due()
            if due is None or trio.current_time() < max(due, last + 1.0):
                # (At most one renewal a second, whatever a node's time to live.)
                wake = math.inf if due is None else max(due, last + 1.0)
                with trio.move_on_at(wake):
                    await auth.wait_changed()
                continue
            last = trio.current_time()
            try:
                await self.refresh_session()
            except QdbError as exc:
                logger.info("session refresh failed (will try again): %s", exc)
            if auth.refresh_due() == due:  # nothing new came: don't spin
                left = (auth.expires_at or 0.0) - trio.current_time()
                with trio.move_on_after(max(1.0, min(30.0, left / 4))):
                    await auth.wait_changed()

    async def _connect(self, address: str, listener: ConnectionListener | None) -> Connection:
        assert self._nursery is not None
        return await establish(
            address,
            nursery=self._nursery,
            hello=self._hello,
            connect_timeout=self.config.connect_timeout,
            max_frame_size=self.config.max_frame_size,
            max_in_flight=self.config.max_in_flight,
            listener=listener,
            tls=self._tls,
            auth=self._auth,
        )

    def _require_cluster(self) -> Cluster:
        if self._closed or self._cluster is None:
            raise ClientClosed("the client is closed")
        return self._cluster

    def _budget(self, timeout: float | None) -> float:
        if timeout is None:
            return self.config.request_timeout
        return seconds_or_error(timeout, name="timeout", error=InvalidArgument, minimum=0.0)

    async def _call(
        self,
        method: str,
        args: dict[str, Any],
        timeout: float | None,
        *,
        read_only: bool = False,
        idempotency_key: str | bool = False,
        parse: Callable[[Any], Any] | None = None,
    ) -> Any:
        budget = self._budget(timeout)
        self._require_cluster()
        assert self._pipeline is not None
        key = self._key(idempotency_key) if not read_only else None
        if self._active >= self.config.max_concurrent_requests:
            await self._refuse()
        self._active += 1  # _admit, inline: a place in the bulkhead, given back below
        try:
            return await self._pipeline.call(
                method,
                args,
                budget_seconds=budget,
                read_only=read_only,
                idempotency_key=key,
                parse=parse,
            )
        finally:
            self._active -= 1

    async def _admit(self) -> None:
        """Take a place in the client-wide bulkhead (give it back: ``_active -= 1``),
        or raise BulkheadFull (a checkpoint either way is the caller's)."""
        if self._active >= self.config.max_concurrent_requests:
            await self._refuse()
        self._active += 1

    async def _refuse(self) -> None:
        """Raise BulkheadFull: the client-wide bulkhead is full (after a checkpoint)."""
        self._bulkhead_rejections += 1
        await trio.lowlevel.checkpoint()
        raise BulkheadFull(
            f"{self._active} calls already in progress"
            f" (max_concurrent_requests={self.config.max_concurrent_requests})"
        )

    def _fits(self, args: dict[str, Any]) -> bool:
        """Whether a request with ``args`` fits one frame (with room to spare)."""
        try:
            size = len(encode_body(args))
        except QdbError:
            return True  # let the send say what is wrong with it
        return size + 512 < self._frame_limit()

    def _frame_limit(self) -> int:
        """The largest request frame every connected node accepts (WELCOME's
        ``max_frame``), at most our own limit."""
        limit = self.config.max_frame_size
        for node in [] if self._cluster is None else self._cluster.nodes:
            connection = node.pool.any_connection()
            if connection is not None and connection.welcome is not None:
                limit = min(limit, connection.welcome.max_frame_size or limit)
        return limit

    @staticmethod
    def _fresh_key() -> str:
        """A new idempotency key (commits carry one even with ``idempotency_keys=False``):
        128 random bits, as a UUID4's hex has (less its 6 fixed bits), without
        building the UUID."""
        return f"qdb-{os.urandom(16).hex()}"

    def _key(self, choice: str | bool) -> str | None:
        if choice is True:
            return self._fresh_key() if self.config.idempotency_keys else None
        if choice is False or choice is None:
            return None
        if not isinstance(choice, str) or not _KEY_PATTERN.fullmatch(choice):
            raise InvalidArgument(
                "idempotency_key must be 1..128 characters from A-Z a-z 0-9 _ - : and ."
                f", True (generate one) or False (none), not {choice!r}"
            )
        return choice


def _tls_settings(config: ClientConfig) -> TlsSettings | None:
    """TLS for every connection: ``tls=True`` trusts the system's certificate
    authorities and checks host names (``ssl.create_default_context()``)."""
    if config.tls is False:
        return None
    context = ssl.create_default_context() if config.tls is True else config.tls
    return TlsSettings(context, config.tls_server_hostname)
