"""Command line and control port of the fault proxy: ``python -m qdb_client.testing proxy``.

::

    python -m qdb_client.testing proxy --listen 127.0.0.1:17000 --upstream 127.0.0.1:7000 \\
        [--map 127.0.0.1:17001=127.0.0.1:7001 ...] [--control 127.0.0.1:17100] [--seed N]

runs one :class:`~qdb_client.testing.proxy.FaultProxy` per pair and, once
every one listens, prints one line on stdout (logs go to stderr)::

    QDB-PROXY READY address=127.0.0.1:17000,127.0.0.1:17001 upstream=127.0.0.1:7000,... \\
        control=127.0.0.1:17100 pid=12345

(the pairs in order; ``control=none`` without ``--control``). SIGTERM or
SIGINT stop it (status 0); 1 if it could not start, 2 for a bad option.

**Control protocol.** TCP, one JSON object per line (UTF-8, at most 64 KiB)
each way, one reply per request, in order::

    {"op": "add", "proxy": "127.0.0.1:17000", "kind": "latency", "direction": "downstream",
     "toxicity": 1.0, "name": "slow", "attributes": {"latency": 100}}
                                  -> {"ok": true, "id": "slow", "toxic": {...}}
    {"op": "remove", "proxy": P, "id": "slow"}  -> {"ok": true}
    {"op": "clear", "proxy": P}                 -> {"ok": true, "removed": 1}
    {"op": "list", "proxy": P}                  -> {"ok": true, "proxies": {P: {"upstream": U,
                                                                          "toxics": [...]}}}
    {"op": "stats", "proxy": P}                 -> {"ok": true, "stats": {P: {...}}}

``proxy`` is a proxy's listen (or upstream) address, optional for ``add`` and
``remove`` when one proxy runs; omitted from ``clear``/``list``/``stats`` it means
every proxy. A bad request is answered ``{"ok": false, "error": "..."}`` and the
connection stays usable (an over-long line closes it). The client,
:class:`~qdb_client.testing.proxy_control.ProxyControl`, and the line framing
are in :mod:`qdb_client.testing.proxy_control`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import trio

from ..errors import ConfigError
from ._nursery import owned_nursery
from .config import format_address
from .proxy import FaultProxy, bind_listener, split_address
from .proxy_control import (
    MAX_LINE,
    Lines,
    LineTooLong,
    ProxyControl,
    ProxyControlError,
    open_proxy_control,
    send_message,
)

__all__ = [
    "MAX_LINE",
    "PROXY_READY_PATTERN",
    "ControlServer",
    "ProxyControl",
    "ProxyControlError",
    "build_parser",
    "handle_control_request",
    "main",
    "open_proxy_control",
    "run_proxies",
]

logger = logging.getLogger("qdb_client.testing")

#: Matches the readiness line; groups ``address``, ``upstream``, ``control`` and ``pid``.
PROXY_READY_PATTERN = re.compile(
    r"^QDB-PROXY READY address=(?P<address>\S+) upstream=(?P<upstream>\S+)"
    r" control=(?P<control>\S+) pid=(?P<pid>\d+)"
)
_TRANSPORT_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
_FIELDS = {
    "add": {"proxy", "kind", "direction", "toxicity", "name", "attributes"},
    "remove": {"proxy", "id"},
    "clear": {"proxy"},
    "list": {"proxy"},
    "stats": {"proxy"},
}


# ------------------------------------------------------------------ the server


def _select(proxies: Sequence[FaultProxy], name: Any) -> FaultProxy:
    for attribute in ("address", "upstream"):
        for proxy in proxies:
            if getattr(proxy, attribute) == name:
                return proxy
    known = ", ".join(p.address for p in proxies)
    raise ConfigError(f"no proxy {name!r}; the proxies are {known}")


def _selected(
    proxies: Sequence[FaultProxy], request: Mapping[str, Any], *, one: bool
) -> list[FaultProxy]:
    name = request.get("proxy")
    if name is not None:
        return [_select(proxies, name)]
    if one and len(proxies) != 1:
        known = ", ".join(p.address for p in proxies)
        raise ConfigError(f"name the proxy ('proxy' field): one of {known}")
    return list(proxies)


def _dispatch(proxies: Sequence[FaultProxy], request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise ConfigError("a request must be a JSON object")
    op = request.get("op")
    if op not in _FIELDS:
        raise ConfigError(f"unknown op {op!r}; the ops are {', '.join(_FIELDS)}")
    unknown = sorted(set(request) - _FIELDS[op] - {"op"})
    if unknown:
        raise ConfigError(f"{op} takes no field {unknown[0]!r}")
    if op == "add":
        (proxy,) = _selected(proxies, request, one=True)
        attributes = request.get("attributes", {})
        if not isinstance(attributes, dict):
            raise ConfigError("'attributes' must be a JSON object")
        clash = sorted(set(attributes) & {"kind", "direction", "toxicity", "name"})
        if clash:
            raise ConfigError(f"{clash[0]!r} is a field of the request, not an attribute")
        # Any JSON value (None when absent): add_toxic checks it (a ConfigError).
        kind: Any = request.get("kind")
        handle = proxy.add_toxic(
            kind,
            direction=request.get("direction", "downstream"),
            toxicity=request.get("toxicity", 1.0),
            name=request.get("name"),
            **attributes,
        )
        return {"id": handle.id, "toxic": handle.describe()}
    if op == "remove":
        (proxy,) = _selected(proxies, request, one=True)
        # Any JSON value (None when absent): one that names no toxic removes nothing.
        toxic_id: Any = request.get("id")
        if not proxy.remove_toxic(toxic_id):
            raise ConfigError(f"no toxic {request.get('id')!r} on proxy {proxy.address}")
        return {}
    selected = _selected(proxies, request, one=False)
    if op == "clear":
        return {"removed": sum(p.clear() for p in selected)}
    if op == "list":
        return {
            "proxies": {
                p.address: {"upstream": p.upstream, "toxics": [t.describe() for t in p.toxics()]}
                for p in selected
            }
        }
    return {"stats": {p.address: p.statistics() for p in selected}}


def handle_control_request(proxies: Sequence[FaultProxy], request: Any) -> dict[str, Any]:
    """Answer one decoded control request (a dict): ``{"ok": true, ...}`` or
    ``{"ok": false, "error": ...}``. Never raises.
    """
    try:
        return {"ok": True, **_dispatch(proxies, request)}
    except (ConfigError, ValueError, TypeError) as exc:
        return {"ok": False, "error": str(exc)}
    except Exception as exc:  # a bug must not take the proxy down
        logger.exception("proxy control: request %r failed", request)
        return {"ok": False, "error": f"internal error: {exc!r}"}


class ControlServer:
    """The control port of a set of proxies (see the module docstring for the protocol)."""

    def __init__(self, proxies: Sequence[FaultProxy], listen: str = "127.0.0.1:0") -> None:
        self._proxies = list(proxies)
        self._host, self._port = split_address(listen, allow_port_zero=True)

    @property
    def address(self) -> str:
        """``host:port`` of the control port (the bound port once serving)."""
        return format_address(self._host, self._port)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer requests until cancelled (``nursery.start`` returns once bound)."""
        listener = bind_listener(self._host, self._port)
        self._port = listener.socket.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        logger.warning("proxy control %s: accept failed: %r", self.address, exc)
                        await trio.sleep(0.05)
                        continue
                    nursery.start_soon(self._serve_client, stream)
        finally:
            listener.socket.close()

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        lines = Lines(stream)
        try:
            while True:
                try:
                    line = await lines.next()
                except LineTooLong:
                    await _reply(stream, {"ok": False, "error": f"line over {MAX_LINE} bytes"})
                    return
                if line is None:
                    return
                if line.strip():
                    await _reply(stream, self._answer(line))
        except _TRANSPORT_ERRORS as exc:
            logger.debug("proxy control %s: client went away: %r", self.address, exc)
        except Exception:  # a bug: close this connection, keep the proxies running
            logger.exception("proxy control %s: connection failed", self.address)
        finally:
            await trio.aclose_forcefully(stream)

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError
            reply: dict[str, Any] = {"ok": False, "error": f"not JSON: {exc}"}
        except RecursionError:
            reply = {"ok": False, "error": "not JSON: nested too deeply"}
        else:
            reply = handle_control_request(self._proxies, request)
        logger.debug("proxy control: %r -> %r", line[:200], reply)
        return reply


