"""The real client against a hostile server on loopback TCP: only QdbErrors, no hangs.

A tiny scripted server (``ProtocolConnection(Role.SERVER)`` + ``receive_event``)
answers the HELLO with a valid or mutated WELCOME (or an ERROR, garbage, a
close, silence), then answers each REQUEST and PING with an action drawn by a
seeded random generator: the right reply, a mutated RESPONSE or ERROR (huge
integers, wrong types, wrong shapes), replies for ids never sent, duplicated
and stale replies, garbage bytes, truncated or oversized frames, bad
checksums, unknown or wrong-direction kinds, GOAWAYs, PINGs, silence, a
close.

The client (``qdb_client.open_client``) runs ``query``, ``execute`` and
``ping`` concurrently with short timeouts. The properties:

- every exception escaping a call or ``open_client`` is a ``qdb_client.QdbError``
  (no other type, no ExceptionGroup);
- no call lasts longer than its timeout plus a margin;
- replies are never crossed: each legitimate reply carries the SQL text of
  the request it answers (which is unique per call), and a call never
  returns another call's text.

Each round draws from its own seed: ``QDB_HOSTILE_SEED=<seed>`` runs that
round alone (``QDB_HOSTILE_ROUNDS`` sets how many rounds run). The seed fixes
the server's choices in the order events reach it; real-socket timing can
still reorder them, so a failure report also lists the traceback and the
last frames the server sent, which are the reproducer to keep.
"""

from __future__ import annotations

import os
import random
import traceback
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio

import qdb_client
from qdb_client.errors import QdbError, ValueNotEncodable
from qdb_client.protocol import (
    BadMessage,
    Cancel,
    ErrorCode,
    GoAway,
    Hello,
    Kind,
    Member,
    Ping,
    Pong,
    ProtocolConnection,
    ProtocolError,
    Request,
    Role,
    Welcome,
    encode_body,
    encode_frame,
    encode_message,
    error_message,
    receive_event,
)
from qdb_client.protocol import Response as ResponseMessage

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("QDB_HOSTILE_ROUNDS", "16"))
ONLY_SEED = os.environ.get("QDB_HOSTILE_SEED")
BASE_SEED = 20_240_601
#: Calls may overrun their timeout by this much (scheduling on a loaded machine).
MARGIN = 1.0
#: A round (connect, calls, close) must end within this many seconds.
ROUND_LIMIT = 15.0
TOKEN_PREFIX = "SELECT 'tok-"

OPTIONS: dict[str, Any] = {
    "connect_timeout": 0.3,
    "request_timeout": 0.3,
    "close_timeout": 0.2,
    "heartbeat_interval": 0.15,
    "ping_timeout": 0.1,
    "suspect_interval": 0.05,
    "failures_to_down": 2,
    "reconnect_initial": 0.02,
    "reconnect_max": 0.1,
    "node_selection_timeout": 0.2,
    "pool_acquire_timeout": 0.2,
    "max_retries": 2,
    "retry_initial_backoff": 0.005,
    "retry_max_backoff": 0.02,
    "max_connections": 2,
    "breaker_open_timeout": 0.1,
}


# ------------------------------------------------------------ hostile values

HUGE_INTS = [2**64, 2**64 - 1, 2**63, 2**1100, -(2**1100), 10**5000, -(10**5000), -1, 0]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """Any CBOR value a broken node might send (never a string with TOKEN_PREFIX)."""
    pick = rng.randrange(12 if depth < 3 else 8)
    if pick == 0:
        return rng.choice(HUGE_INTS)
    if pick == 1:
        return rng.randint(-(2**70), 2**70)
    if pick == 2:
        return rng.choice([0.5, -0.0, float("nan"), float("inf"), -1e308])
    if pick == 3:
        return "".join(rng.choice("ab\u00e9\u2603 \x00") for _ in range(rng.randrange(6)))
    if pick == 4:
        return rng.randbytes(rng.randrange(6))
    if pick == 5:
        return rng.choice([True, False])
    if pick in (6, 7):
        return None
    if pick in (8, 9):
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 10:
        return {f"k{i}": hostile_value(rng, depth + 1) for i in range(rng.randrange(4))}
    nested: Any = 0
    for _ in range(rng.choice([5, 31])):
        nested = [nested]
    return nested


