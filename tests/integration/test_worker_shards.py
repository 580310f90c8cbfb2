"""Workers sharing shards against a real redis-server: leases balance, the same flags with one worker
or three, a SIGKILLed worker's shards, pending entries and detector state taken over, staleness
raised by the timer with no traffic at all, and the fenced, idempotent write."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from config.keys import Keys, shard_of
from config.settings import Settings
from tests.integration.test_worker import (
    GROUP,
    REPO,
    ROUTE,
    entries,
    eventually,
    running,
    telemetry,
)
from workers.anomaly import AnomalyEvent, Event
from workers.app import WorkerApp
from workers.detectors import build_checks
from workers.outputs import LeaseLost, Outputs
from workers.placement import Placement
from workers.processing import Delivery, process
from workers.state import Engine, Shard, ShardState, shards_of
from workers.streams import Entry
from workers.writes import commit

pytestmark = pytest.mark.integration

SHARDS = 8


@pytest.fixture
async def redis(redis_url: str, unique: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{unique}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def settings_for(
    make_settings: Callable[..., Settings], redis_url: str, prefix: str, consumer: str,
    **worker: Any,
) -> Settings:  # fmt: skip
    redis = {"url": redis_url, "key_prefix": prefix, "stream_shards": SHARDS}
    fast = {"lease_ttl_ms": 1500, "claim_idle_ms": 1000, "consumer": consumer}
    return make_settings(redis=redis, worker={**fast, **worker})


def recorded_input(assets: int, samples: int, seed: int = 7) -> list[dict[str, Any]]:
    """Samples of a small fleet with every kind of anomaly in it, in publishing order."""
    rng = random.Random(seed)
    rows = []
    for seq in range(samples):
        for a in range(assets):
            temperature = 50.0 + a % 7 + rng.gauss(0, 0.5)
            vibration = 2.0 + rng.gauss(0, 0.1)
            pressure = 4.0 + rng.gauss(0, 0.05)
            if a % 5 == 0 and 30 <= seq < 38:
                temperature = 95.0 + rng.random()  # threshold, rate, deviation
            if a % 5 == 1 and seq >= 40:
                pressure = 4.8  # deviation, then flatline
            if a % 5 == 2 and seq in (45, 46, 47):
                continue  # lost upstream: sequence_gap
            rows.append({"asset": f"m{a:03d}", "seq": seq, "temperature": temperature,
                         "vibration": vibration, "pressure": pressure})  # fmt: skip
    return rows


async def write(redis: Redis, keys: Keys, prefix: str, rows: list[dict[str, Any]]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for row in rows:
            values = {k: v for k, v in row.items() if k not in ("asset", "seq")}
            stream = keys.telemetry(ROUTE, shard_of(row["asset"], keys.shards))
            pipe.xadd(stream, telemetry(prefix, row["asset"], row["seq"], **values))
        await pipe.execute()


def groups_done(redis: Redis, keys: Keys, total: int) -> Callable[[], Any]:
    async def check() -> bool:
        read = pending = 0
        for stream in keys.telemetry_streams(ROUTE):
            for group in await redis.xinfo_groups(stream) if await redis.exists(stream) else []:
                if group["name"] == GROUP:
                    read += group["entries-read"] or 0
                    pending += group["pending"]
        return read == total and pending == 0

    return check


async def flags(redis: Redis, keys: Keys) -> list[tuple[str, ...]]:
    return [(f["asset"], f["ts"], f["detector"], f["value_name"], f["event"])
            for _, f in await entries(redis, keys.anomalies)]  # fmt: skip


async def test_workers_balance_the_shards_and_a_leaving_worker_hands_its_shards_over(
    make_settings: Callable[..., Settings], redis_url: str, redis: Redis, unique: str
) -> None:
    registries = [CollectorRegistry(), CollectorRegistry()]
    apps = [WorkerApp(settings_for(make_settings, redis_url, unique, f"w{i}"), registries[i])
            for i in range(2)]  # fmt: skip
    settings = settings_for(make_settings, redis_url, unique, "w0")
    async with running(apps[0], settings):
        async with running(apps[1], settings):
            await eventually(
                lambda: [len(app.consumer.owned) for app in apps] == [4, 4], "4 shards each"
            )
            assert not set(apps[0].consumer.owned) & set(apps[1].consumer.owned)
        left_at = time.monotonic()
        # w1 released its leases and left: w0 takes them at its next heartbeat, not after a TTL.
        await eventually(lambda: len(apps[0].consumer.owned) == SHARDS, "w0 owning all 8")
        assert time.monotonic() - left_at < 1.5
        owned = registries[0].get_sample_value("iotbridge_worker_shards_owned")
        assert owned == SHARDS


async def test_one_worker_and_three_workers_raise_the_same_flags(
    make_settings: Callable[..., Settings], redis_url: str, redis: Redis, unique: str
) -> None:
    rows = recorded_input(assets=40, samples=75)
    one, three = Keys(f"{unique}a", SHARDS), Keys(f"{unique}b", SHARDS)

    solo = settings_for(make_settings, redis_url, one.prefix, "solo")
    await write(redis, one, one.prefix, rows)
    async with running(WorkerApp(solo, CollectorRegistry()), solo):
        await eventually(groups_done(redis, one, len(rows)), "one worker done", timeout_s=30)

    trio = [settings_for(make_settings, redis_url, three.prefix, f"w{i}") for i in range(3)]
    registries = [CollectorRegistry() for _ in trio]
    apps = [WorkerApp(s, r) for s, r in zip(trio, registries, strict=True)]
    async with running(apps[0], trio[0]), running(apps[1], trio[1]), running(apps[2], trio[2]):
        # Written while the workers join and rebalance, so shards change hands mid-stream.
        for start in range(0, len(rows), 300):
            await write(redis, three, three.prefix, rows[start : start + 300])
            await asyncio.sleep(0.1)
        await eventually(groups_done(redis, three, len(rows)), "three workers done", timeout_s=30)
        acquired = {"change": "acquired"}
        changes = sum(r.get_sample_value("iotbridge_worker_shard_changes_total", acquired) or 0
                      for r in registries)  # fmt: skip
        assert changes > SHARDS, "shards changed hands while the input was processed"

    alone, shared = await flags(redis, one), await flags(redis, three)
    assert len(alone) > 80
    assert Counter(d for _, _, d, _, _ in alone).keys() >= {
        "threshold",
        "deviation",
        "rate",
        "flatline",
        "sequence_gap",
    }
    assert len(shared) == len(set(shared)), "no duplicate flag"
    assert sorted(shared) == sorted(alone)


def expected_flags(
    settings: Settings, entries: dict[str, list[Entry]]
) -> list[tuple[str, str, str, str, str]]:
    """What one worker that never stopped raises: every shard's entries in order, one state."""
    engine = Engine(build_checks(settings.worker.detectors))
    keys = Keys(settings.redis.key_prefix, settings.redis.stream_shards)
    events: list[AnomalyEvent] = []
    for shard in shards_of(keys, GROUP, [ROUTE]):
        result = process([Delivery(ShardState(shard, engine), entries[shard.stream])], 5, {})
        events += [event for _, event in result.outputs.events]
    return [(e.source_id, e.asset, e.detector, e.value_name, e.event.value) for e in events]


