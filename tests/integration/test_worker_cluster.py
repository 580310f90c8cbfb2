"""Workers on a real Redis Cluster (3 masters, 3 replicas): the shards split between two workers,
every entry acked once and the same flags as on one Redis, no CROSSSLOT on any node; a worker
going on through a failover of a master that holds some of its shards, and after such a master is
killed (SIGKILL) and its replica promoted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from config.keys import Keys
from config.settings import Settings
from tests.cluster import LocalCluster
from tests.integration.test_worker import ROUTE, entries, eventually, running
from tests.integration.test_worker_shards import (
    SHARDS,
    expected_flags,
    groups_done,
    recorded_input,
    settings_for,
    write,
)
from workers.app import WorkerApp
from workers.streams import Entry

pytestmark = pytest.mark.integration

Flag = tuple[str, ...]


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    yield redis_cluster
    redis_cluster.heal()


@pytest.fixture
async def nodes(cluster: LocalCluster) -> AsyncIterator[Redis]:
    """redis-py's cluster client, typed as the plain one the shared helpers take."""
    client = RedisCluster.from_url(cluster.seed_url, decode_responses=True)
    yield cast("Redis", client)
    await client.aclose()


def on_cluster(
    make_settings: Callable[..., Settings], cluster: LocalCluster, prefix: str, consumer: str
) -> Settings:
    redis = {"url": cluster.url, "cluster": True, "key_prefix": prefix, "stream_shards": SHARDS}
    fast = {"lease_ttl_ms": 1500, "claim_idle_ms": 1000, "consumer": consumer}
    return make_settings(redis=redis, worker=fast)


def sample(registries: list[CollectorRegistry], name: str) -> float:
    return sum(r.get_sample_value(name, {"route": ROUTE}) or 0 for r in registries)


async def all_flags(redis: Redis, keys: Keys, *fields: str) -> list[Flag]:
    """`fields` of every anomaly, across the anomaly streams (one per shard on a cluster)."""
    return [tuple(flag[name] for name in fields)
            for stream in keys.anomaly_streams()
            for _, flag in await entries(redis, stream)]  # fmt: skip


async def assert_flags_of_entries(
    nodes: Redis, keys: Keys, settings: Settings, count: int | None = None
) -> None:
    """The flags written are those the stored entries give run straight through, none twice;
    `count`: the entries stored, if given."""
    written = await all_flags(nodes, keys, "source_id", "asset", "detector", "value_name",
                              "event")  # fmt: skip
    streams = keys.telemetry_streams(ROUTE)
    by_stream: dict[str, list[Entry]] = {s: list(await entries(nodes, s)) for s in streams}
    if count is not None:
        assert sum(map(len, by_stream.values())) == count
    assert len(written) == len(set(written)), "no duplicate flag"
    assert sorted(written) == sorted(expected_flags(settings, by_stream))


def crossslot_errors(cluster: LocalCluster) -> int:
    """CROSSSLOT replies sent by any node since it started (INFO errorstats)."""
    total = 0
    for port in cluster.live_ports():
        stats = cast("dict[str, Any]", cluster.client(port).info("errorstats"))
        total += int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))
    return total


async def test_two_workers_share_a_clusters_shards_and_raise_the_flags_of_one_redis(
    make_settings: Callable[..., Settings], redis_url: str, cluster: LocalCluster, nodes: Redis,
    unique: str,
) -> None:  # fmt: skip
    rows = recorded_input(assets=40, samples=75)
    fields = ("asset", "ts", "detector", "value_name", "event")

    one = Keys(f"{unique}a", SHARDS)
    solo = settings_for(make_settings, redis_url, one.prefix, "solo")
    plain = Redis.from_url(redis_url, decode_responses=True)
    try:
        await write(plain, one, one.prefix, rows)
        async with running(WorkerApp(solo, CollectorRegistry()), solo):
            await eventually(groups_done(plain, one, len(rows)), "one Redis done", timeout_s=30)
        alone = await all_flags(plain, one, *fields)
    finally:
        await plain.aclose()

    pair = [on_cluster(make_settings, cluster, f"{unique}c", f"w{i}") for i in range(2)]
    keys = Keys.of(pair[0].redis)
    registries = [CollectorRegistry() for _ in pair]
    apps = [WorkerApp(s, r) for s, r in zip(pair, registries, strict=True)]
    async with running(apps[0], pair[0]), running(apps[1], pair[1]):
        await eventually(lambda: [len(app.consumer.owned) for app in apps] == [4, 4],
                         "4 shards each")  # fmt: skip
        assert not set(apps[0].consumer.owned) & set(apps[1].consumer.owned)
        await write(nodes, keys, keys.prefix, rows)
        await eventually(groups_done(nodes, keys, len(rows)), "the cluster done", timeout_s=30)
        assert sample(registries, "iotbridge_worker_entries_acked_total") == len(rows)
        assert sample(registries, "iotbridge_worker_entries_processed_total") == len(rows)
        assert all(sample([r], "iotbridge_worker_entries_processed_total") for r in registries)

    shared = await all_flags(nodes, keys, *fields)
    assert len(alone) > 80
    assert len(shared) == len(set(shared)), "no duplicate flag"
    assert sorted(shared) == sorted(alone)
    # Each shard's anomalies are in its own stream, on the master of its slot.
    lengths = [await nodes.xlen(stream) for stream in keys.anomaly_streams()]
    assert sum(lengths) == len(shared)
    masters = {
        cluster.master_of_key(stream)
        for stream, length in zip(keys.anomaly_streams(), lengths, strict=True)
        if length
    }
    assert len(masters) > 1
    assert crossslot_errors(cluster) == 0