def mutate(rng: random.Random, body: dict[str, Any], extra_keys: list[str]) -> dict[str, Any]:
    """``body`` with one to three keys replaced by hostile values or removed."""
    body = dict(body)
    keys = sorted(set(body) | set(extra_keys))
    for key in rng.sample(keys, k=min(len(keys), rng.randint(1, 3))):
        if rng.random() < 0.2:
            body.pop(key, None)
        else:
            body[key] = hostile_value(rng)
    return body


def raw_frame(kind: int, request_id: int, body: Any) -> bytes:
    """A frame with any body, bypassing the encoder's schema checks."""
    try:
        data = encode_body(body)
    except ValueNotEncodable:
        data = encode_body({"unencodable": True})
    return encode_frame(kind, request_id, data)


# --------------------------------------------------------------- the server


@attrs.define
class Script:
    """The server's side of one round: its random choices and what it sent."""

    rng: random.Random
    port: int = 0
    log: list[str] = attrs.Factory(list)
    server_bugs: list[str] = attrs.Factory(list)
    #: Per connection: request id -> SQL text of the replies sent (ids are per connection).
    answered: dict[int, dict[int, str]] = attrs.Factory(dict)
    connections: int = 0

    def note(self, conn: int, what: str, data: bytes = b"") -> None:
        shown = data[:96].hex()
        if len(data) > 96:
            shown += f"...({len(data)} bytes)"
        self.log.append(f"c{conn} {what} {shown}".rstrip())

    def choose(self, weights: dict[str, int]) -> str:
        names = list(weights)
        return self.rng.choices(names, weights=[weights[n] for n in names])[0]


class Closed(Exception):
    """The script decided to close this connection."""


async def serve_hostile(script: Script, stream: trio.SocketStream) -> None:
    script.connections += 1
    conn = script.connections
    script.answered[conn] = {}
    proto = ProtocolConnection(Role.SERVER)
    write_lock = trio.StrictFIFOLock()  # delayed replies write from their own tasks

    async def send(what: str, data: bytes) -> None:
        async with write_lock:
            script.note(conn, what, data)
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:  # delayed replies run here
        try:
            while True:
                event = await receive_event(proto, stream)
                if event is None:
                    break
                await answer(script, conn, proto, event, send, nursery)
        except Closed:
            pass
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client broke off, or sent what a server refuses: the connection ends
        except Exception:
            script.server_bugs.append(traceback.format_exc())
        finally:
            nursery.cancel_scope.cancel()
            await trio.aclose_forcefully(stream)


Send = Callable[[str, bytes], Any]


async def answer(
    script: Script,
    conn: int,
    proto: ProtocolConnection,
    event: Any,
    send: Send,
    nursery: trio.Nursery,
) -> None:
    rng = script.rng
    if isinstance(event, Hello):
        await answer_hello(script, proto, send)
    elif isinstance(event, Request):
        action = script.choose(REQUEST_ACTIONS)
        if action == "ok_later":
            nursery.start_soon(_later, script, conn, proto, event, send)
        else:
            await answer_request(script, conn, proto, event, send, action)
    elif isinstance(event, Ping):
        action = script.choose(
            {"pong": 80, "silent": 5, "bad_pong": 5, "wrong_id": 5, "garbage": 2, "close": 3}
        )
        if action == "pong":
            await send("PONG", proto.send(Pong(event.request_id)))
        elif action == "bad_pong":
            await send("PONG(body=[1])", raw_frame(Kind.PONG, event.request_id, [1]))
        elif action == "wrong_id":
            await send("PONG(other id)", proto.send(Pong(event.request_id + rng.randint(1, 9))))
        elif action == "garbage":
            await send("garbage", rng.randbytes(rng.randint(1, 40)))
        elif action == "close":
            raise Closed
    elif isinstance(event, (Cancel, Pong, BadMessage)):
        script.note(conn, f"received {type(event).__name__} {event.request_id}")
    elif isinstance(event, GoAway):
        raise Closed


