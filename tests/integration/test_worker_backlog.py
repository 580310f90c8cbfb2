"""The worker draining a backlog against a real redis-server: batches decoded column-wise, each
batch's write in flight while the next is processed. The anomalies and the checkpoint must be
exactly those of the same entries fed one by one."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from config.keys import Keys
from config.settings import Settings
from tests.integration.test_worker import (
    GROUP,
    ROUTE,
    all_acked,
    anomalies,
    entries,
    eventually,
    running,
    telemetry,
)
from workers.anomaly import AnomalyEvent
from workers.app import WorkerApp
from workers.detectors import build_checks
from workers.sample import decode_entry
from workers.state import Engine, ShardState, shards_of

pytestmark = pytest.mark.integration

ASSETS = 150
STEPS = 20


@pytest.fixture
async def redis(redis_url: str, unique: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{unique}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_a_backlog_gives_the_flags_and_checkpoint_of_one_by_one(
    make_settings: Callable[..., Settings], redis: Redis, unique: str
) -> None:
    # Every detector but staleness, whose flags depend on the wall clock.
    settings = make_settings(worker={"batch_size": 100, "detectors": {"staleness": []}})
    keys = Keys(unique)
    stream = keys.telemetry(ROUTE)
    rng = random.Random(7)
    async with redis.pipeline(transaction=False) as pipe:
        for step in range(STEPS):
            for a in range(ASSETS):
                spike = 60.0 if rng.random() < 0.01 else 0.0
                seq = step + (5 if rng.random() < 0.005 else 0)  # a few samples lost
                pipe.xadd(stream, telemetry(unique, f"m{a:03d}", seq,
                                            temperature=50 + rng.gauss(0, 1) + spike,
                                            vibration=2 + rng.gauss(0, 0.1)))  # fmt: skip
        await pipe.execute()
    written = await entries(redis, stream)
    assert len(written) == ASSETS * STEPS

    async with running(WorkerApp(settings, CollectorRegistry()), settings):
        await eventually(all_acked(redis, stream, len(written)), "the backlog read and acked")

    [shard] = shards_of(keys, GROUP, [ROUTE])
    expected = ShardState(shard, Engine(build_checks(settings.worker.detectors)))
    events: list[AnomalyEvent] = []
    for entry_id, fields in written:
        expected.feed(decode_entry(ROUTE, entry_id, fields), events)
    assert len({(e.detector, e.event) for e in events}) >= 4  # starts and ends of several kinds
    assert await anomalies(redis, keys) == [e.to_fields(stream) for e in events]

    saved = await redis.hgetall(shard.checkpoint)
    assert json.loads(saved["meta"])["last_id"] == written[-1][0]
    rows = {field[2:]: base64.b64decode(value) for field, value in saved.items() if field != "meta"}
    assert rows == {asset: state.row.tobytes() for asset, state in expected.assets.items()}
