"""``qdb ping``, ``qdb query``, ``qdb execute``, ``qdb stats``: one client, one job.

Each command builds its :class:`~qdb_client.ClientConfig` from HOSTS (a
``qdb://`` URI or ``host:port,host:port``; by default the environment), the
``-o NAME=VALUE`` options and ``--timeout``, then opens a client with
:func:`qdb_client.open_client` and prints what it got: a table, or JSON
with ``--json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import trio

from .. import open_client
from ..config import ClientConfig
from ..errors import QdbError
from ..results import ExecuteResult, QueryResult
from .common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    add_client_arguments,
    client_config,
    config_keywords,
    error_line,
    exit_code_for,
    parse_params,
)
from .render import Output

__all__ = ["add_parsers", "run_execute", "run_ping", "run_query", "run_stats"]


def add_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ping, query, execute and stats to the ``qdb`` subcommand parsers."""
    ping = commands.add_parser(
        "ping",
        parents=[common],
        help="PING every host; print each round trip",
        description="Connect to each host on its own (no member discovery) and PING it."
        " Exit 0 if every host answered, 3 if none could be reached, 1 if some did not answer.",
    )
    add_client_arguments(ping)
    ping.add_argument("--count", type=int, default=1, metavar="N", help="pings per host (1)")
    ping.set_defaults(run=run_ping)

    for name, what in (("query", "a read-only statement"), ("execute", "a statement that writes")):
        parser = commands.add_parser(
            name,
            parents=[common],
            help=f"run {what}; print its rows",
            description=f"Run {what} and print the result as a table."
            " SQL '-' reads the statement from stdin.",
        )
        add_client_arguments(parser)
        parser.add_argument("sql", metavar="SQL", help="the statement ('-' reads stdin)")
        parser.add_argument(
            "-p",
            "--param",
            action="append",
            default=[],
            metavar="VALUE",
            help="a parameter, repeatable: VALUE (positional, in order) or NAME=VALUE (named);"
            " JSON when it parses (42, true, null, '\"text\"'), else text",
        )
        parser.set_defaults(run=run_query if name == "query" else run_execute)

    stats = commands.add_parser(
        "stats",
        parents=[common],
        help="per-node statistics of a client connected to the cluster",
        description="Connect, send a few probe queries (so every node has a latency), and print"
        " each node's state, breaker, latency, connections and requests in flight."
        " --json prints the whole Client.statistics() snapshot.",
    )
    add_client_arguments(stats)
    stats.add_argument(
        "--probes",
        type=int,
        default=2,
        metavar="N",
        help="SELECT 1 probes per node before the snapshot (2; 0 for none)",
    )
    stats.add_argument(
        "--wait",
        type=float,
        default=1.0,
        metavar="S",
        help="longest wait for discovered nodes to connect (1.0 s)",
    )
    stats.set_defaults(run=run_stats)


# ---------------------------------------------------------------------- ping


def run_ping(ns: argparse.Namespace, out: Output) -> int:
    """``qdb ping``: each host on its own connection, ``--count`` PINGs each."""
    if ns.count < 1:
        raise CliError("--count must be at least 1", EXIT_USAGE)
    config = client_config(ns)
    results = trio.run(_ping_all, config, ns.count)
    if out.json_mode:
        out.json({"hosts": results})
    else:
        rows = []
        for r in results:
            rtts = r["rtt_ms"]
            status = "ok" if r["error"] is None else r["error"]["line"]
            if rtts:
                low, mean, high = min(rtts), sum(rtts) / len(rtts), max(rtts)
                rows.append(
                    [r["host"], r["node_id"], round(low, 3), round(mean, 3), round(high, 3)]
                )
            else:
                rows.append([r["host"], r["node_id"], None, None, None])
            rows[-1].append(status)
        out.table(["host", "node", "min ms", "avg ms", "max ms", "status"], rows)
    failed = [r for r in results if r["error"] is not None]
    if not failed:
        return EXIT_OK
    out.note(f"qdb: {len(failed)} of {len(results)} host(s) did not answer")
    if len(failed) == len(results):
        return int(failed[0]["error"]["exit_code"])
    return EXIT_FAILED


async def _ping_all(config: ClientConfig, count: int) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = [{} for _ in config.hosts]
    async with trio.open_nursery() as nursery:
        for i, host in enumerate(config.hosts):
            nursery.start_soon(_ping_one, config, host, count, results, i)
    return results


