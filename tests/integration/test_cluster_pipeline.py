"""The whole pipeline on a Redis Cluster of 3 masters and 3 replicas: publisher -> Mosquitto ->
bridge -> cluster -> 2 workers. The flags of one Redis, and of one worker that never stopped,
through a master killed with -9 and through slots moved while messages flow."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from bridge.redis_nodes import connect
from config.keys import Keys
from config.settings import Settings
from tests.clients import running_bridge, wait_for
from tests.cluster import LocalCluster
from tests.integration.test_cluster_bridge import (
    ROOT,
    ROUTE,
    SHARDS,
    Publishers,
    _drained,
    _flowing,
    _master_of_shard,
    _stored,
    broker,
    healed,
)
from tests.integration.test_worker import GROUP, running
from tests.integration.test_worker_shards import expected_flags, groups_done
from tests.recorded_publisher import rows
from tests.services import Service
from workers.app import WorkerApp
from workers.streams import Entry

pytestmark = pytest.mark.integration

__all__ = ["broker", "healed"]  # fixtures, shared with the bridge's cluster tests

SAMPLES = 250  # per asset: anomalies every 100 samples (tests/recorded_publisher.py)


class Recorded(Publishers):
    """tests/recorded_publisher.py in a process of its own: `assets` x SAMPLES messages."""

    def __init__(self, broker: Service, tag: str, assets: int, workdir: Path) -> None:
        self.assets = assets
        argv = [sys.executable, "-m", "tests.recorded_publisher", "--mqtt-url",
                f"mqtt://127.0.0.1:{broker.port}", "--client-id", f"{tag}-pub",
                "--assets", str(assets), "--samples", str(SAMPLES)]  # fmt: skip
        with (workdir / f"{tag}-publisher.err").open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)

    def sent(self, timeout_s: float = 150) -> set[tuple[str, int]]:
        out, _ = self.proc.communicate(timeout=timeout_s)
        report = json.loads(out)
        assert report["acked"] == report["published"], report
        return {(asset, seq) for asset, seq, _ in rows(self.assets, SAMPLES)}


Flag = tuple[str, str, str, str, str]


def _settings(
    make_settings: Callable[..., Settings], url: str, cluster: bool, broker: Service,
    prefix: str, consumer: str = "w0", **durability: Any,
) -> Settings:  # fmt: skip
    return make_settings(
        mqtt={"url": f"mqtt://127.0.0.1:{broker.port}", "protocol": "5",
              "client_id": f"{prefix}-bridge", "keepalive_s": 10},
        redis={"url": url, "key_prefix": prefix, "cluster": cluster, "stream_shards": SHARDS,
               "durability": durability},
        bridge={"routes": [{"name": ROUTE, "topic": "plant/{site}/{line}/{asset}/telemetry"}],
                "metrics_port": 0, "shutdown_grace_s": 5},
        worker={"metrics_port": 0, "block_ms": 100, "shutdown_grace_s": 5,
                "lease_ttl_ms": 3000, "claim_idle_ms": 2000, "consumer": consumer},
    )  # fmt: skip


@asynccontextmanager
async def _pipeline(settings: Settings) -> AsyncIterator[Any]:
    """A bridge and 2 workers (one consumer group) on `settings`' Redis."""
    async with AsyncExitStack() as stack:
        bridge = await stack.enter_async_context(running_bridge(settings))
        for consumer in ("w0", "w1"):
            own = settings.model_copy(
                update={"worker": settings.worker.model_copy(update={"consumer": consumer})}
            )
            await stack.enter_async_context(running(WorkerApp(own, CollectorRegistry()), own))
        yield bridge


async def _flags(client: Redis, keys: Keys) -> list[Flag]:
    """Every flag, across the anomaly streams (one per shard on a cluster)."""
    out: list[Flag] = []
    for stream in keys.anomaly_streams():
        out += [(f["source_id"], f["asset"], f["detector"], f["value_name"], f["event"])
                for _, f in await client.xrange(stream)]  # fmt: skip
    return out


async def _uninterrupted(client: Redis, settings: Settings) -> list[Flag]:
    """The flags of one worker that never stopped, over what the streams hold."""
    keys = Keys.of(settings.redis)
    by_stream: dict[str, list[Entry]] = {
        stream: list(await client.xrange(stream)) for stream in keys.telemetry_streams(ROUTE)
    }
    return expected_flags(settings, by_stream)


