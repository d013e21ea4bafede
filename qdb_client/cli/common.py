"""What every ``qdb`` command shares: exit codes, errors, client options, parameters, JSON.

Exit codes (also in README.md, "Command line"):

====  ==================================================================
0     success
1     the operation failed: a QdbError (SQL error, server error, retries
      exhausted...), some hosts did not answer, a bench with failed
      requests, a cluster that did not start
2     usage or configuration error: bad arguments, ConfigError,
      InvalidArgument, a bad ``--param`` or ``-o`` option
3     no node reachable: NoAvailableNode, ConnectError, no cluster running
4     timed out: RequestTimeout, PoolTimeout
130   interrupted (Ctrl-C)
====  ==================================================================
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from ..config import ENV_HOSTS, ENV_URL, ClientConfig, option_from_text
from ..errors import (
    ConfigError,
    ConnectError,
    InvalidArgument,
    NoAvailableNode,
    PoolTimeout,
    RequestTimeout,
    RetryExhausted,
)

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "CliError",
    "add_client_arguments",
    "client_config",
    "client_options",
    "error_line",
    "exit_code_for",
    "jsonable",
    "parse_params",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """An error of the command line itself, with the exit code it means."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        #: The process exit status this error means.
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """The exit status an exception means (see the module docstring)."""
    if isinstance(exc, CliError):
        return exc.code
    if isinstance(exc, (ConfigError, InvalidArgument)):
        return EXIT_USAGE
    if isinstance(exc, (NoAvailableNode, ConnectError)):
        return EXIT_UNREACHABLE
    if isinstance(exc, (RequestTimeout, PoolTimeout)):
        return EXIT_TIMEOUT
    if isinstance(exc, RetryExhausted) and exc.last_error is not None:
        inner = exit_code_for(exc.last_error)
        return inner if inner in (EXIT_UNREACHABLE, EXIT_TIMEOUT) else EXIT_FAILED
    return EXIT_FAILED


def error_line(exc: BaseException) -> str:
    """One line naming the error's class and message: ``RequestTimeout: ...``."""
    message = " ".join(str(exc).split())
    if isinstance(exc, CliError):
        return message
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


# ------------------------------------------------------------- client options


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """HOSTS and the options of every command that connects to a cluster."""
    parser.add_argument(
        "hosts",
        nargs="?",
        metavar="HOSTS",
        help="qdb://[user[:password]@]host[:port],.../?option=value... or host:port,host:port"
        " (default: $QDB_URL, else $QDB_HOSTS and $QDB_<OPTION>)",
    )
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a ClientConfig option, as in a URI (-o request_timeout=2); repeatable;"
        " overrides HOSTS' options and the environment",
    )
    parser.add_argument(
        "--timeout",
        metavar="S",
        help="request timeout in seconds (the same as -o request_timeout=S)",
    )


def client_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The ``-o NAME=VALUE`` and ``--timeout`` options as typed ClientConfig keywords."""
    options: dict[str, Any] = {}
    for item in ns.option:
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise CliError(f"-o takes NAME=VALUE, not {item!r}", EXIT_USAGE)
        if name in options:
            raise CliError(f"-o {name} is given twice", EXIT_USAGE)
        options[name] = option_from_text(name, value, source=f"-o {name}")
    if ns.timeout is not None:
        options["request_timeout"] = option_from_text(
            "request_timeout", ns.timeout, source="--timeout"
        )
    return options


def client_config(ns: argparse.Namespace, **overrides: Any) -> ClientConfig:
    """The ClientConfig a command's HOSTS, ``-o`` options and the environment describe."""
    options = {**client_options(ns), **overrides}
    if ns.hosts is None and not any(os.environ.get(v, "").strip() for v in (ENV_URL, ENV_HOSTS)):
        raise CliError(
            f"no hosts: give HOSTS (qdb://host:port,... or host:port,...), or set {ENV_URL}"
            f" or {ENV_HOSTS}",
            EXIT_USAGE,
        )
    return ClientConfig.from_options(ns.hosts, **options)


def config_keywords(config: ClientConfig, **overrides: Any) -> dict[str, Any]:
    """``config`` as ``open_client`` keywords (all but hosts), with ``overrides``."""
    keywords = {f.name: getattr(config, f.name) for f in attrs.fields(ClientConfig)}
    del keywords["hosts"]
    keywords.update(overrides)
    return keywords


# --------------------------------------------------------------- parameters

_NAMED = re.compile(r"[:@$]?([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def _param_value(text: str) -> Any:
    """JSON if it parses (42, 1.5, true, null, "quoted"), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_params(values: Sequence[str]) -> list[Any] | dict[str, Any] | None:
    """``--param`` values as statement parameters.

    ``--param VALUE`` is positional (in order); ``--param NAME=VALUE`` (or
    ``:NAME=VALUE``) is named. A value is JSON when it parses as JSON
    (``42``, ``1.5``, ``true``, ``null``, ``'"quoted"'``), else text. To
    pass the text ``a=b`` positionally, quote it as JSON: ``'"a=b"'``.
    Positional and named parameters cannot be mixed (exit 2).
    """
    if not values:
        return None
    positional: list[Any] = []
    named: dict[str, Any] = {}
    for text in values:
        try:
            positional.append(json.loads(text))
            continue
        except ValueError:
            pass
        match = _NAMED.fullmatch(text)
        if match is None:
            positional.append(text)
            continue
        name = match[1]
        if name in named:
            raise CliError(f"--param {name} is given twice", EXIT_USAGE)
        named[name] = _param_value(match[2])
    if positional and named:
        raise CliError(
            "--param: use either positional values or NAME=VALUE pairs, not both", EXIT_USAGE
        )
    return named if named else positional


# ---------------------------------------------------------------------- JSON


def jsonable(value: Any) -> Any:
    """``value`` with everything JSON cannot hold made plain.

    Bytes become ``{"$bytes": "<base64>"}``, non-finite floats the strings
    ``"inf"``, ``"-inf"``, ``"nan"``, tuples and sets lists, mapping keys
    strings, anything else its ``str``.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(item) for item in value]
    if attrs.has(type(value)):
        return jsonable(attrs.asdict(value, recurse=False))
    return str(value)
