"""Who the client is to the nodes: its credentials and its server-issued session.

One :class:`Authenticator` per client, shared by every connection to every
node (docs/protocol.md sections 7.3 and 7.4, docs/security.md):

- The first handshake logs in with the password (HELLO ``auth``). A node
  that requires credentials answers with a session id and a session token
  that stays valid for ``session_expires_ms``.
- Every later handshake, to any node of the cluster (reconnects, new pool
  connections, probes), sends the session id and the newest token instead of
  the password, and gets a new token back. :meth:`Authenticator.refresh_due`
  says when a client that opened no connection for half of the token's time
  to live should open one, just to renew it.
- A refused token (the session expired or was revoked) is dropped, and the
  same connection attempt logs in with the password again, if it was kept
  (``keep_password=True``, the default). With ``keep_password=False`` the
  password is forgotten as soon as the first token arrives: the client then
  lives on its session, and once that is gone only
  ``client.reauthenticate(...)`` brings it back.
- Logins with the password are single-flight: while one is under way, other
  connection attempts wait for its token (at most ``login_wait`` seconds)
  rather than sending the password too, so a client starting against N
  nodes sends its password once, not N times. A node that refused the
  password gets it from no other attempt (waiting or not) until the
  credentials change.
- Every handshake carries the :attr:`Authenticator.generation` of the
  credentials it was prepared with. After ``reauthenticate`` a late answer to
  an older handshake changes nothing: its token is ignored, its refusal is
  not a verdict on the new credentials, and its connection is not used.

Nothing here ever shows a password or a token: :meth:`snapshot` (what
``client.statistics()["session"]`` holds) has neither.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import attrs
import trio

from ..config import Credentials, Secret
from ..errors import AuthenticationFailed, server_error_from_wire
from ..protocol import Hello, Welcome

__all__ = ["Authenticator", "HelloAuth", "Login", "Retry"]

logger = logging.getLogger("qdb_client.connection")

#: Seconds a connection attempt waits for another one's password login.
LOGIN_WAIT = 1.0
#: Tokens valid for less than this many seconds are ignored.
MIN_TTL = 1.0


class Login(enum.Enum):
    """How one handshake proves who the client is."""

    #: No credentials configured: HELLO carries none.
    NONE = "none"
    #: HELLO ``session`` + ``session_token``, no password.
    TOKEN = "token"
    #: HELLO ``auth`` (and the session id, so a live session is kept).
    PASSWORD = "password"


class Retry(enum.Enum):
    """What a connection attempt does after its handshake was refused."""

    #: The refusal is final: raise it.
    NO = "no"
    #: A token was refused and the password is kept: log in with the password.
    PASSWORD = "password"
    #: The credentials changed since the handshake was prepared: start again
    #: with the new ones (this refusal says nothing about them).
    AFRESH = "afresh"


@attrs.frozen
class HelloAuth:
    """What one handshake sends, and whether it leads the single-flight login."""

    mode: Login
    credentials: dict[str, str] | None = attrs.field(default=None, repr=False)
    session: str | None = None
    token: str | None = attrs.field(default=None, repr=False)
    #: :attr:`Authenticator.generation` of the credentials this handshake carries.
    generation: int = 0
    #: Set when this handshake leads the single-flight login: its waiters wait on it.
    flight: trio.Event | None = attrs.field(default=None, repr=False, eq=False)

    @property
    def leader(self) -> bool:
        """Whether this handshake is the password login others wait for."""
        return self.flight is not None

    def apply(self, hello: Hello) -> Hello:
        """``hello`` carrying these credentials (and nothing of the others)."""
        return attrs.evolve(
            hello,
            credentials=self.credentials,
            resume_session=self.session,
            session_token=self.token,
        )


class Authenticator:
    """The client's credentials, session id and newest session token.

    Time is trio time; ``now`` is passed in by the callers.
    """

    def __init__(
        self,
        credentials: Credentials | None,
        *,
        keep_password: bool = True,
        login_wait: float = LOGIN_WAIT,
    ) -> None:
        self._keep_password = keep_password
        self.login_wait = login_wait
        self._user: str | None = None
        self._password: Secret | None = None
        self._set_credentials(credentials)
        #: Changes every time the credentials are replaced (``reauthenticate``).
        self.generation = 0
        #: The session this client belongs to (None: none issued yet).
        self.session_id: str | None = None
        self._token: Secret | None = None
        #: trio time the newest token expires / was issued, and its time to live.
        self.expires_at: float | None = None
        self.issued_at: float | None = None
        self.ttl: float | None = None
        self._login: trio.Event | None = None
        #: Address -> the node's refusal of this generation's password.
        self._refused: dict[str, AuthenticationFailed] = {}
        self._changed = trio.Event()
        self.password_logins = 0
        self.token_logins = 0
        self.token_refusals = 0
        self.resumed = 0
        self.refreshes = 0

    # ------------------------------------------------------------- state

    def _set_credentials(self, credentials: Credentials | None) -> None:
        self._user = None if credentials is None else credentials.user
        self._password = None if credentials is None else Secret(credentials.password)

    @property
    def user(self) -> str | None:
        """The configured user name (None without credentials)."""
        return self._user

    @property
    def has_credentials(self) -> bool:
        """Whether the client authenticates at all."""
        return self._user is not None

    @property
    def password_kept(self) -> bool:
        """Whether the password is still in memory (to log in again)."""
        return self._password is not None

    def token_valid(self, now: float) -> bool:
        """Whether the newest token may still be used, with a margin for the trip."""
        if self._token is None or self.expires_at is None or self.ttl is None:
            return False
        return self.expires_at - now > min(2.0, self.ttl / 10)

    def refresh_due(self) -> float | None:
        """trio time the token should be renewed (half its time to live), or None."""
        if self._token is None or self.issued_at is None or self.ttl is None:
            return None
        return self.issued_at + self.ttl / 2

    async def wait_changed(self) -> None:
        """Wait until a new token arrives or the credentials change."""
        await self._changed.wait()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --------------------------------------------------------- handshakes

    def fields(self, now: float, address: str, *, password: bool = False) -> HelloAuth:
        """What the next handshake to ``address`` sends (no waiting).

        ``password``: log in with the password even if a token is valid (the
        node just refused a token). Raises AuthenticationFailed when nothing
        is left to log in with, or when the login would send the password to
        a node that already refused it.
        """
        if self._user is None:
            return HelloAuth(Login.NONE, generation=self.generation)
        if not password and self._token is not None and self.token_valid(now):
            return HelloAuth(
                Login.TOKEN,
                session=self.session_id,
                token=self._token.reveal(),
                generation=self.generation,
            )
        if self._password is None:
            raise self._nothing_left()
        refusal = self._refused.get(address)
        if refusal is not None:
            raise _again(refusal)
        return HelloAuth(
            Login.PASSWORD,
            credentials={"user": self._user, "password": self._password.reveal()},
            session=self.session_id,
            generation=self.generation,
        )

    async def begin(self, address: str, *, password: bool = False) -> HelloAuth:
        """What the next handshake to ``address`` sends, waiting briefly for a
        password login already under way (its token may spare this one the
        password; its refusal by the same node ends this attempt too).

        Pair with :meth:`end`. Raises AuthenticationFailed as :meth:`fields`.
        """
        await trio.lowlevel.checkpoint()
        auth = self.fields(trio.current_time(), address, password=password)
        if auth.mode is Login.PASSWORD and self._login is not None:
            # At most half of what is left of the caller's connect deadline.
            now = trio.current_time()
            left = trio.current_effective_deadline() - now
            with trio.move_on_after(max(0.0, min(self.login_wait, left / 2))):
                await self._login.wait()
            auth = self.fields(trio.current_time(), address, password=password)
        if auth.mode is Login.PASSWORD and self._login is None:
            self._login = trio.Event()
            auth = attrs.evolve(auth, flight=self._login)
        return auth

    def end(self, auth: HelloAuth) -> None:
        """The handshake that :meth:`begin` prepared is over (whatever its outcome)."""
        if auth.flight is None:
            return
        auth.flight.set()
        if self._login is auth.flight:
            self._login = None

    def current(self, auth: HelloAuth) -> bool:
        """Whether ``auth`` carries the credentials in use (not ones replaced since)."""
        return auth.generation == self.generation

    def succeeded(self, auth: HelloAuth, welcome: Welcome, now: float) -> bool:
        """A handshake with ``auth`` was welcomed: keep its token if it is the newest.

        False when the credentials were replaced since the handshake was
        prepared: the connection is logged in as what the client no longer
        is, and must not be used (its token is ignored).
        """
        if not self.current(auth):
            logger.debug("a handshake with replaced credentials was welcomed: discarded")
            return False
        if auth.mode is Login.TOKEN:
            self.token_logins += 1
        elif auth.mode is Login.PASSWORD:
            self.password_logins += 1
        if auth.mode is Login.NONE or welcome.session_token is None:
            return True  # a node that keeps no sessions: the password it is, next time too
        ttl = (welcome.session_expires_ms or 0) / 1000
        if ttl < MIN_TTL:
            # A token that dies at once is no session (and must not be renewed in a loop).
            return True
        expires = now + ttl
        if self.expires_at is not None and expires < self.expires_at:
            return True  # a slower handshake: an earlier-started one brought a newer token
        if self.session_id is not None and welcome.session_id == self.session_id:
            self.resumed += 1
        elif self.session_id is not None:
            logger.info("session %s ended; now in session %s", self.session_id, welcome.session_id)
        self.session_id = welcome.session_id
        self._token = Secret(welcome.session_token)
        self.expires_at, self.issued_at, self.ttl = expires, now, ttl
        if not self._keep_password:
            self._password = None
        self._signal()
        return True

    def refused(self, auth: HelloAuth, address: str, error: AuthenticationFailed) -> Retry:
        """A handshake with ``auth`` to ``address`` was answered UNAUTHENTICATED
        (``error``): what the same connection attempt does next.

        A refused password is remembered for ``address`` until the credentials
        change, so no other attempt sends it there again.
        """
        if not self.current(auth):
            return Retry.AFRESH
        if auth.mode is Login.PASSWORD:
            self._refused.setdefault(address, error)
            return Retry.NO
        if auth.mode is not Login.TOKEN:
            return Retry.NO
        self.token_refusals += 1
        if self._token is not None and self._token.reveal() == auth.token:
            self._token = None  # the session is gone (or this token was revoked)
            self.expires_at = self.issued_at = self.ttl = None
        # The password, not a newer token: the node may not know this session at all.
        return Retry.PASSWORD if self._password is not None else Retry.NO

    def reset(self, credentials: Credentials | None) -> None:
        """New credentials (``reauthenticate``): the old session is left behind."""
        self._set_credentials(credentials)
        self.generation += 1
        self.session_id = None
        self._token = None
        self.expires_at = self.issued_at = self.ttl = None
        self._refused.clear()
        if self._login is not None:
            # Waiters for a login with the old credentials: its outcome is no use to them.
            self._login.set()
            self._login = None
        self._signal()

    def _nothing_left(self) -> AuthenticationFailed:
        error = server_error_from_wire(
            code=401,
            name="UNAUTHENTICATED",
            message=(
                "the session token expired and the password was not kept"
                " (keep_password=False): call client.reauthenticate(user, password)"
            ),
            retryable=False,
            details={"reason": "session"},
        )
        assert isinstance(error, AuthenticationFailed)
        return error

    # ------------------------------------------------------------ reporting

    def snapshot(self, now: float) -> dict[str, Any]:
        """``statistics()["session"]``: never the password nor a token."""
        return {
            "user": self._user,
            "session_id": self.session_id,
            "expires_in": None if self.expires_at is None else max(0.0, self.expires_at - now),
            "password_kept": self._password is not None,
            "password_logins": self.password_logins,
            "token_logins": self.token_logins,
            "token_refusals": self.token_refusals,
            "resumed": self.resumed,
            "refreshes": self.refreshes,
        }


def _again(error: AuthenticationFailed) -> AuthenticationFailed:
    """A fresh copy of a recorded refusal for one more attempt (the original as cause)."""
    fresh = error.__class__.__new__(error.__class__)
    fresh.__dict__.update(error.__dict__)
    fresh.args = error.args
    fresh.__cause__ = error
    return fresh