async def _run(settings: Settings, broker: Service, tmp_path: Path, count: int) -> set[Any]:
    keys = Keys.of(settings.redis)
    client = connect(settings.redis, decode_responses=True)
    try:
        async with _pipeline(settings) as bridge:
            publishers = Recorded(broker, keys.prefix, count // SAMPLES, tmp_path)
            sent = await _drained(bridge, publishers)
            await wait_for(groups_done(client, keys, len(sent)), 60, "every entry acked")
    finally:
        await client.aclose()
    return sent


async def test_the_pipeline_loses_nothing_and_raises_the_flags_of_one_worker(
    make_settings: Callable[..., Settings], redis_cluster: LocalCluster, broker: Service,
    unique: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Two workers over 12 shards on 3 masters raise what one worker alone raises over the same
    entries (workers/processing in this process: what it raises on one Redis)."""
    settings = _settings(make_settings, redis_cluster.url, True, broker, unique)
    keys = Keys.of(settings.redis)
    sent = await _run(settings, broker, tmp_path, 20_000)
    stored = _stored(redis_cluster, keys)
    assert set(stored) == sent
    assert max(stored.values()) == 1
    client = connect(settings.redis, decode_responses=True)
    try:
        flags, expected = await _flags(client, keys), await _uninterrupted(client, settings)
    finally:
        await client.aclose()
    print(f"pipeline: sent {len(sent)}, stored {len(stored)}, flags {len(flags)}")
    assert len(expected) >= 20
    assert len(flags) == len(set(flags)), "no duplicate flag"
    assert sorted(flags) == sorted(expected)


async def test_a_master_killed_under_the_pipeline_loses_nothing_and_flags_as_uninterrupted(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cluster = healed
    settings = _settings(make_settings, cluster.url, True, broker, unique, replicas=1,
                         timeout_ms=500)  # fmt: skip
    keys = Keys.of(settings.redis)
    victim = _master_of_shard(cluster, keys, 0)
    client = connect(settings.redis, decode_responses=True)
    try:
        async with _pipeline(settings) as bridge:
            publishers = Recorded(broker, unique, 400, tmp_path)
            try:
                await _flowing(bridge, 20_000)
                cluster.kill(victim)
                await asyncio.to_thread(cluster.wait_promoted, victim)
                # No replica confirms the promoted master's writes until the node is back.
                await asyncio.to_thread(cluster.restart, victim)
                sent = await _drained(bridge, publishers)
            finally:
                publishers.kill()
            await wait_for(groups_done(client, keys, len(sent)), 90, "every entry acked")
        flags, expected = await _flags(client, keys), await _uninterrupted(client, settings)
    finally:
        await client.aclose()
    stored = _stored(cluster, keys)
    print(f"master killed: sent {len(sent)}, stored {len(stored)}, flags {len(flags)}")
    assert len(sent) >= 97_000
    assert set(stored) == sent
    assert max(stored.values()) == 1
    assert len(expected) >= 20
    assert len(flags) == len(set(flags)), "no duplicate flag"
    assert sorted(flags) == sorted(expected)


# redis-py's cluster client (8.1) reads the slot table again after a MOVED through node objects it
# makes for the occasion, and leaves one of them, with its connections, to the collector: after
# the event loop has closed, "Unclosed ClusterNode" of a master and sockets to it are reported
# (seen in 6 of 10 runs of this file here). What the test checks is what was stored, acked and
# flagged; a warning raised while it runs still fails it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_slots_moved_under_the_pipeline_keep_groups_pending_entries_and_flags(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cluster = healed
    settings = _settings(make_settings, cluster.url, True, broker, unique)
    keys = Keys.of(settings.redis)
    client = connect(settings.redis, decode_responses=True)
    moved = [keys.telemetry(ROUTE, shard) for shard in (0, 1)]
    try:
        async with _pipeline(settings) as bridge:
            publishers = Recorded(broker, unique, 160, tmp_path)
            try:
                await _flowing(bridge, 10_000)
                for stream in moved:
                    before = await client.xinfo_groups(stream)
                    target = next(
                        p for p in cluster.masters() if p != cluster.master_of_key(stream)
                    )
                    await asyncio.to_thread(cluster.reshard, stream, target)
                    # The group and its position moved with the stream, pending entries included.
                    [after] = await client.xinfo_groups(stream)
                    assert after["name"] == GROUP
                    assert after["entries-read"] >= before[0]["entries-read"]
                sent = await _drained(bridge, publishers)
            finally:
                publishers.kill()
            await wait_for(groups_done(client, keys, len(sent)), 60, "every entry acked")
        flags, expected = await _flags(client, keys), await _uninterrupted(client, settings)
    finally:
        await client.aclose()
    stored = _stored(cluster, keys)
    print(f"slots moved: sent {len(sent)}, stored {len(stored)}, flags {len(flags)}")
    assert set(stored) == sent
    assert max(stored.values()) == 1
    assert len(expected) >= 20
    assert sorted(flags) == sorted(expected)
