"""``qdb://`` URIs and comma-separated host lists: the syntax only (pure, no trio).

::

    qdb://[user[:password]@]host1[:port][,host2[:port]...][/][?option=value[&option=value...]]

- The scheme is ``qdb`` (any case). A QDB URI has no path: at most one
  ``/`` may follow the hosts, and options come after ``?``.
- ``user`` and ``password`` are percent-decoded (``%40`` is ``@``, ``%3A``
  is ``:``, ``%25`` is ``%``). The user info ends at the last ``@`` before
  the ``?``, and the password at nothing: a raw ``@``, ``:`` or ``/`` in it
  still parses, a raw ``?`` cannot (encode it as ``%3F``). A ``%`` must
  start a ``%XX`` escape.
- Hosts are separated by commas; whitespace around each is ignored. A host
  without a port gets :data:`DEFAULT_PORT` (7000); an IPv6 host is
  bracketed (``[::1]`` or ``[::1]:7001``). An empty entry, a bad port or a
  host listed twice is an error.
- Options are ``name=value`` pairs separated by ``&``, both percent-decoded
  (``+`` is a plus sign, not a space); whitespace around names and values is
  ignored, empty pairs (``?&a=1&``) are skipped, a name given twice is an
  error. What the names mean and how values are typed is
  :meth:`qdb_client.ClientConfig.from_uri`'s business, not this module's.
- An ``@`` after the ``?`` must be encoded as ``%40``: a raw one is refused,
  because it is what a password holding a raw ``?`` looks like.

Every error is a :class:`~qdb_client.errors.ConfigError`, and no message
ever quotes the password (nor the text before the ``@``, which may hold it).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

import attrs

from .errors import ConfigError
from .validation import _show, parse_address

__all__ = [
    "DEFAULT_PORT",
    "SCHEME",
    "QdbUri",
    "Secret",
    "is_uri",
    "parse_uri",
    "split_hosts",
]

#: Port of a URI host that names none.
DEFAULT_PORT = 7000
#: The scheme of a QDB URI.
SCHEME = "qdb"

#: A ``%`` that does not start a ``%XX`` escape.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: A scheme shown in an error message: short and plainly a scheme.
_SHOWABLE_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,19}")


class Secret:
    """A string that never shows itself: ``repr`` and ``str`` are ``***``.

    Holds passwords, so that a ``repr``, a log line or ``attrs.asdict`` of
    a config cannot reveal them. :meth:`reveal` returns the string.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise ConfigError(f"a password must be a string, not a {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The secret string itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return self._value == other._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))


def _secret_or_none(value: Any) -> Secret | None:
    if value is None or isinstance(value, Secret):
        return value
    return Secret(value)


@attrs.frozen(kw_only=True)
class QdbUri:
    """A parsed ``qdb://`` URI: hosts, optional user and password, raw options.

    ``hosts`` are ``host:port`` strings (default port filled in);
    ``options`` are ``(name, value)`` text pairs in the order given, both
    percent-decoded. ``password`` is a :class:`Secret` (None when the URI
    has none); it never appears in ``repr`` or in :meth:`redacted`.
    """

    hosts: tuple[str, ...]
    user: str | None = None
    password: Secret | None = attrs.field(default=None, converter=_secret_or_none, repr=False)
    options: tuple[tuple[str, str], ...] = ()

    def redacted(self) -> str:
        """The URI as text with the password replaced by ``***`` (safe to print or log)."""
        text = f"{SCHEME}://"
        if self.user is not None:
            text += urllib.parse.quote(self.user, safe="")
            if self.password is not None:
                text += ":***"
            text += "@"
        text += ",".join(self.hosts)
        if self.options:
            text += "/?" + "&".join(
                f"{urllib.parse.quote(name, safe='')}={urllib.parse.quote(value, safe='')}"
                for name, value in self.options
            )
        return text


def is_uri(text: Any) -> bool:
    """Whether ``text`` is meant as a URI (it holds ``://``), rather than a host list."""
    return isinstance(text, str) and "://" in text


def parse_uri(text: str) -> QdbUri:
    """Parse a ``qdb://`` URI (see the module docstring), or raise ConfigError saying why."""
    if not isinstance(text, str):
        raise ConfigError(f"a qdb URI must be a string, not {_show(text)}")
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError("not a qdb URI: it must start with 'qdb://'")
    if scheme.lower() != SCHEME:
        shown = repr(scheme) if _SHOWABLE_SCHEME.fullmatch(scheme) else "an unsupported one"
        raise ConfigError(f"the URI scheme is {shown}; a QDB URI starts with 'qdb://'")
    question = rest.find("?")
    if question < 0:
        question = len(rest)
    query = rest[question + 1 :] if question < len(rest) else None
    if query is not None and "@" in query:
        raise ConfigError(
            "the URI holds a raw '@' after its '?': encode an '@' in an option value as %40,"
            " and a '?' in a user name or password as %3F"
        )
    at = rest.rfind("@", 0, question)
    user: str | None = None
    password: str | None = None
    if at >= 0:
        user, password = _userinfo(rest[:at])
    hostpart = rest[at + 1 : question]
    host_list, _, path = hostpart.partition("/")
    if path.strip():
        raise ConfigError(
            f"a qdb URI has no path, but {_show('/' + path)} follows its hosts;"
            " write options after '?' (qdb://host:7000/?request_timeout=2)"
        )
    hosts = split_hosts(host_list, default_port=DEFAULT_PORT, what="the URI's host list")
    return QdbUri(hosts=hosts, user=user, password=password, options=_options(query))


def _userinfo(userinfo: str) -> tuple[str, str | None]:
    raw_user, colon, raw_password = userinfo.partition(":")
    if not raw_user:
        raise ConfigError("the URI has an '@' but no user name before it (qdb://user:pass@host)")
    user = _decode(raw_user, "the user name")
    password = _decode(raw_password, "the password") if colon else None
    return user, password


def _decode(text: str, what: str) -> str:
    """Percent-decode ``text`` strictly; messages never quote it (it may be a password)."""
    if _BAD_ESCAPE.search(text):
        raise ConfigError(
            f"{what} in the URI holds a '%' that does not start a %XX escape; write '%' as %25"
        )
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} in the URI is not UTF-8 once percent-decoded") from None


