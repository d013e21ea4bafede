"""Seed 000's TC-TR-013 as a whole cluster: a rolling restart under load (issue 9).

Three node processes; one client runs point reads and keyed writes from
several tasks while node 0, then 1, then 2 is shut down gracefully (SIGTERM:
GOAWAY, in-flight work finishes within the grace period) and started again,
each one UP in the client before the next goes. The application must see no
error at all, every acknowledged write must be stored exactly once, and each
restarted node must get traffic again. The cluster runs over TLS with
credentials, as the README's main job does: the restarted nodes resume the
client's session by its token, the password is sent once.

On a busy host this found a driver defect: with one node down, a stall of the
host made the other two nodes' in-flight requests miss their attempt timeouts
together and silence opened both breakers, so the application saw CircuitOpen
(regression tests in tests/unit/test_rolling_restart_breakers.py).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trio
import trustme

import qdb_client
from qdb_client.testing import TestCluster

WRITERS = 12
READERS = 12
GRACE = 2.0
OPTIONS: dict[str, Any] = dict(
    heartbeat_interval=0.5,
    ping_timeout=0.3,
    reconnect_initial=0.1,
    reconnect_max=0.5,
    slow_start=0.0,
    connect_timeout=2.0,
    request_timeout=5.0,
    random_seed=13,
)


def node_state(client: qdb_client.Client, index: int) -> dict[str, Any]:
    return client.statistics()["nodes"][index]


async def wait_for(predicate: Any, what: str, limit: float = 10.0) -> None:
    with trio.move_on_after(limit) as scope:
        while not predicate():  # noqa: ASYNC110 - polling statistics snapshots
            await trio.sleep(0.01)
    assert not scope.cancelled_caught, f"not within {limit} s: {what}"


async def roll(cluster: TestCluster, client: qdb_client.Client, index: int) -> int:
    """One step of the rolling restart: node ``index`` shut down gracefully,
    started again, UP in the client; returns the requests it was then sent
    (waiting for more than 10)."""
    await cluster.stop(index, grace=GRACE)
    await cluster.restart(index)
    await wait_for(lambda: node_state(client, index)["state"] == "UP", f"node {index} UP again")
    sent = node_state(client, index)["requests_sent"]
    await wait_for(
        lambda: node_state(client, index)["requests_sent"] > sent + 10,
        f"traffic back on node {index}",
    )
    return node_state(client, index)["requests_sent"] - sent


def tls_and_auth(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cluster options, client options) for TLS nodes that require credentials."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = tmp_path / "node.pem", tmp_path / "node.key"
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key.write_bytes(cert.private_key_pem.bytes())
    context = ssl.create_default_context()
    ca.configure_trust(context)
    password = "tc-tr-013-password"
    cluster = {
        "tls_cert": chain,
        "tls_key": key,
        "credentials": {"ada": password},
        "control_options": {"tls": context, "credentials": {"user": "ada", "password": password}},
    }
    return cluster, {"tls": context, "credentials": ("ada", password)}


async def test_tc_tr_013_rolling_restart_under_load_no_errors_no_lost_or_duplicate_writes(
    tmp_path: Path,
) -> None:
    cluster_options, client_options = tls_and_auth(tmp_path)
    async with (
        TestCluster.start_subprocesses(
            n=3, directory=tmp_path / "cluster", **cluster_options
        ) as cluster,
        qdb_client.open_client(cluster.addresses, **OPTIONS, **client_options) as client,
    ):
        await wait_for(
            lambda: all(n["state"] == "UP" for n in client.statistics()["nodes"]), "all nodes UP"
        )
        await client.execute("CREATE TABLE kv (id INTEGER PRIMARY KEY, k TEXT NOT NULL, v INT)")
        await client.execute("INSERT INTO kv (k, v) VALUES ('seed', 0)", idempotency_key="seed")
        errors: list[BaseException] = []
        acknowledged: list[str] = []
        reads = 0
        stop = trio.Event()

        async def writer(worker: int) -> None:
            seq = 0
            while not stop.is_set():
                key = f"w{worker}-{seq}"
                try:
                    await client.execute(
                        "INSERT INTO kv (k, v) VALUES (?, ?)", [key, seq], idempotency_key=key
                    )
                    acknowledged.append(key)
                except qdb_client.QdbError as exc:
                    errors.append(exc)
                seq += 1

        async def reader() -> None:
            nonlocal reads
            while not stop.is_set():
                try:
                    result = await client.query("SELECT v FROM kv WHERE k = ?", ["seed"])
                    assert result.scalar() == 0
                    reads += 1
                except qdb_client.QdbError as exc:
                    errors.append(exc)

        served_after_restart: list[int] = []
        async with trio.open_nursery() as nursery:
            for worker in range(WRITERS):
                nursery.start_soon(writer, worker)
            for _ in range(READERS):
                nursery.start_soon(reader)
            await wait_for(lambda: len(acknowledged) >= 20 and reads >= 20, "load running")
            for index in range(3):
                served_after_restart.append(await roll(cluster, client, index))
            done = len(acknowledged)
            await wait_for(lambda: len(acknowledged) > done, "writes after the restarts")
            stop.set()

        assert errors == []
        assert all(served > 10 for served in served_after_restart), served_after_restart
        rows = await client.query("SELECT k, count(*) FROM kv WHERE k != 'seed' GROUP BY k")
        stored = {row[0]: row[1] for row in rows}
        assert sorted(stored) == sorted(acknowledged)  # no acknowledged write lost, none phantom
        assert set(stored.values()) == {1}  # each stored exactly once
        assert client.statistics()["tls"]
        assert client.statistics()["session"]["password_logins"] == 1
