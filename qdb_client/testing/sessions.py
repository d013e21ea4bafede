"""Server-issued sessions of a test node that requires credentials (docs/protocol.md 7.3, 7.4).

A WELCOME to an authenticated HELLO carries a new session token. Tokens
live in the table ``qdb_sessions`` of the cluster's shared SQLite file, so
any node of the cluster resumes a session that another one issued:

======================  ====================================================
``token_hash``          SHA-256 of the token (hex): the token itself is never stored
``session_id``          the session the token belongs to
``user``                the session's user
``expires_ms``          wall-clock expiry, milliseconds since the epoch
``mac``                 HMAC-SHA256, keyed by the user's password, of the four above
======================  ====================================================

The MAC binds a row to the node's credentials: a row written by anything
but a node that knows the user's password (client SQL that reached the
table, say) is ignored, a row's expiry can't be extended, and changing a
user's password revokes all of that user's sessions. Reading the table
reveals no usable token. Expired rows are purged a few at a time as tokens
are issued; a session keeps its newest :data:`MAX_TOKENS_PER_SESSION` tokens.

Time is wall-clock time (``clock``, default ``time.time``), because the
nodes sharing the file may be separate processes; tests may assign it.
Under a ``trio.testing.MockClock`` the statements run inline on the event
loop (as the node's storage does), else in a worker thread, one at a time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import trio
import trio.testing

from ..config import Secret
from ..protocol import Error, ErrorCode, Hello, Member, error_message
from .config import ServerConfig
from .handshake import (
    HelloAnswer,
    control_identity,
    password_user,
    unauthenticated,
    version_refusal,
    welcome_for,
)

if TYPE_CHECKING:
    from .storage import Storage

__all__ = ["MAX_TOKENS_PER_SESSION", "SCHEMA", "AuthCounters", "SessionStore", "answer"]

logger = logging.getLogger("qdb_client.testing")

T = TypeVar("T")

#: Valid tokens a session keeps (newest first); older ones are dropped.
MAX_TOKENS_PER_SESSION = 32
#: Expired rows deleted per token issued.
PURGE_LIMIT = 64
#: Longest session id / token accepted in a HELLO (longer: not ours).
MAX_SESSION_ID, MAX_TOKEN = 128, 256
_BUSY_TIMEOUT_MS = 5000

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS qdb_sessions ("
    " token_hash TEXT PRIMARY KEY,"
    " session_id TEXT NOT NULL,"
    " user TEXT NOT NULL,"
    " expires_ms INTEGER NOT NULL,"
    " mac TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS qdb_sessions_session ON qdb_sessions (session_id)",
    "CREATE INDEX IF NOT EXISTS qdb_sessions_expiry ON qdb_sessions (expires_ms)",
)


class AuthCounters:
    """What the node's handshakes did (``statistics()["auth"]``)."""

    def __init__(self) -> None:
        self.password_hellos = 0
        self.password_refused = 0
        self.token_hellos = 0
        self.token_refused = 0
        self.sessions_created = 0
        self.sessions_resumed = 0
        self.tokens_issued = 0
        self.store_errors = 0

    def snapshot(self) -> dict[str, int]:
        """A plain dict of the counters."""
        return dict(vars(self))


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _mac(password: str, token_hash: str, session_id: str, user: str, expires_ms: int) -> str:
    message = json.dumps(["qdb-session-v1", token_hash, session_id, user, expires_ms])
    return hmac.new(password.encode(), message.encode(), hashlib.sha256).hexdigest()


def _virtual_time() -> bool:
    return isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)