async def answer_hello(script: Script, proto: ProtocolConnection, send: Send) -> None:
    rng = script.rng
    action = script.choose(
        {"welcome": 70, "mutated": 12, "error": 8, "garbage": 3, "close": 4, "silent": 3}
    )
    members = [
        Member(f"m{i}", rng.choice(["host:\u00b2", "::1:7000", "[::1", "h:\u0661", "x y:1", ""]))
        for i in range(rng.randrange(3))
    ]
    welcome = Welcome(
        version=1,
        node_id="hostile",
        session_id="s",
        max_frame_size=rng.choice([1024, 4096, 1 << 20]),
        max_in_flight=rng.choice([0, 1, 2, 8, 2**64 - 1]),
        idle_timeout_ms=rng.choice([0, 30_000, 2**64 - 1]),
        members=tuple(members),
    )
    if action == "welcome":
        await send("WELCOME", proto.send(welcome))
    elif action == "mutated":
        body = mutate(rng, welcome.body(), ["version", "max_frame", "members"])
        await send("WELCOME(mutated)", raw_frame(Kind.WELCOME, 0, body))
        raise Closed  # whatever the client made of it, this connection is over
    elif action == "error":
        body = mutate(rng, error_message(0, ErrorCode.UNAVAILABLE, "go away").body(), ["code"])
        await send("ERROR(handshake, mutated)", raw_frame(Kind.ERROR, 0, body))
        raise Closed
    elif action == "garbage":
        await send("garbage", rng.randbytes(rng.randint(1, 64)))
        raise Closed
    elif action == "close":
        raise Closed
    # silent: keep reading until the client gives up


REQUEST_ACTIONS = {
    "ok": 30,
    "ok_later": 10,
    "mutated_result": 10,
    "mutated_error": 8,
    "huge_code": 3,
    "valid_error": 5,
    "foreign_id": 4,
    "duplicate": 4,
    "stale": 4,
    "bad_crc": 3,
    "unknown_kind": 2,
    "wrong_direction": 2,
    "ping_first": 2,
    "goaway": 3,
    "garbage": 2,
    "truncated": 2,
    "oversized": 1,
    "silent": 3,
    "close": 2,
    "stream_frames": 3,
    "connection_error": 2,
    "handshake_again": 2,
}


def legit_result(request: Request) -> Any:
    """The right answer to ``request``: it carries the request's own SQL text."""
    sql = request.args.get("sql")
    if request.method == "execute":
        return {
            "rows_affected": 1,
            "last_insert_id": request.request_id % 2**63,
            "columns": ["token", "rid"],
            "rows": [[sql, request.request_id]],
        }
    return {"columns": ["token", "rid"], "rows": [[sql, request.request_id]]}


async def _later(
    script: Script, conn: int, proto: ProtocolConnection, request: Request, send: Send
) -> None:
    await trio.sleep(script.rng.uniform(0.0, 0.08))
    try:
        await answer_request(script, conn, proto, request, send, "ok")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ProtocolError):
        pass


