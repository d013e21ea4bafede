"""The ``qdb`` command line (also ``python -m qdb_client.cli``).

::

    qdb cluster start|stop|status [...]        a local test cluster in the background
    qdb ping    [HOSTS] [--count N]            PING every host
    qdb query   [HOSTS] SQL [--param V ...]    rows of a read-only statement
    qdb execute [HOSTS] SQL [--param V ...]    a statement that writes
    qdb stats   [HOSTS]                        per-node state, breaker, latency, connections
    qdb bench   [HOSTS] [--duration S] [--tasks N] [--read-ratio R]
    qdb proxy   ARGS...                        python -m qdb_client.testing proxy ARGS

HOSTS is a ``qdb://`` URI or ``host:port,host:port``; without it, the
environment (``QDB_URL``, else ``QDB_HOSTS`` and ``QDB_<OPTION>``). Every
command takes ``--json`` (results as JSON on stdout), ``--plain`` (no rich
rendering), ``--debug`` (a traceback with the error) and ``--log-level``.
An error is one line on stderr, ``qdb: <ErrorClass>: <message>``; the exit
status says what kind (:mod:`qdb_client.cli.common`: 0 ok, 1 failed, 2
usage or configuration, 3 no node reachable, 4 timed out, 130
interrupted).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from . import bench, client, cluster, processes
from .common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
    error_line,
    exit_code_for,
)
from .render import Output

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

#: Flags every command accepts, before or after its name (they take no value).
_GLOBAL_FLAGS = ("--json", "--plain", "--debug")


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--json`` and friends; subcommands get them with SUPPRESS so they don't reset them."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--json", action="store_true", default=default(False), help="results as JSON on stdout"
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        default=default(False),
        help="plain text tables and progress, even when rich is installed",
    )
    parser.add_argument(
        "--debug", action="store_true", default=default(False), help="show tracebacks of errors"
    )
    parser.add_argument(
        "--log-level",
        default=default(None),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log the driver's events at this level on stderr (default: no logs)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``qdb`` argument parser, every subcommand included."""
    parser = argparse.ArgumentParser(
        prog="qdb",
        description="Command line of qdb_client, the QDB driver: query a cluster, measure it,"
        " or run a local test cluster.",
        epilog="Exit status: 0 ok, 1 the operation failed, 2 usage or configuration error,"
        " 3 no node reachable, 4 timed out, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"qdb_client {__version__}")
    _global_options(parser, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cluster.add_parsers(commands, common)
    client.add_parsers(commands, common)
    bench.add_parsers(commands, common)
    return parser


def _first_command(args: Sequence[str]) -> int | None:
    """Index of the first argument that is not a global option (the command name)."""
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg == "--log-level":
            skip = True  # its value follows
        elif arg not in _GLOBAL_FLAGS and not arg.startswith("--log-level="):
            return i
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``qdb`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    first = _first_command(args)
    if first is not None and args[first] == "proxy":
        return processes.run_proxy(args[first + 1 :])
    parser = build_parser()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if ns.log_level:
        logging.basicConfig(
            level=ns.log_level, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
        )
    out = Output(json_mode=ns.json, plain=ns.plain)
    try:
        return int(ns.run(ns, out))
    except BaseException as exc:  # every error becomes one line and an exit status
        return _report(exc, ns, out)


def _report(exc: BaseException, ns: argparse.Namespace, out: Output) -> int:
    leaf = exc
    while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, KeyboardInterrupt):
        out.note("qdb: interrupted")
        return EXIT_INTERRUPTED
    if isinstance(leaf, BrokenPipeError):  # `qdb ... | head`: the reader left
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_FAILED
    if isinstance(leaf, SystemExit):
        return leaf.code if isinstance(leaf.code, int) else EXIT_FAILED
    if not isinstance(leaf, Exception):
        raise exc
    if ns.debug:
        traceback.print_exception(exc, file=out.stderr)
    code = exit_code_for(leaf)
    line = error_line(leaf)
    known = isinstance(leaf, CliError) or leaf.__class__.__module__.startswith("qdb_client")
    hint = "" if known or ns.debug else " (--debug shows the traceback)"
    out.note(f"qdb: {line}{hint}")
    if ns.json:
        out.json({"error": {"type": type(leaf).__name__, "message": str(leaf), "exit_code": code}})
    return code