async def test_a_worker_goes_on_through_a_failover_of_a_master_holding_its_shards(
    make_settings: Callable[..., Settings], cluster: LocalCluster, nodes: Redis, unique: str
) -> None:
    settings = on_cluster(make_settings, cluster, unique, "w0")
    keys = Keys.of(settings.redis)
    rows = recorded_input(assets=24, samples=75)
    # The failover comes mid-anomaly: temperature excursions (30..37) are open.
    before = [row for row in rows if row["seq"] < 34]
    after = [row for row in rows if row["seq"] >= 34]
    registry = CollectorRegistry()
    app = WorkerApp(settings, registry)
    old = cluster.master_of_key(keys.telemetry(ROUTE, 0))
    replica = cluster.replica_of(old)
    async with running(app, settings):
        await write(nodes, keys, unique, before)
        await eventually(groups_done(nodes, keys, len(before)), "before the failover", 20)
        failing_over = asyncio.create_task(asyncio.to_thread(cluster.failover, replica))
        # Written while the master hands its slots over.
        for start in range(0, len(after), 100):
            await write(nodes, keys, unique, after[start : start + 100])
        await failing_over
        assert cluster.master_of_key(keys.telemetry(ROUTE, 0)) == replica
        await eventually(groups_done(nodes, keys, len(rows)), "after the failover", 30)
        assert sample([registry], "iotbridge_worker_entries_acked_total") == len(rows)
        assert app.readiness() == (True, "ready")

    await assert_flags_of_entries(nodes, keys, settings, len(rows))
    assert crossslot_errors(cluster) == 0


async def test_a_worker_goes_on_after_the_master_of_its_shards_is_killed(
    make_settings: Callable[..., Settings], cluster: LocalCluster, nodes: Redis, unique: str
) -> None:
    settings = on_cluster(make_settings, cluster, unique, "w0")
    keys = Keys.of(settings.redis)
    rows = recorded_input(assets=24, samples=50)
    before = [row for row in rows if row["seq"] < 34]
    after = [row for row in rows if row["seq"] >= 34]
    registry = CollectorRegistry()
    app = WorkerApp(settings, registry)
    async with running(app, settings):
        await write(nodes, keys, unique, before)
        await eventually(groups_done(nodes, keys, len(before)), "before the kill", 20)
        # Everything replicated, so the promoted replica has what the worker wrote.
        await asyncio.to_thread(cluster.wait_healthy)
        old = cluster.master_of_key(keys.telemetry(ROUTE, 0))
        await asyncio.to_thread(cluster.kill, old)
        await eventually(lambda: not app.readiness()[0], "the worker to see the master gone")
        new = await asyncio.to_thread(cluster.wait_promoted, old)
        assert cluster.master_of_key(keys.telemetry(ROUTE, 0)) == new
        await write(nodes, keys, unique, after)
        await eventually(groups_done(nodes, keys, len(rows)), "after the promotion", 30)
        assert sample([registry], "iotbridge_worker_entries_acked_total") == len(rows)
        assert app.readiness() == (True, "ready")

    await assert_flags_of_entries(nodes, keys, settings)


async def test_a_worker_goes_on_while_the_slot_of_its_shard_moves_to_another_master(
    make_settings: Callable[..., Settings], cluster: LocalCluster, nodes: Redis, unique: str
) -> None:
    settings = on_cluster(make_settings, cluster, unique, "w0")
    keys = Keys.of(settings.redis)
    rows = recorded_input(assets=24, samples=75)
    before = [row for row in rows if row["seq"] < 34]
    after = [row for row in rows if row["seq"] >= 34]
    registry = CollectorRegistry()
    app = WorkerApp(settings, registry)
    stream = keys.telemetry(ROUTE, 0)
    target = next(port for port in cluster.masters() if port != cluster.master_of_key(stream))
    async with running(app, settings):
        await write(nodes, keys, unique, before)
        await eventually(groups_done(nodes, keys, len(before)), "before the move", 20)
        moving = asyncio.create_task(asyncio.to_thread(cluster.reshard, stream, target))
        # Written while the slot's keys go over (MIGRATING, IMPORTING: ASK, TRYAGAIN).
        for start in range(0, len(after), 50):
            await write(nodes, keys, unique, after[start : start + 50])
        await moving
        assert cluster.master_of_key(stream) == target
        await eventually(groups_done(nodes, keys, len(rows)), "after the move", 30)
        assert sample([registry], "iotbridge_worker_entries_acked_total") == len(rows)

    await assert_flags_of_entries(nodes, keys, settings)
    # A slot on the move is waited out, never taken for a poison entry.
    assert [await nodes.xlen(s) for s in keys.worker_dead_letter_streams()] == [0] * SHARDS
    assert crossslot_errors(cluster) == 0