def _options(query: str | None) -> tuple[tuple[str, str], ...]:
    if query is None:
        return ()
    options: list[tuple[str, str]] = []
    seen: set[str] = set()
    for piece in query.split("&"):
        if not piece.strip():
            continue
        raw_name, eq, raw_value = piece.partition("=")
        name = _decode(raw_name.strip(), "an option name")
        if not name:
            raise ConfigError("a URI option has no name before its '=' (write name=value)")
        if not eq:
            raise ConfigError(f"the URI option {_show(name)} has no value (write {name}=VALUE)")
        if name in seen:
            raise ConfigError(f"the URI option {_show(name)} is given twice")
        seen.add(name)
        options.append((name, _decode(raw_value.strip(), f"the value of {name}")))
    return tuple(options)


def split_hosts(
    text: str, *, default_port: int | None = None, what: str = "the host list"
) -> tuple[str, ...]:
    """Split ``"h1:7000, h2:7001"`` into checked ``host:port`` strings.

    Whitespace around each entry is ignored. With ``default_port``, an
    entry without a port gets it (``"h1"`` -> ``"h1:7000"``, ``"[::1]"`` ->
    ``"[::1]:7000"``); without, every entry must name its port. An empty
    list or entry, an invalid address or a duplicate raises ConfigError.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string, not {_show(text)}")
    entries = text.split(",")
    if len(entries) == 1 and not entries[0].strip():
        raise ConfigError(f"{what} names no host (write host:port[,host:port...])")
    hosts: list[str] = []
    for number, raw in enumerate(entries, 1):
        entry = raw.strip()
        if not entry:
            raise ConfigError(
                f"{what} has an empty entry (number {number} of {len(entries)}): a stray comma?"
            )
        if "@" in entry:
            # Never echoed: it may be user:password@host written outside a URI.
            raise ConfigError(
                f"entry {number} of {what} holds an '@': user:password@ belongs in a qdb:// URI"
            )
        if default_port is not None:
            entry = _with_port(entry, default_port)
        elif ":" not in entry:
            raise ConfigError(
                f"address {_show(entry)} in {what} has no ':port'"
                f" (a qdb:// URI defaults the port to {DEFAULT_PORT})"
            )
        parse_address(entry)
        if entry in hosts:
            raise ConfigError(f"{what} lists the host {_show(entry)} twice")
        hosts.append(entry)
    return tuple(hosts)


def _with_port(entry: str, port: int) -> str:
    if entry.startswith("["):
        return f"{entry}:{port}" if entry.endswith("]") else entry
    return entry if ":" in entry else f"{entry}:{port}"
