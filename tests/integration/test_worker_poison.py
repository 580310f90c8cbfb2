"""A poison entry among good ones, with a Redis restart in the middle: its delivery count, kept by
Redis (append-only file), brings it to the dead-letter stream after exactly `max_deliveries`
deliveries, and everything else is processed once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from config.keys import Keys
from config.settings import Settings, ThresholdRule
from tests.faults import redis as own_redis
from tests.integration.test_worker import (
    GROUP,
    ROUTE,
    entries,
    eventually,
    group_info,
    running,
    telemetry,
)
from workers.anomaly import AnomalyEvent
from workers.app import WorkerApp
from workers.detectors import Check
from workers.detectors.base import Row
from workers.detectors.threshold import ThresholdCheck
from workers.sample import Sample

pytestmark = pytest.mark.integration


class Failing(Check):
    """A detector with a bug that one asset's samples hit."""

    detector: ClassVar[str] = "failing"
    width: ClassVar[int] = 1
    initial: ClassVar[tuple[float, ...]] = (0.0,)
    open_slot: ClassVar[int] = 0

    def __init__(self) -> None:
        super().__init__(ThresholdRule(value="temperature", max=1.0), None)
        self.calls = 0

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        if sample.asset == "poison":
            self.calls += 1
            raise RuntimeError("boom")


async def test_a_poison_entry_is_dead_lettered_after_max_deliveries_across_a_redis_restart(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path
) -> None:
    service = own_redis(tmp_path / "redis", "--appendonly", "yes")
    service.start()
    url = f"redis://127.0.0.1:{service.port}/0"
    worker = {"max_deliveries": 3, "claim_idle_ms": 400, "lease_ttl_ms": 1500}
    settings = make_settings(redis={"url": url, "key_prefix": unique}, worker=worker)
    keys = Keys(unique)
    stream = keys.telemetry(ROUTE)
    failing = Failing()
    registry = CollectorRegistry()
    app = WorkerApp(settings, registry, [ThresholdCheck(ThresholdRule(value="temperature", max=90.0)), failing])  # fmt: skip
    redis = Redis.from_url(url, decode_responses=True)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for seq in range(999):
                temperature = 95.0 if seq % 100 == 50 else 50.0
                pipe.xadd(stream, telemetry(unique, f"g{seq % 10}", seq, temperature=temperature))
                if seq == 500:
                    pipe.xadd(stream, telemetry(unique, "poison", 0, temperature=20.0))
            ids = await pipe.execute()
        poison_id = ids[501]

        async def delivered_and_acked() -> bool:
            # Redis 7.0 restarted from an append-only file reports no entries-read: use the ids.
            info = await group_info(redis, stream)
            return info.get("last-delivered-id") == ids[-1] and info.get("pending") == 0

        route = {"route": ROUTE}

        def others_written() -> bool:
            # The first failed delivery, and the write of every other entry settled: Redis
            # restarted while a write is in flight may apply it unseen, its entries then acked in
            # Redis but not counted here.
            processed = registry.get_sample_value("iotbridge_worker_entries_processed_total", route)
            return failing.calls >= 1 and processed == 999

        async with running(app, settings):
            await eventually(others_written, "the first failed delivery, every other entry written")
            service.restart()
            await eventually(delivered_and_acked, "every entry acked", timeout_s=10)
            letters = [f for _, f in await entries(redis, keys.worker_dead_letters)]
        assert failing.calls == 3
        reconnects = {"target": "redis"}
        assert registry.get_sample_value("iotbridge_worker_reconnects_total", reconnects), (
            "restart seen"
        )
        [letter] = letters
        assert (letter["source_id"], letter["reason"], letter["deliveries"]) == (
            poison_id,
            "poison",
            "3",
        )
        assert letter["error"] == "RuntimeError: boom"
        assert json.loads(letter["entry"])["asset"] == "poison"
        assert registry.get_sample_value("iotbridge_worker_entries_processed_total", route) == 999
        assert registry.get_sample_value("iotbridge_worker_entries_acked_total", route) == 1000
        poison = {**route, "reason": "poison"}
        assert (
            registry.get_sample_value("iotbridge_worker_entries_dead_lettered_total", poison) == 1
        )
        flags = [f for _, f in await entries(redis, keys.anomalies)]
        assert [f["event"] for f in flags] == ["start", "ended"] * 10, "each good entry once"
        assert (await redis.xpending(stream, GROUP))["pending"] == 0
    finally:
        await redis.aclose()
        service.stop()
