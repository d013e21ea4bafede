"""Handshake of the test node: WELCOME fields, version mismatch, auth, first-frame rules."""

from __future__ import annotations

import re

from qdb_client.protocol import Error, Request, Welcome
from qdb_client.testing import QdbNode, open_node

from ..common.fixtures import node_config
from ..common.raw_client import RawClient, raw_client


async def test_welcome_carries_identity_limits_and_members(tmp_path):
    config = node_config(
        tmp_path,
        peers=["127.0.0.1:7101", "127.0.0.1:7102"],
        client_idle_timeout=12.5,
        max_in_flight=17,
        max_frame_size=65536,
    )
    async with (
        open_node(config) as node,
        raw_client(node.address) as first,
        raw_client(node.address) as second,
    ):
        welcome = first.welcome
        assert welcome is not None and second.welcome is not None
        assert welcome.version == 1
        assert welcome.node_id == f"node-{node.port}" == node.node_id
        assert re.fullmatch(r"[0-9a-f]{32}", welcome.session_id)
        assert welcome.session_id != second.welcome.session_id
        assert welcome.max_frame_size == 65536
        assert welcome.max_in_flight == 17
        assert welcome.idle_timeout_ms == 12500
        assert welcome.server_name == "qdb-test-node/0.1"
        assert [(m.node_id, m.address) for m in welcome.members] == [
            (node.node_id, node.address),
            ("node-7101", "127.0.0.1:7101"),
            ("node-7102", "127.0.0.1:7102"),
        ]
        assert (await first.call("ping")) == {"node_id": node.node_id}


async def test_configured_node_id_is_announced(tmp_path):
    async with (
        open_node(node_config(tmp_path, node_id="alpha")) as node,
        raw_client(node.address) as client,
    ):
        assert client.welcome is not None and client.welcome.node_id == "alpha"
        assert client.welcome.members[0].node_id == "alpha"


async def test_version_mismatch_lists_supported_versions_then_closes(node: QdbNode):
    client = await RawClient.connect(node.address)
    try:
        reply = await client.hello(versions=(2, 7))
        assert isinstance(reply, Error)
        assert reply.request_id == 0
        assert reply.name == "VERSION_MISMATCH" and reply.code == 426
        assert reply.retryable is False
        assert reply.details == {"supported_versions": [1]}
        assert "[2, 7]" in reply.message
        assert await client.read_until_eof() == []
    finally:
        await client.aclose()
    async with raw_client(node.address) as again:  # the node is unaffected
        assert (await again.call("ping"))["node_id"] == node.node_id


async def test_common_version_is_chosen_from_several_offered(node: QdbNode):
    client = await RawClient.connect(node.address)
    try:
        welcome = await client.handshake(versions=(1, 2, 9))
        assert welcome.version == 1
    finally:
        await client.aclose()


async def test_first_frame_must_be_hello(node: QdbNode):
    client = await RawClient.connect(node.address)
    try:
        await client.send(Request(1, "ping"))
        reply = await client.receive()
        assert isinstance(reply, Error) and reply.name == "PARSE_ERROR"
        assert reply.request_id == 0
        assert await client.read_until_eof() == []
    finally:
        await client.aclose()


async def test_second_hello_is_a_bad_message_not_fatal(node: QdbNode):
    async with raw_client(node.address) as client:
        reply = await client.hello()
        assert isinstance(reply, Error) and reply.name == "PARSE_ERROR"
        assert (await client.call("ping"))["node_id"] == node.node_id


async def test_credentials_are_required_when_configured(tmp_path):
    config = node_config(tmp_path, credentials={"alice": "s3cret"})
    async with open_node(config) as node:
        for auth in (
            None,
            {"user": "alice", "password": "wrong"},
            {"user": "bob", "password": "x"},
        ):
            client = await RawClient.connect(node.address)
            try:
                reply = await client.hello(credentials=auth)
                assert isinstance(reply, Error), auth
                assert reply.name == "UNAUTHENTICATED" and reply.code == 401
                assert await client.read_until_eof() == []
            finally:
                await client.aclose()
        client = await RawClient.connect(node.address)
        try:
            reply = await client.hello(credentials={"user": "alice", "password": "s3cret"})
            assert isinstance(reply, Welcome)
            assert (await client.call("ping"))["node_id"] == node.node_id
        finally:
            await client.aclose()