async def test_a_killed_workers_shards_pending_entries_and_state_are_taken_over(
    make_settings: Callable[..., Settings], redis_url: str, redis: Redis, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    settings = settings_for(make_settings, redis_url, unique, "doomed")
    keys = Keys(unique, SHARDS)
    rows = recorded_input(assets=24, samples=75)
    # Phase 1 ends mid-anomaly: temperature excursions (30..37) and pressure steps (40..) are open.
    before = [row for row in rows if row["seq"] < 34]
    after = [row for row in rows if row["seq"] >= 34]
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTBRIDGE_")}
    log_path = tmp_path / "doomed.log"
    with log_path.open("wb") as log_file:
        doomed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", "worker", "--config", str(config),
            cwd=REPO, env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        await write(redis, keys, unique, before)
        await eventually(groups_done(redis, keys, len(before)), "phase 1 processed", timeout_s=20)
    finally:
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()
    killed_at = time.monotonic()
    await write(redis, keys, unique, after)
    # It had read part of phase 2 when it died: those entries are pending, for a dead consumer.
    streams = keys.telemetry_streams(ROUTE)
    read = await redis.xreadgroup(GROUP, "doomed", dict.fromkeys(streams, ">"), count=10)
    held = sum(len(items) for _, items in cast("list[tuple[str, list[Any]]]", read))
    assert held == 10 * SHARDS

    heir = settings_for(make_settings, redis_url, unique, "heir")
    registry = CollectorRegistry()
    app = WorkerApp(heir, registry)
    bound = (heir.worker.lease_ttl_ms + heir.worker.claim_idle_ms) / 1000 + 1
    async with running(app, heir):
        await eventually(groups_done(redis, keys, len(rows)), "everything processed", bound)
        assert time.monotonic() - killed_at < bound, log_path.read_text()
        claimed = registry.get_sample_value(
            "iotbridge_worker_entries_claimed_total", {"route": ROUTE}
        )
        assert claimed == held

    written = [(f["source_id"], f["asset"], f["detector"], f["value_name"], f["event"])
               for _, f in await entries(redis, keys.anomalies)]  # fmt: skip
    by_stream: dict[str, list[Entry]] = {s: list(await entries(redis, s)) for s in streams}
    expected = expected_flags(settings, by_stream)
    assert len(written) == len(set(written)), "no duplicate flag"
    assert sorted(written) == sorted(expected), "no missing flag, state carried over"
    # Anomalies open when the worker died were ended by the heir, once.
    ended_after_kill = {(a, d) for _, a, d, _, e in written if e == "ended"}
    assert ("m000", "threshold") in ended_after_kill


async def test_staleness_fires_for_a_silent_asset_with_no_other_traffic(
    make_settings: Callable[..., Settings], redis_url: str, redis: Redis, unique: str
) -> None:
    detectors = {"staleness": [{"silent_s": 1.0}], "tick_s": 0.1}
    settings = settings_for(make_settings, redis_url, unique, "w", detectors=detectors)
    keys = Keys(unique, SHARDS)
    registry = CollectorRegistry()
    app = WorkerApp(settings, registry)

    async def staleness() -> list[dict[str, str]]:
        return [f for _, f in await entries(redis, keys.anomalies) if f["detector"] == "staleness"]

    async with running(app, settings):
        await eventually(lambda: len(app.consumer.owned) == SHARDS, "the shards owned")
        stream = keys.telemetry(ROUTE, shard_of("lonely", SHARDS))
        last_id = await redis.xadd(stream, telemetry(unique, "lonely", 0, temperature=50.0))
        written_at = time.monotonic()

        async def flagged() -> bool:
            return bool(await staleness())

        await eventually(flagged, "a staleness flag", timeout_s=5)
        assert time.monotonic() - written_at >= 1.0
        [flag] = await staleness()
        assert (flag["event"], flag["asset"], flag["source_id"]) == ("start", "lonely", last_id)
        assert float(flag["score"]) >= 1.0
        back_id = await redis.xadd(stream, telemetry(unique, "lonely", 1, temperature=50.0))

        async def ended() -> bool:
            return [f["event"] for f in await staleness()] == ["start", "ended"]

        await eventually(ended, "the asset back")
        assert (await staleness())[1]["source_id"] == back_id
        labels = {"route": ROUTE, "detector": "staleness"}
        assert registry.get_sample_value("iotbridge_worker_open_anomalies", labels) == 0


def one_event_outputs(shard: Shard) -> Outputs:
    event = AnomalyEvent(Event.START, "m001", ROUTE, "threshold", "temperature", 95.0, 90.0,
                         95.0, "1700000000.0", "5-0", "critical")  # fmt: skip
    return Outputs(events=[(shard, event)], acks={shard: ["5-0"]},
                   checkpoints={shard: {"meta": "{}"}})  # fmt: skip


async def test_a_write_is_fenced_by_the_lease_and_an_event_is_written_once(
    redis: Redis, unique: str
) -> None:
    keys = Keys(unique, SHARDS)
    [shard, *_] = shards_of(keys, GROUP, [ROUTE])
    await redis.set(shard.lease, "thief")
    with pytest.raises(LeaseLost):
        await commit(Placement(redis), keys, GROUP, "me", one_event_outputs(shard), 60_000)
    assert await redis.xlen(keys.anomalies) == 0
    assert not await redis.exists(shard.checkpoint)

    await redis.set(shard.lease, "me")
    # The same outputs twice (a reply lost after EXEC, say): the anomaly is written once.
    for _ in range(2):
        await commit(Placement(redis), keys, GROUP, "me", one_event_outputs(shard), 60_000)
    assert await redis.xlen(keys.anomalies) == 1
    assert await redis.hget(shard.checkpoint, "meta") == "{}"