async def answer_request(
    script: Script,
    conn: int,
    proto: ProtocolConnection,
    request: Request,
    send: Send,
    action: str,
) -> None:
    rng = script.rng
    rid = request.request_id
    sql = request.args.get("sql")

    async def reply_ok(what: str = "RESPONSE") -> None:
        await send(f"{what} {rid}", proto.send(ResponseMessage(rid, legit_result(request))))
        if isinstance(sql, str):
            script.answered[conn][rid] = sql

    if action == "ok":
        await reply_ok()
    elif action == "mutated_result":
        result = legit_result(request)
        if rng.random() < 0.3:
            result = hostile_value(rng)
        else:
            result = mutate(rng, result, ["columns", "rows", "rows_affected", "last_insert_id"])
        await send(f"RESPONSE(mutated) {rid}", raw_frame(Kind.RESPONSE, rid, {"result": result}))
    elif action == "mutated_error":
        base = error_message(rid, rng.choice(list(ErrorCode)), "m", retry_after_ms=10).body()
        body = mutate(rng, base, ["code", "retry_after_ms", "details", "retryable", "name"])
        await send(f"ERROR(mutated) {rid}", raw_frame(Kind.ERROR, rid, body))
    elif action == "huge_code":
        body = {**error_message(rid, ErrorCode.OVERLOADED, "m").body(), "code": 10**5000}
        if rng.random() < 0.5:
            body["retry_after_ms"] = 2**1100
        await send(f"ERROR(code=10**5000) {rid}", raw_frame(Kind.ERROR, rid, body))
    elif action == "valid_error":
        code = rng.choice(list(ErrorCode))
        after = rng.choice([None, 0, 5, 2**64 - 1])
        await send(
            f"ERROR {code.value} {rid}",
            proto.send(error_message(rid, code, "x", retry_after_ms=after)),
        )
    elif action == "foreign_id":
        # Ids the client never uses on this connection (it counts up from 1).
        other = rng.choice([0, rid + 10**9 + rng.randint(0, 1000), 2**64 - 1])
        foreign = {"columns": ["token", "rid"], "rows": [["FOREIGN", other]]}
        await send(
            f"RESPONSE(foreign id {other})", raw_frame(Kind.RESPONSE, other, {"result": foreign})
        )
        await reply_ok()
    elif action == "duplicate":
        await reply_ok()
        await reply_ok("RESPONSE(again)")
    elif action == "stale":
        if script.answered[conn]:
            old_rid, old_sql = rng.choice(sorted(script.answered[conn].items()))
            stale = {"columns": ["token", "rid"], "rows": [[old_sql, old_rid]]}
            await send(
                f"RESPONSE(stale {old_rid})", raw_frame(Kind.RESPONSE, old_rid, {"result": stale})
            )
        await reply_ok()
    elif action == "bad_crc":
        frame = bytearray(encode_message(ResponseMessage(rid, legit_result(request))))
        frame[16] ^= 0xFF
        await send(f"RESPONSE(bad crc) {rid}", bytes(frame))
    elif action == "unknown_kind":
        await send(f"kind 0x7f {rid}", raw_frame(0x7F, rid, {"result": 1}))
    elif action == "wrong_direction":
        await send(f"REQUEST to the client {rid}", raw_frame(Kind.REQUEST, rid, {"method": "x"}))
    elif action == "ping_first":
        await send("PING", proto.send(Ping(rng.randint(1, 2**64 - 1))))
        await reply_ok()
    elif action == "goaway":
        last = rng.choice([0, rid - 1, rid, 2**64 - 1, 2**64, -1, "x"])
        body = {"reason": rng.choice(["shutdown", "overloaded", "???"]), "last_request_id": last}
        await send(f"GOAWAY(last={last!r:.30})", raw_frame(Kind.GOAWAY, 0, body))
        if rng.random() < 0.5:
            await reply_ok()
        await trio.sleep(0.02)
        raise Closed
    elif action == "garbage":
        await send("garbage", rng.randbytes(rng.randint(1, 64)))
    elif action == "truncated":
        frame = encode_message(ResponseMessage(rid, legit_result(request)))
        await send(f"RESPONSE(truncated) {rid}", frame[: rng.randrange(1, len(frame))])
        raise Closed
    elif action == "oversized":
        header = encode_frame(Kind.RESPONSE, rid, b"")[:4] + (2**31).to_bytes(4, "big")
        await send(f"header of 2 GiB {rid}", header + rid.to_bytes(8, "big") + b"\0" * 4)
    elif action == "stream_frames":
        # Frames of features the client has not asked for (streams, events), valid or not.
        kind = rng.choice([Kind.STREAM_PAGE, Kind.STREAM_END, Kind.EVENT])
        base = {
            Kind.STREAM_PAGE: {"seq": 0, "rows": [[1]], "token": b"t"},
            Kind.STREAM_END: {"seq": 0, "row_count": 1, "digest": b"\0" * 32},
            Kind.EVENT: {"topic": "topology", "data": {}},
        }[kind]
        body = mutate(rng, base, ["seq", "rows", "data"]) if rng.random() < 0.5 else base
        await send(f"{kind.name} {rid}", raw_frame(kind, rng.choice([rid, 0]), body))
        await reply_ok()
    elif action == "connection_error":
        # ERROR with request id 0 after the handshake: about the connection, not a request.
        body = error_message(0, ErrorCode.PARSE_ERROR, "bad frame").body()
        if rng.random() < 0.5:
            body = mutate(rng, body, ["code"])
        await send("ERROR(id 0)", raw_frame(Kind.ERROR, 0, body))
        if rng.random() < 0.5:
            raise Closed
        await reply_ok()
    elif action == "handshake_again":
        kind = rng.choice([Kind.WELCOME, Kind.HELLO])
        await send(f"{kind.name} after the handshake", raw_frame(kind, 0, {"versions": [1]}))
        await reply_ok()
    elif action == "close":
        raise Closed
    # silent: no reply at all; the client's timeout ends the call


# --------------------------------------------------------------- the client


