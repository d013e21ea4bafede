"""The fault proxy's JSON-lines control port: the server and the ProxyControl client.

docs/testing.md: "A bad request gets {"ok": false, ...} and the connection
stays usable ... Only a line over 64 KiB also closes the connection.
Nothing a client sends can stop the proxy." And ProxyControl makes "one
request at a time" on one connection, pairing replies with requests by
order, so no call may leave a reply behind. A loopback control port (it is
a TCP server by nature).
"""

from __future__ import annotations

import functools
import json

import pytest
import trio
import trio.testing

from qdb_client.testing.proxy import FaultProxy
from qdb_client.testing.proxy_cli import MAX_LINE, ControlServer
from qdb_client.testing.proxy_control import Lines, LineTooLong, ProxyControl, ProxyControlError

# ------------------------------------------------------------ control port


async def _control_line(address: str, line: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        await stream.send_all(line + b"\n")
        data = b""
        with trio.move_on_after(5.0):
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
        return data
    finally:
        await stream.aclose()


async def test_deeply_nested_json_on_the_control_port_does_not_stop_the_proxy():
    # 5 KB of nested arrays make json.loads raise RecursionError, which is not
    # a ValueError: it must not escape the connection task and take down the
    # control server's nursery (in the `proxy` CLI: every proxy of the process).
    proxy = FaultProxy("127.0.0.1:9")
    server = ControlServer([proxy])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        first = await _control_line(server.address, b"[" * 5000 + b"]" * 5000)
        await trio.sleep(0.1)
        second = await _control_line(server.address, b'{"op": "list"}')
        nursery.cancel_scope.cancel()
    assert first.startswith(b'{"ok":false'), first[:200]
    assert second.startswith(b'{"ok":true'), second[:200]


async def test_a_request_line_over_64_kib_is_refused():
    # The control protocol: one JSON object per line, "at most 64 KiB", even
    # when the newline of a 100 KB line arrives within the next read.
    proxy = FaultProxy("127.0.0.1:9")
    server = ControlServer([proxy])
    padding = " " * (100_000 - 20)
    line = ('{"op": "list"' + padding + "}").encode()
    assert len(line) > MAX_LINE
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        reply = await _control_line(server.address, line)
        nursery.cancel_scope.cancel()
    assert reply.startswith(b'{"ok":false'), reply[:200]


async def test_a_proxy_control_call_cancelled_by_its_caller_does_not_shift_later_replies():
    # A call cancelled by the caller's own scope (not its call_timeout) after
    # its request went out must not leave that reply unread on the connection,
    # for the next call to return instead of its own.
    async def slow_first_reply(stream: trio.SocketStream) -> None:
        # A control port that is slow once (a busy proxy process), then quick.
        buffer, served = b"", 0
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if served == 0:
                        await trio.sleep(0.5)
                    served += 1
                    reply = b'{"ok": true, "answers": ' + line + b"}\n"
                    await stream.send_all(reply)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, slow_first_reply, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        ctl = ProxyControl(f"127.0.0.1:{port}", call_timeout=5.0)
        with trio.move_on_after(0.2):  # the caller gives up on its own
            await ctl.call({"op": "list"})
        reply = await ctl.call({"op": "stats"})
        await ctl.aclose()
        nursery.cancel_scope.cancel()
    assert reply["answers"] == {"op": "stats"}, reply


async def _lines_of(data: bytes) -> list[bytes | type[LineTooLong]]:
    send, receive = trio.testing.memory_stream_one_way_pair()
    lines = Lines(receive)
    await send.send_all(data)
    await send.aclose()
    got: list[bytes | type[LineTooLong]] = []
    while True:
        try:
            line = await lines.next()
        except LineTooLong:
            return [*got, LineTooLong]
        if line is None:
            return got
        got.append(line)


async def test_lines_are_bounded_by_max_line_wherever_the_newline_falls():
    longest = b"x" * MAX_LINE
    assert await _lines_of(b"a\n" + longest + b"\nb\n") == [b"a", longest, b"b"]
    assert await _lines_of(b"a\n" + longest + b"x\nb\n") == [b"a", LineTooLong]
    assert await _lines_of(longest + b"xx") == [LineTooLong]


async def test_a_reply_over_a_line_is_replaced_by_an_error_and_the_port_goes_on():
    proxy = FaultProxy("127.0.0.1:9")
    for i in range(400):
        proxy.add_toxic("latency", name=f"{i:04d}-" + "n" * 200)
    server = ControlServer([proxy])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        ctl = ProxyControl(server.address, call_timeout=5.0)
        with pytest.raises(ProxyControlError, match="over 65536 bytes"):
            await ctl.list_toxics()
        assert await ctl.clear() == 400  # the same connection
        assert (await ctl.list_toxics())[proxy.address]["toxics"] == []
        await ctl.aclose()
        nursery.cancel_scope.cancel()


async def test_a_bug_answering_closes_that_connection_only(monkeypatch: pytest.MonkeyPatch):
    proxy = FaultProxy("127.0.0.1:9")
    server = ControlServer([proxy])
    calls = []
    real = ControlServer._answer

    def fails_once(self: ControlServer, line: bytes) -> dict:
        calls.append(line)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(self, line)

    monkeypatch.setattr(ControlServer, "_answer", fails_once)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert await _control_line(server.address, b'{"op": "list"}') == b""
        reply = json.loads(await _control_line(server.address, b'{"op": "list"}'))
        nursery.cancel_scope.cancel()
    assert reply["ok"] is True
