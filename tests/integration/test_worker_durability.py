"""redis.durability for the worker, on one Redis with a replica: a batch counts as processed only
once the replica has its write."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from config.keys import Keys
from config.settings import Settings
from tests.faults import redis as own_redis
from tests.integration.test_worker import ROUTE, eventually, running, telemetry
from tests.services import Service
from workers.app import WorkerApp

pytestmark = pytest.mark.integration

PROCESSED = "iotbridge_worker_entries_processed_total"


def _linked(replica: Service) -> bool:
    info = redis.Redis(port=replica.port).info("replication")
    return info.get("master_link_status") == "up"


async def test_a_batch_counts_once_a_frozen_replica_confirms_it(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path
) -> None:
    master = own_redis(tmp_path / "master").start()
    replica = own_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master.port))
    replica.start()
    client = Redis(port=master.port, decode_responses=True)
    try:
        await eventually(lambda: _linked(replica), "the replica in sync", 15)
        durability = {"replicas": 1, "timeout_ms": 200}
        url = f"redis://127.0.0.1:{master.port}/0"
        settings = make_settings(redis={"url": url, "key_prefix": unique, "durability": durability})
        stream = Keys.of(settings.redis).telemetry(ROUTE)
        registry = CollectorRegistry()
        app = WorkerApp(settings, registry)

        def processed() -> float:
            return registry.get_sample_value(PROCESSED, {"route": ROUTE}) or 0

        async def add(first: int, count: int) -> None:
            for seq in range(first, first + count):
                await client.xadd(stream, telemetry(unique, "pump-1", seq, temperature=20.0))

        async with running(app, settings):
            await add(0, 10)
            await eventually(lambda: processed() == 10, "the first entries, confirmed")
            replica.signal(signal.SIGSTOP)
            await add(10, 10)

            async def written_on_the_master() -> bool:
                [group] = await client.xinfo_groups(stream)
                return bool(group["entries-read"] > 10 and group["pending"] == 0)

            # A batch written and acked on the master, which the frozen replica cannot confirm.
            await eventually(written_on_the_master, "a batch written on the master")
            await eventually(lambda: not app.readiness()[0], "the worker to say why")
            assert "0 of 1 replicas confirmed the write within 200 ms" in app.readiness()[1]
            assert processed() == 10
            replica.signal(signal.SIGCONT)
            await eventually(lambda: processed() == 20, "the batch counted once confirmed")
            await eventually(lambda: app.readiness()[0], "the worker ready again")
            await add(20, 10)
            await eventually(lambda: processed() == 30, "the next entries")
        acked = registry.get_sample_value("iotbridge_worker_entries_acked_total", {"route": ROUTE})
        assert acked == 30
    finally:
        replica.signal(signal.SIGCONT)
        await client.aclose()
        replica.stop()
        master.stop()