async def _reply(stream: trio.abc.SendStream, reply: Mapping[str, Any]) -> None:
    """Send ``reply``; one too long for a line is replaced by an error saying so."""
    line = json.dumps(reply, separators=(",", ":"), default=str)
    if len(line.encode()) >= MAX_LINE:
        reply = {"ok": False, "error": f"the reply ({len(line)} bytes) is over {MAX_LINE} bytes"}
    await send_message(stream, reply)


# -------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m qdb_client.testing proxy``."""
    p = argparse.ArgumentParser(
        prog="python -m qdb_client.testing proxy",
        description="Run fault proxies (Toxiproxy-style toxics) in front of test nodes.",
    )
    p.add_argument("--listen", action="append", default=[], help="proxy address; repeatable")
    p.add_argument("--upstream", action="append", default=[], help="node behind each --listen")
    p.add_argument(
        "--map", action="append", default=[], metavar="LISTEN=UPSTREAM", help="a pair in one"
    )
    p.add_argument("--control", help="host:port of the JSON-lines control port")
    p.add_argument("--seed", type=int, help="seed of toxicity and jitter (proxy i gets seed+i)")
    p.add_argument("--connect-timeout", type=float, default=5.0, help="seconds per upstream")
    p.add_argument("--log-level", default=os.environ.get("QDB_TEST_LOG_LEVEL", "INFO"))
    return p