@attrs.define
class Report:
    """What went wrong in one round, if anything."""

    seed: int
    problems: list[str] = attrs.Factory(list)

    def add(self, what: str, exc: BaseException | None = None) -> None:
        text = what
        if exc is not None:
            text += "\n" + "".join(traceback.format_exception(exc))
        self.problems.append(text)


def _check_exception(report: Report, where: str, exc: BaseException) -> None:
    if isinstance(exc, BaseExceptionGroup):
        report.add(f"{where} raised an ExceptionGroup", exc)
    elif not isinstance(exc, QdbError):
        report.add(f"{where} raised {type(exc).__name__}, not a QdbError", exc)


async def _call(report: Report, worker: int, number: int, client: Any, rng: random.Random) -> None:
    kind = rng.choice(["query", "query", "execute", "ping"])
    timeout = rng.choice([0.15, 0.25, 0.4])
    sql = f"{TOKEN_PREFIX}{report.seed}-{worker}-{number}'"
    where = f"{kind}(timeout={timeout}) #{worker}.{number}"
    started = trio.current_time()
    with trio.move_on_after(timeout + MARGIN) as scope:
        try:
            if kind == "query":
                result = await client.query(sql, timeout=timeout)
                _check_token(report, where, sql, result.rows)
            elif kind == "execute":
                result = await client.execute(sql, timeout=timeout)
                _check_token(report, where, sql, result.rows)
            else:
                rtt = await client.ping(timeout=timeout)
                if not (isinstance(rtt, float) and rtt >= 0):
                    report.add(f"{where} returned {rtt!r:.80}")
        except trio.Cancelled:
            raise
        except BaseException as exc:  # the property is about what escapes
            _check_exception(report, where, exc)
    if scope.cancelled_caught:
        report.add(f"{where} hung: still running {timeout + MARGIN:.2f} s after it started")
    elapsed = trio.current_time() - started
    if elapsed > timeout + MARGIN:
        report.add(f"{where} took {elapsed:.2f} s")


def _check_token(report: Report, where: str, sql: str, rows: list[Any]) -> None:
    """A reply meant for another request would carry that request's SQL text."""
    for row in rows:
        for value in row:
            if isinstance(value, str) and value.startswith(TOKEN_PREFIX) and value != sql:
                report.add(f"{where} got a reply meant for another request: {value!r}")
            if value == "FOREIGN":
                report.add(f"{where} got a reply sent for an id it never used")


async def run_round(seed: int) -> tuple[Report, Script]:
    report = Report(seed)
    rng = random.Random(seed)
    script = Script(random.Random(rng.getrandbits(64)))
    with trio.move_on_after(ROUND_LIMIT) as round_scope:
        async with trio.open_nursery() as server_nursery:
            listeners = await server_nursery.start(
                trio.serve_tcp, lambda stream: serve_hostile(script, stream), 0
            )
            port = listeners[0].socket.getsockname()[1]
            script.port = port
            try:
                async with (
                    qdb_client.open_client(
                        f"127.0.0.1:{port}", random_seed=seed, **OPTIONS
                    ) as client,
                    trio.open_nursery() as workers,
                ):
                    for worker in range(3):
                        workers.start_soon(_worker, report, worker, client, rng.random())
            except trio.Cancelled:
                raise
            except BaseException as exc:
                _check_exception(report, "open_client", exc)
            server_nursery.cancel_scope.cancel()
    if round_scope.cancelled_caught:
        report.add(f"the round did not finish within {ROUND_LIMIT} s")
    for bug in script.server_bugs:
        report.add(f"(bug in the test's own server)\n{bug}")
    return report, script


async def _worker(report: Report, worker: int, client: Any, seed: float) -> None:
    rng = random.Random(seed)
    for number in range(rng.randint(2, 5)):
        await _call(report, worker, number, client, rng)


def _seeds() -> list[int]:
    if ONLY_SEED is not None:
        return [int(ONLY_SEED)]
    return [BASE_SEED + n for n in range(ROUNDS)]


async def test_hostile_server_never_makes_the_client_raise_untyped_errors() -> None:
    failures = []
    for seed in _seeds():
        report, script = await run_round(seed)
        if report.problems:
            frames = "\n".join(f"    {line}" for line in script.log[-40:])
            failures.append(
                f"--- seed {seed} (QDB_HOSTILE_SEED={seed}):\n"
                + "\n".join(report.problems)
                + f"\n  last frames the server sent/received:\n{frames}"
            )
    assert not failures, "\n\n".join(failures)
