"""Whatever bytes a client sends, the node answers sanely and keeps serving others."""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qdb_client.protocol import PROTOCOL_VERSIONS, Error, GoAway, Hello, Kind, encode_frame
from qdb_client.protocol.codec import encode_body
from qdb_client.testing import QdbNode, ServerConfig

from ..common.raw_client import RawClient

frames = st.builds(
    encode_frame,
    st.sampled_from([*Kind, 0x00, 0x7F, 0xFF]),
    st.integers(0, 2**64 - 1),
    st.one_of(
        st.binary(max_size=40),
        st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4).map(
            encode_body
        ),
    ),
)
chunks = st.lists(st.one_of(frames, st.binary(min_size=1, max_size=64)), max_size=6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(handshake=st.booleans(), data=chunks)
def test_arbitrary_input_never_breaks_the_node(handshake: bool, data: list[bytes]):
    async def main() -> None:
        node = QdbNode(ServerConfig(client_idle_timeout=5.0, test_mode=True))
        async with trio.open_nursery() as nursery:
            stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(node.serve_connection, server_stream)
            client = RawClient(stream, timeout=60.0)
            if handshake:
                await client.send(Hello(versions=PROTOCOL_VERSIONS))
            for chunk in data:
                await client.send_bytes(chunk)
            messages = []
            while True:  # the node answers, then idles out or closes; never hangs
                try:
                    messages.append(await client.receive())
                except EOFError:
                    break
            for message in messages:
                if isinstance(message, GoAway):
                    assert message.reason in ("protocol_error", "idle_timeout")
                elif isinstance(message, Error):
                    assert message.name in {
                        "PARSE_ERROR", "FRAME_TOO_LARGE", "TIMEOUT", "INVALID_REQUEST",
                        "METHOD_NOT_FOUND", "VERSION_MISMATCH", "SQL_ERROR", "CAPACITY_EXCEEDED",
                    }, message  # fmt: skip
            await client.aclose()
            # The same node serves a well-formed client afterwards.
            stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(node.serve_connection, server_stream)
            good = RawClient(stream, timeout=60.0)
            await good.handshake()
            assert (await good.call("ping"))["node_id"] == node.node_id
            await good.aclose()
        await node.aclose()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_control_shutdown_over_a_memory_stream():
    async def main() -> None:
        node = QdbNode(ServerConfig(test_mode=True))
        stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.serve_connection, server_stream)
            client = RawClient(stream, timeout=60.0)
            await client.handshake(credentials={"control_token": node.control_token})
            assert (await client.call("control.shutdown", {"grace_ms": 1000})) == {
                "shutting_down": True
            }
            messages = await client.read_until_eof()
            assert [(type(m), m.reason) for m in messages] == [(GoAway, "shutdown")]
            await client.aclose()
            with trio.fail_after(10):
                await node.wait_stopped()
        assert node.stopped

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