def _pairs(ns: argparse.Namespace) -> list[tuple[str, str]]:
    if len(ns.listen) != len(ns.upstream):
        raise ConfigError("give one --upstream for every --listen")
    pairs = list(zip(ns.listen, ns.upstream, strict=True))
    for item in ns.map:
        listen, sep, upstream = item.partition("=")
        if not sep:
            raise ConfigError(f"--map {item!r} is not LISTEN=UPSTREAM")
        pairs.append((listen, upstream))
    if not pairs:
        raise ConfigError("nothing to proxy: give --listen/--upstream or --map")
    return pairs


async def run_proxies(
    proxies: Sequence[FaultProxy], control: str | None = None, *, out: TextIO | None = None
) -> None:
    """Serve ``proxies`` (and a control port) until SIGTERM/SIGINT; print the readiness line."""
    out = sys.stdout if out is None else out
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with owned_nursery() as nursery:
            for proxy in proxies:
                await nursery.start(proxy.serve)
            control_address = "none"
            if control is not None:
                server = ControlServer(proxies, control)
                await nursery.start(server.serve)
                control_address = server.address
            print(
                f"QDB-PROXY READY address={','.join(p.address for p in proxies)}"
                f" upstream={','.join(p.upstream for p in proxies)}"
                f" control={control_address} pid={os.getpid()}",
                file=out,
                flush=True,
            )
            async for signum in signals:
                logger.info("proxy: got signal %d, stopping", signum)
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m qdb_client.testing proxy``; returns the exit status."""
    ns = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=ns.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        proxies = [
            FaultProxy(
                upstream,
                listen,
                seed=None if ns.seed is None else ns.seed + i,
                connect_timeout=ns.connect_timeout,
            )
            for i, (listen, upstream) in enumerate(_pairs(ns))
        ]
        if ns.control is not None:
            split_address(ns.control, allow_port_zero=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(functools.partial(run_proxies, proxies, ns.control))
    except OSError as exc:
        logger.error("cannot start the proxy: %s", exc)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - signal arrived before the receiver existed
        return 130
    return 0