async def _ping_one(
    config: ClientConfig, host: str, count: int, results: list[dict[str, Any]], index: int
) -> None:
    result: dict[str, Any] = {"host": host, "node_id": None, "rtt_ms": [], "error": None}
    results[index] = result
    try:
        async with open_client(host, **config_keywords(config, discover_members=False)) as client:
            result["node_id"] = client.statistics()["nodes"][0]["node_id"]
            for _ in range(count):
                result["rtt_ms"].append(await client.ping() * 1000)
    except QdbError as exc:
        result["error"] = _error_record(exc)


def _error_record(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "line": error_line(exc),
        "exit_code": exit_code_for(exc),
    }


# ----------------------------------------------------------- query, execute


def _sql(ns: argparse.Namespace) -> str:
    if ns.sql == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise CliError("SQL '-' read an empty statement from stdin", EXIT_USAGE)
        return text
    return str(ns.sql)


def run_query(ns: argparse.Namespace, out: Output) -> int:
    """``qdb query``: rows of a read-only statement."""
    config = client_config(ns)
    sql, params = _sql(ns), parse_params(ns.param)

    async def call() -> QueryResult:
        async with open_client(config.hosts, **config_keywords(config)) as client:
            return await client.query(sql, params)

    result = trio.run(call)
    if out.json_mode:
        out.json({"columns": list(result.columns), "rows": [list(row) for row in result.rows]})
    else:
        _print_rows(out, result.columns, result.rows)
    return EXIT_OK


def run_execute(ns: argparse.Namespace, out: Output) -> int:
    """``qdb execute``: a statement that may write; its counts (and RETURNING rows)."""
    config = client_config(ns)
    sql, params = _sql(ns), parse_params(ns.param)

    async def call() -> ExecuteResult:
        async with open_client(config.hosts, **config_keywords(config)) as client:
            return await client.execute(sql, params)

    result = trio.run(call)
    if out.json_mode:
        out.json(
            {
                "rows_affected": result.rows_affected,
                "last_insert_id": result.last_insert_id,
                "columns": list(result.columns),
                "rows": [list(row) for row in result.rows],
            }
        )
        return EXIT_OK
    if result.columns:
        _print_rows(out, result.columns, result.rows)
    out.table(["rows affected", "last insert id"], [[result.rows_affected, result.last_insert_id]])
    return EXIT_OK


def _print_rows(out: Output, columns: Any, rows: Any) -> None:
    out.table(list(columns), [list(row) for row in rows], null="NULL")
    out.line(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")


# --------------------------------------------------------------------- stats

#: Columns of ``qdb stats`` (``_stats_row`` reads them from a node's statistics).
_STATS_COLUMNS = [
    "node",
    "id",
    "state",
    "breaker",
    "latency ms",
    "conns",
    "in flight",
    "sent",
    "failures",
]


def run_stats(ns: argparse.Namespace, out: Output) -> int:
    """``qdb stats``: a statistics snapshot of a client connected to the cluster."""
    if ns.probes < 0:
        raise CliError("--probes must not be negative", EXIT_USAGE)
    if not 0 <= ns.wait <= 60:
        raise CliError("--wait must be within 0..60 seconds", EXIT_USAGE)
    config = client_config(ns)
    snapshot = trio.run(_stats, config, ns.probes, ns.wait)
    if out.json_mode:
        out.json(snapshot)
        return EXIT_OK
    rows = [_stats_row(node) for node in snapshot["nodes"]]
    out.table(_STATS_COLUMNS, rows)
    out.line(
        f"{len(rows)} node(s); calls {snapshot['calls']}, retries {snapshot['retries']},"
        f" failures {snapshot['failures']}; balancing {snapshot['load_balancing']}"
    )
    return EXIT_OK


def _stats_row(node: dict[str, Any]) -> list[Any]:
    latency = node.get("reply_time")
    if latency is None:
        latency = node.get("last_ping_rtt")
    return [
        node["address"],
        node["node_id"],
        node["state"],
        node["breaker"]["current_state"],
        None if latency is None else round(latency * 1000, 3),
        node["connections"]["open"],
        node["in_flight"],
        node["requests_sent"],
        node["failures"],
    ]


async def _stats(config: ClientConfig, probes: int, wait: float) -> dict[str, Any]:
    async with open_client(config.hosts, **config_keywords(config)) as client:
        # Discovered members connect in the background: poll until they have.
        for _ in range(int(wait / 0.02)):
            if _settled(client.statistics()["nodes"]):
                break
            await trio.sleep(0.02)
        count = probes * len(client.statistics()["nodes"])
        for _ in range(count):
            try:
                await client.query("SELECT 1")
            except QdbError:
                pass  # counted in the statistics; the snapshot is the result
        return client.statistics()


def _settled(nodes: list[dict[str, Any]]) -> bool:
    """Every node connected, or known to be down."""
    return all(n["connections"]["open"] > 0 or n["state"] == "DOWN" for n in nodes)
