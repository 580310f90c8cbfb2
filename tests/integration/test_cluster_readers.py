"""Every reader against a real Redis Cluster (3 masters, 3 replicas on loopback) with 4 shards:
the admin API's anomaly query and live stream across every shard's anomaly stream (ids that
collide across streams included), its stream listing, the audit command, and the token commands
with a gateway that takes their tokens."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.record import entry_key
from bridge.redis_nodes import connect, slot_of
from config.keys import Keys, shard_of
from config.settings import Settings
from simulators import acked
from tests.clients import wait_for
from tests.cluster import LocalCluster
from tests.integration.test_gateway_admin import (
    anomaly,
    client,
    gateway_settings,
    pump,
    running_gateway,
    sse_events,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 4


@pytest.fixture
def cluster_settings(
    make_settings: Callable[..., Settings], unique: str, redis_cluster: LocalCluster
) -> Settings:
    redis = {"url": redis_cluster.url, "cluster": True, "stream_shards": SHARDS,
             "key_prefix": unique}  # fmt: skip
    return gateway_settings(make_settings, unique, redis=redis)


@pytest.fixture
async def db(cluster_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = connect(cluster_settings.redis)
    yield client
    await client.aclose()


def command_env(settings: Settings) -> dict[str, str]:
    r = settings.redis
    return {**os.environ, "IOTBRIDGE_REDIS__URL": r.url, "IOTBRIDGE_REDIS__CLUSTER": "true",
            "IOTBRIDGE_REDIS__STREAM_SHARDS": str(r.stream_shards),
            "IOTBRIDGE_REDIS__KEY_PREFIX": r.key_prefix}  # fmt: skip


async def iotbridge(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "bridge.cli", *argv], env=command_env(settings),
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_anomalies_of_every_shard_are_queried_in_id_order_and_followed_live(
    cluster_settings: Settings, db: aioredis.Redis
) -> None:
    keys = Keys.of(cluster_settings.redis)
    streams = keys.anomaly_streams()
    assert len(set(map(slot_of, streams))) == SHARDS
    # The same ids in every shard's stream (each master makes its own: they do collide), then
    # one more in each, written in another order.
    base = int(time.time() * 1000) - 60_000
    written: list[tuple[tuple[int, int], int, str]] = []  # (id, shard, asset)
    for n in range(3):
        for shard in range(SHARDS):
            entry_id = await db.xadd(streams[shard], anomaly(f"a{shard}", "threshold", n),
                                     id=f"{base + n}-0")  # fmt: skip
            written.append((entry_key(entry_id.decode()), shard, f"a{shard}"))
    for shard in (2, 0, 3, 1):
        entry_id = await db.xadd(streams[shard], anomaly(f"a{shard}", "rate", 9.0))
        written.append((entry_key(entry_id.decode()), shard, f"a{shard}"))
    expected = [(f"{ms}-{seq}", asset) for (ms, seq), _, asset in sorted(written)]

    async with running_gateway(cluster_settings) as app, client(app) as http:
        everything = (await http.get("/api/v1/anomalies")).json()
        assert [(a["id"], a["asset"]) for a in everything["items"]] == expected
        assert everything["next_cursor"] is None
        for count in (1, 3):
            got, cursor = [], None
            while True:
                params = {"count": count, **({"cursor": cursor} if cursor else {})}
                page = (await http.get("/api/v1/anomalies", params=params)).json()
                assert len(page["items"]) <= count
                got += [(a["id"], a["asset"]) for a in page["items"]]
                if (cursor := page["next_cursor"]) is None:
                    break
            assert got == expected, count
        only = (await http.get("/api/v1/anomalies", params={"asset": "a2"})).json()
        assert [a["id"] for a in only["items"]] == [i for i, asset in expected if asset == "a2"]
        refused = await http.get("/api/v1/anomalies", params={"cursor": f"{base}-0:{SHARDS}"})
        assert refused.status_code == 400

        # Live: an event written to each shard's stream reaches a client, whatever the order.
        async with http.stream("GET", "/api/v1/anomalies/stream") as live:
            events = sse_events(live)
            assert (await anext(events))["event"] == "ready"
            new = {}
            for shard in (3, 1, 0, 2):
                new[shard] = await db.xadd(streams[shard], anomaly(f"a{shard}", "spike", 1.0))
            async with asyncio.timeout(10):
                got_live = [await anext(events) for _ in range(SHARDS)]
        assert sorted(json.loads(e["data"])["asset"] for e in got_live) == ["a0", "a1", "a2", "a3"]
        # Each event's id is the position in every stream; the last one's, every newest id.
        assert all(len(e["id"].split(",")) == SHARDS for e in got_live)
        assert got_live[-1]["id"].split(",") == [new[s].decode() for s in range(SHARDS)]
        # Resuming from the first event gets the other three, from Redis.
        headers = {"Last-Event-ID": got_live[0]["id"]}
        async with http.stream("GET", "/api/v1/anomalies/stream", headers=headers) as resumed:
            events = sse_events(resumed)
            assert (await anext(events))["event"] == "ready"
            async with asyncio.timeout(10):
                missed = [await anext(events) for _ in range(SHARDS - 1)]
        assert sorted(json.loads(e["data"])["asset"] for e in [got_live[0], *missed]) == [
            "a0", "a1", "a2", "a3"
        ]  # fmt: skip
        assert missed[-1]["id"] == got_live[-1]["id"]
        wrong = await http.get("/api/v1/anomalies/stream", headers={"Last-Event-ID": "1-0,2-0"})
        assert wrong.status_code == 400


async def test_streams_lists_every_shard_stream_of_a_cluster(
    cluster_settings: Settings, db: aioredis.Redis
) -> None:
    keys = Keys.of(cluster_settings.redis)
    prefix = cluster_settings.redis.key_prefix
    assets = [f"a{n}" for n in range(12)]
    async with running_gateway(cluster_settings) as app, client(app) as http:
        for asset in assets:
            topic = f"{prefix}/plant/s1/l1/{asset}/telemetry"
            await asyncio.gather(*(app.ingestor.ingest(topic, pump(i, 1)) for i in range(5)))
        shard0 = keys.telemetry("telemetry", 0)
        await db.xgroup_create(shard0, "readers", id="0")
        await db.xreadgroup("readers", "r1", {shard0: ">"}, count=3)
        streams = (await http.get("/api/v1/streams")).json()
        dead = await app.ingestor.ingest(f"{prefix}/plant/s1/l1/a1/telemetry", b"not json")
        letters = (await http.get("/api/v1/dead-letters")).json()
        # Still invalid: dead-lettered again, the old one removed (one stream, also here).
        replayed = (await http.post("/api/v1/dead-letters/replay", json={})).json()
        after = (await http.get("/api/v1/dead-letters")).json()
    assert [s["key"] for s in streams] == keys.telemetry_streams("telemetry")
    per_shard = [5 * sum(1 for a in assets if shard_of(a, SHARDS) == s) for s in range(SHARDS)]
    assert [s["length"] for s in streams] == per_shard
    assert all(s["exists"] == (n > 0) for s, n in zip(streams, per_shard, strict=True))
    [group] = streams[0]["groups"]
    assert (group["name"], group["pending"], group["lag"]) == ("readers", 3, per_shard[0] - 3)
    assert dead.status == "rejected"
    assert [(d["reason"], d["topic"]) for d in letters["items"]] == [
        ("json", f"{prefix}/plant/s1/l1/a1/telemetry")
    ]
    assert (replayed["matched"], replayed["rejected"]) == (1, 1)
    assert [d["reason"] for d in after["items"]] == ["json"]
    assert after["items"][0]["id"] != letters["items"][0]["id"]


async def test_audit_reads_every_shard_and_reports_what_is_missing(
    cluster_settings: Settings, db: aioredis.Redis, tmp_path: Path
) -> None:
    keys = Keys.of(cluster_settings.redis)
    prefix = cluster_settings.redis.key_prefix
    assets = [f"a{n}" for n in range(8)]
    async with running_gateway(cluster_settings) as app:
        for asset in assets:
            topic = f"{prefix}/plant/s1/l1/{asset}/telemetry"
            outcomes = await asyncio.gather(
                *(app.ingestor.ingest(topic, pump(i, 1)) for i in range(25))
            )
            assert {o.status for o in outcomes} == {"stored"}
    streams = keys.telemetry_streams("telemetry")
    assert all([await db.xlen(key) for key in streams])  # every shard has some
    acked_file = tmp_path / "acked.jsonl"
    with acked_file.open("w") as out:
        acked.write(out, {"route": "telemetry"},
                    [{"asset": a, "acked": [[0, 0, 24]]} for a in assets])  # fmt: skip

    clean = await iotbridge(cluster_settings, "audit", "--acked", str(acked_file))
    assert clean.returncode == 0, clean.stderr
    report = json.loads(clean.stdout)
    assert (report["acked"], report["found"], report["entries"]) == (200, 200, 200), report
    assert (report["lost"], report["duplicated"], report["unexpected"]) == (0, 0, 0)
    assert report["streams"] == streams

    # One entry deleted, one stored again in another shard's stream: both are seen.
    victim = shard_of("a3", SHARDS)
    entries = await db.xrange(streams[victim])
    gone = next(i for i, f in entries if f[b"asset"] == b"a3" and f[b"seq"] == b"7")
    await db.xdel(streams[victim], gone)
    again = next(f for _, f in entries if f[b"asset"] == b"a3" and f[b"seq"] == b"9")
    await db.xadd(streams[(victim + 1) % SHARDS], again)
    broken = await iotbridge(cluster_settings, "audit", "--acked", str(acked_file))
    assert broken.returncode == 1, broken.stderr
    report = json.loads(broken.stdout)
    assert (report["lost"], report["duplicated"]) == (1, 1), report
    assert report["examples"]["lost"] == ["a3/7"]


async def test_token_commands_against_a_cluster_and_a_gateway_that_takes_their_tokens(
    cluster_settings: Settings,
) -> None:
    settings = cluster_settings.model_copy(
        update={"gateway": cluster_settings.gateway.model_copy(update={"token_refresh_s": 0.5})}
    )
    created = await iotbridge(settings, "token", "create", "--asset", "press-*")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    listed = await iotbridge(settings, "token", "list")
    assert listed.returncode == 0, listed.stderr
    [record] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert record["asset"] == "press-*"
    assert token.split("_")[1] == record["id"]
    assert token not in listed.stdout

    topic = f"{settings.redis.key_prefix}/plant/s1/l1/press-4/telemetry"
    async with running_gateway(settings) as app, client(app, auth=None) as http:

        async def post(seq: int) -> int:
            answer = await http.post(f"/api/v1/topics/{topic}", content=pump(seq, 1),
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})  # fmt: skip
            return answer.status_code

        assert await post(1) == 200
        revoked = await iotbridge(settings, "token", "revoke", record["id"])
        assert revoked.returncode == 0, revoked.stderr
        assert (await iotbridge(settings, "token", "revoke", record["id"])).returncode == 1
        await wait_for(lambda: refused(post), 10, "the revocation to be seen")
    listed = await iotbridge(settings, "token", "list")
    assert (listed.returncode, listed.stdout) == (0, "")


async def refused(post: Callable[[int], Any]) -> bool:
    return bool(await post(2) == 401)


async def test_a_cluster_that_cannot_be_reached_is_one_line_and_exit_2(
    cluster_settings: Settings,
) -> None:
    settings = cluster_settings.model_copy(
        update={"redis": cluster_settings.redis.model_copy(update={"url": "redis://127.0.0.1:1/0"})}
    )
    answer = await iotbridge(settings, "token", "list")
    assert answer.returncode == 2
    assert len(answer.stderr.strip().splitlines()) == 1
    assert "127.0.0.1:1" in answer.stderr