class SessionStore:
    """The ``qdb_sessions`` table of a node's database, on a connection of its own."""

    def __init__(self, storage: Storage, *, clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        #: Wall-clock source (seconds) of token expiries.
        self.clock = clock
        self._conn: sqlite3.Connection | None = None
        self._lock = trio.Lock()
        self._closed = False

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            if self._conn is None:
                if self._closed:
                    raise sqlite3.OperationalError("the session store is closed")
                await self._storage.open()
                self._conn = await self._in_thread(self._open_sync)
            conn = self._conn
            return await self._in_thread(lambda: fn(conn))

    @staticmethod
    async def _in_thread(fn: Callable[[], T]) -> T:
        if _virtual_time():
            await trio.lowlevel.checkpoint()
            return fn()
        return await trio.to_thread.run_sync(fn)

    def _open_sync(self) -> sqlite3.Connection:
        path = self._storage.path
        if path is None:
            raise sqlite3.OperationalError("the node's database is not open")
        conn = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            give_up = time.monotonic() + 10.0
            while True:
                try:
                    for statement in SCHEMA:
                        conn.execute(statement)
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > give_up:
                        raise
                    time.sleep(0.02)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        """Close the store's connection (idempotent)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------ operations

    async def issue(
        self, session_id: str, user: str, credentials: Mapping[str, Secret], ttl: float
    ) -> str:
        """A new token for ``session_id`` of ``user``, valid ``ttl`` seconds."""
        token = secrets.token_urlsafe(32)  # 256 random bits
        token_hash = _hash(token)
        now_ms = int(self.clock() * 1000)
        expires_ms = now_ms + int(ttl * 1000)
        mac = _mac(credentials[user].reveal(), token_hash, session_id, user, expires_ms)

        def store(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO qdb_sessions (token_hash, session_id, user, expires_ms, mac)"
                " VALUES (?, ?, ?, ?, ?)",
                (token_hash, session_id, user, expires_ms, mac),
            )
            conn.execute(
                "DELETE FROM qdb_sessions WHERE rowid IN"
                " (SELECT rowid FROM qdb_sessions WHERE expires_ms <= ? LIMIT ?)",
                (now_ms, PURGE_LIMIT),
            )
            conn.execute(
                "DELETE FROM qdb_sessions WHERE session_id = ? AND rowid NOT IN"
                " (SELECT rowid FROM qdb_sessions WHERE session_id = ?"
                " ORDER BY expires_ms DESC LIMIT ?)",
                (session_id, session_id, MAX_TOKENS_PER_SESSION),
            )

        await self._run(store)
        return token

    async def resume(
        self, session_id: str, token: str, credentials: Mapping[str, Secret]
    ) -> str | None:
        """The user of ``session_id`` if ``token`` is one of its valid tokens, else None."""
        if len(session_id) > MAX_SESSION_ID or len(token) > MAX_TOKEN:
            await trio.lowlevel.checkpoint()
            return None
        token_hash = _hash(token)
        row = await self._run(
            lambda conn: conn.execute(
                "SELECT session_id, user, expires_ms, mac FROM qdb_sessions WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
        )
        if row is None:
            return None
        stored_session, user, expires_ms, mac = row
        if not (
            isinstance(stored_session, str)
            and isinstance(user, str)
            and isinstance(expires_ms, int)
            and isinstance(mac, str)
        ):
            return None
        if not hmac.compare_digest(stored_session.encode(), session_id.encode()):
            return None
        if expires_ms <= int(self.clock() * 1000) or user not in credentials:
            return None
        expected = _mac(credentials[user].reveal(), token_hash, stored_session, user, expires_ms)
        return user if hmac.compare_digest(expected.encode(), mac.encode()) else None

    async def alive(self, session_id: str, user: str, credentials: Mapping[str, Secret]) -> bool:
        """Whether ``session_id`` is a live session of ``user`` (one valid token)."""
        if len(session_id) > MAX_SESSION_ID or user not in credentials:
            await trio.lowlevel.checkpoint()
            return False
        now_ms = int(self.clock() * 1000)
        rows = await self._run(
            lambda conn: conn.execute(
                "SELECT token_hash, expires_ms, mac FROM qdb_sessions"
                " WHERE session_id = ? AND user = ? AND expires_ms > ? LIMIT ?",
                (session_id, user, now_ms, MAX_TOKENS_PER_SESSION),
            ).fetchall()
        )
        password = credentials[user].reveal()
        return any(
            isinstance(token_hash, str)
            and isinstance(expires_ms, int)
            and isinstance(mac, str)
            and hmac.compare_digest(
                _mac(password, token_hash, session_id, user, expires_ms).encode(), mac.encode()
            )
            for token_hash, expires_ms, mac in rows
        )


async def answer(
    hello: Hello,
    config: ServerConfig,
    store: SessionStore,
    counters: AuthCounters,
    *,
    node_id: str,
    members: Callable[[], tuple[Member, ...]],
    control_token: str | None = None,
) -> HelloAnswer:
    """Answer ``hello`` on a node that requires credentials (docs/protocol.md 7.3).

    The control tool (``auth`` carrying ``control_token``, see
    :func:`~.handshake.control_identity`) is let in with the token alone, as
    no user (it may call ``control.*`` and ``ping`` only), or as the user its
    credentials prove; its handshakes are not counted.

    A valid session token resumes its session; else a right password logs in
    (keeping the HELLO's session when it is a live session of that user);
    else UNAUTHENTICATED, ``details.reason`` ``session`` when only a token
    came, ``credentials`` otherwise. A session store that fails answers
    UNAVAILABLE (retryable).
    """
    refusal = version_refusal(hello)
    if refusal is not None:
        return HelloAnswer(refusal)
    credentials = config.credentials
    assert credentials is not None
    control = control_identity(hello, config, control_token)
    if isinstance(control, Error):
        return HelloAnswer(control)
    auth: Mapping[str, Any] = hello.credentials or {}
    if control:
        counters = AuthCounters()  # the control tool's traffic is not counted (.stats)
        if "password" not in auth and not hello.session_token:  # the token alone: no user
            welcome = welcome_for(
                hello, config, node_id=node_id, members=members(), session_id=uuid.uuid4().hex
            )
            return HelloAnswer(welcome, control_client=True)
    session, token = hello.resume_session, hello.session_token
    with_token = bool(session and token)
    with_password = "password" in auth
    if with_password:
        counters.password_hellos += 1
    if with_token:
        counters.token_hellos += 1
    user: str | None = None
    session_id: str | None = None
    try:
        if with_token:
            assert session is not None and token is not None
            token_user = await store.resume(session, token, credentials)
            if token_user is not None and auth.get("user") in (None, token_user):
                user, session_id = token_user, session
                counters.sessions_resumed += 1
            else:
                counters.token_refused += 1
        if user is None:
            if not with_password:
                return HelloAnswer(unauthenticated("session" if with_token else "credentials"))
            user = password_user(credentials, hello)
            if user is None:
                counters.password_refused += 1
                return HelloAnswer(unauthenticated("credentials"))
            if session and await store.alive(session, user, credentials):
                session_id = session
                counters.sessions_resumed += 1
            else:
                session_id = uuid.uuid4().hex
                counters.sessions_created += 1
        assert session_id is not None
        new_token = await store.issue(session_id, user, credentials, config.session_ttl)
        counters.tokens_issued += 1
    except sqlite3.Error as exc:
        counters.store_errors += 1
        logger.warning("%s: session store failed: %s", node_id, exc)
        return HelloAnswer(
            error_message(0, ErrorCode.UNAVAILABLE, "the session store is unavailable: try again")
        )
    welcome = welcome_for(
        hello, config, node_id=node_id, members=members(), session_id=session_id, token=new_token
    )
    return HelloAnswer(welcome, user=user, control_client=control)
