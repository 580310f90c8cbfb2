"""Dedup, device restarts, clock window, per-asset rate limit, retained policy, spool, retention:
against real mosquitto and redis-server, asserted on stream contents and metric values."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from bridge.retention import Retention
from bridge.sink import Append, Dedup, RedisSink
from config.keys import Keys, shard_of
from config.settings import RedisSettings, RetentionSettings, Settings
from observability.metrics import BridgeMetrics
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for
from tests.faults import redis as own_redis

pytestmark = pytest.mark.integration

M = "iotbridge_bridge_messages_"


def _topic(unique: str, asset: str = "a1") -> str:
    return f"{unique}/plant/s1/l1/{asset}/telemetry"


def _entries(settings: Settings) -> list[dict[str, str]]:
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    return [
        fields for _, fields in db.xrange(Keys(settings.redis.key_prefix).telemetry("telemetry"))
    ]


def _dead_letters(settings: Settings) -> list[dict[str, str]]:
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    return [fields for _, fields in db.xrange(Keys(settings.redis.key_prefix).dead_letters)]


async def _settle(app, total: int) -> None:
    def done() -> bool:
        counted = sum(sample(app, M + kind + "_total", route="telemetry")
                      for kind in ("forwarded", "duplicate", "skipped"))  # fmt: skip
        counted += sum(sample(app, M + "rejected_total", route="telemetry", reason=r)
                       for r in ("json", "schema", "identity", "clock", "rate"))  # fmt: skip
        return counted == total and app.in_flight() == 0

    await wait_for(done, 20, f"{total} messages counted")


async def test_the_same_asset_and_seq_published_1000_times_is_one_entry(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings()
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    payload = telemetry(7)
    async with running_bridge(settings) as app:
        for _ in range(1000):
            publisher.publish(_topic(unique), payload)
        assert publisher.wait_acked() == 1000
        await _settle(app, 1000)
        assert sample(app, M + "duplicate_total", route="telemetry") == 999
        assert sample(app, M + "forwarded_total", route="telemetry") == 1
    publisher.close()
    assert [e["seq"] for e in _entries(settings)] == ["7"]


async def test_reordering_and_a_device_restart_are_kept_redeliveries_are_not(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings()
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    t0 = time.time() - 100
    sent = [(s, t0 + s) for s in (0, 1, 2, 4, 3, 5, 6, 7, 8, 9)]  # 3 and 4 swapped
    sent += [(s, t0 + s) for s in (8, 9, 5)]  # redeliveries: same seq, same device time
    sent += [(s, t0 + 50 + s) for s in range(4)]  # restart: seq from 0 again, later device time
    async with running_bridge(settings) as app:
        for seq, ts in sent:
            publisher.publish(_topic(unique), telemetry(seq, ts=ts))
        assert publisher.wait_acked() == len(sent)
        await _settle(app, len(sent))
        assert sample(app, M + "duplicate_total", route="telemetry") == 3
    publisher.close()
    assert [int(e["seq"]) for e in _entries(settings)] == [0, 1, 2, 4, 3, 5, 6, 7, 8, 9, 0, 1, 2, 3]


async def test_a_batch_written_twice_leaves_one_copy(redis_url: str, unique: str) -> None:
    keys = Keys(unique)
    sink = RedisSink(
        RedisSettings(url=redis_url), [keys.telemetry("r"), keys.dedup("r"), keys.dead_letters]
    )
    batch = [Append.of(keys.telemetry("r"), ["asset", f"a{i % 3}", "seq", str(i)], Dedup(keys.dedup("r"), f"a{i % 3}", i, 1.0 + i))
             for i in range(300)]  # fmt: skip
    batch.append(Append.of(keys.dead_letters, ["reason", "json"]))
    first, _ = await sink.write(batch)
    second, _ = await sink.write(batch)
    await sink.close()
    assert first == [1] * 301
    assert second == [0] * 300 + [1]  # dead letters are not deduplicated
    db = redis.Redis.from_url(redis_url)
    assert db.xlen(keys.telemetry("r")) == 300
    assert db.hlen(keys.dedup("r")) == 3  # O(assets), not O(messages)


async def test_seq_gaps_clear_the_ring_exactly_and_pipelined_writes_answer_in_order(
    redis_url: str, unique: str
) -> None:
    """A device whose seq jumps (by 5, by hundreds) leaves the skipped seqs unseen, so a late one
    is written and a redelivery is not; several batches in flight on the sink's connection get
    their own replies."""
    keys = Keys(unique)
    sink = RedisSink(RedisSettings(url=redis_url), [keys.telemetry("r"), keys.dedup("r")])

    def batch(seqs: list[int]) -> list[Append]:
        return [
            Append.of(keys.telemetry("r"), ["seq", str(s)], Dedup(keys.dedup("r"), "a1", s, 10.0))
            for s in seqs
        ]

    await sink.check()  # loads the script, as the bridge does before its first batch
    # Sent at once: they run in this order on one connection.
    replies = await asyncio.gather(
        sink.write(batch([0, 5, 300, 301, 1000, 1500])),
        sink.write(batch([1500, 1000])),  # redeliveries
        sink.write(batch([1499, 1200, 1001, 700, 499])),  # skipped seqs, seen late: new
        # Older than the 1,024-seq ring below 1500: written, flagged unverified; then a redelivery.
        sink.write(batch([300, 1499])),
    )
    await sink.close()
    assert [flags for flags, _ in replies] == [[1] * 6, [0, 0], [1] * 5, [2, 0]]
    db = redis.Redis.from_url(redis_url)
    assert db.xlen(keys.telemetry("r")) == 12


async def test_dedup_state_stored_as_numbers_by_earlier_versions_is_read_the_same(
    redis_url: str, unique: str
) -> None:
    """The script writes seq and ts back as the text they arrived in; a state an earlier bridge
    wrote with %.0f / %.17g (and a ts whose repr has an exponent) reads the same."""
    keys = Keys(unique)
    sink = RedisSink(RedisSettings(url=redis_url), [keys.telemetry("r"), keys.dedup("r")])
    db = redis.Redis.from_url(redis_url)
    ring = bytearray(128)
    for seq in (97, 99, 100):
        ring[seq % 1024 // 8] |= 1 << (seq % 8)
    db.hset(keys.dedup("r"), "a1", b"100 1767225600.2500000\n" + bytes(ring))

    def batch(seqs: list[int], ts: float) -> list[Append]:
        return [Append.of(keys.telemetry("r"), ["seq", str(s)], Dedup(keys.dedup("r"), "a1", s, ts))
                for s in seqs]  # fmt: skip

    old, _ = await sink.write(batch([100, 99, 98, 101], 1767225600.25))
    again, _ = await sink.write(batch([101, 98], 1767225600.25))
    restart, _ = await sink.write(batch([0], 1e16))  # seq back to 0, newer device time
    after, _ = await sink.write(batch([0, 1], 1e16))
    await sink.close()
    assert (old, again, restart, after) == ([0, 0, 1, 1], [0, 0], [1], [0, 1])
    assert db.hget(keys.dedup("r"), "a1").split(b"\n")[0] == b"1 1e+16"


async def test_an_asset_split_between_two_bridges_loses_nothing_even_far_out_of_order(
    redis_url: str, unique: str
) -> None:
    """Bridges on a shared subscription deliver one asset's messages out of order, one bridge
    possibly thousands behind: nothing may be dropped as a duplicate that is not one."""
    keys = Keys(unique)
    sink = RedisSink(RedisSettings(url=redis_url), [keys.telemetry("r"), keys.dedup("r")])

    def batch(seqs: range) -> list[Append]:
        return [
            Append.of(
                keys.telemetry("r"), ["seq", str(s)], Dedup(keys.dedup("r"), "a1", s, 1000.0 + s)
            )
            for s in seqs
        ]

    fast, _ = await sink.write(batch(range(0, 3000, 2)))  # one bridge: the even seqs
    slow, _ = await sink.write(batch(range(1, 3000, 2)))  # the other, far behind: the odd ones
    again, _ = await sink.write(batch(range(2990, 3000)))  # a redelivery of recent ones
    await sink.close()
    assert fast == [1] * 1500
    assert 0 not in slow  # every odd seq written
    # Within 1,024 of the high-water mark 2998 (odd 1975..2997) or above it (2999): exact ...
    assert slow.count(1) == 513
    assert slow.count(2) == 1500 - 513  # ... older ones written unverified, never dropped
    assert again == [0] * 10
    db = redis.Redis.from_url(redis_url)
    assert db.xlen(keys.telemetry("r")) == 3000


async def test_timestamps_outside_the_clock_window_are_dead_lettered(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings()
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    now = time.time()
    async with running_bridge(settings) as app:
        publisher.publish(_topic(unique), telemetry(1, ts=now - 2 * 86400))
        publisher.publish(_topic(unique), telemetry(2, ts=now + 3600))
        publisher.publish(_topic(unique), telemetry(3, ts=now))
        assert publisher.wait_acked() == 3
        await _settle(app, 3)
        assert sample(app, M + "rejected_total", route="telemetry", reason="clock") == 2
    publisher.close()
    assert [e["seq"] for e in _entries(settings)] == ["3"]
    assert [letter["reason"] for letter in _dead_letters(settings)] == ["clock", "clock"]


async def test_a_flooding_asset_is_rate_limited_and_the_others_lose_nothing(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings(bridge={"rate_limit": {"per_asset_hz": 5, "burst": 20}})
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    flood, quiet_assets, quiet_each = 2000, 19, 10
    async with running_bridge(settings) as app:
        for i in range(flood):
            publisher.publish(_topic(unique, "flood"), telemetry(i))
            if i % 100 == 0 and i // 100 < quiet_each:
                for a in range(quiet_assets):
                    publisher.publish(_topic(unique, f"q{a}"), telemetry(i // 100))
        total = flood + quiet_assets * quiet_each
        assert publisher.wait_acked() == total
        await _settle(app, total)
        limited = sample(app, M + "rejected_total", route="telemetry", reason="rate")
        forwarded = sample(app, M + "forwarded_total", route="telemetry")
    publisher.close()
    entries = _entries(settings)
    quiet = [e for e in entries if e["asset"].startswith("q")]
    assert len(quiet) == quiet_assets * quiet_each  # the others lose nothing
    flood_kept = len(entries) - len(quiet)
    assert 20 <= flood_kept < 200  # the burst, plus what the rate refilled while it was sent
    assert limited == flood - flood_kept  # the excess is counted exactly
    assert forwarded == len(entries)
    assert {d["reason"] for d in _dead_letters(settings)} == {"rate"}
    assert len(_dead_letters(settings)) == limited


@pytest.mark.parametrize("policy", ["skip", "tag"])
async def test_retained_messages_are_never_stored_as_fresh_telemetry(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str, policy: str
) -> None:
    settings = make_settings(bridge={"retained": policy})
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    for a in range(20):
        publisher.publish(_topic(unique, f"r{a}"), telemetry(1), retain=True)
    assert publisher.wait_acked() == 20
    async with running_bridge(settings) as app:
        publisher.publish(_topic(unique, "live"), telemetry(1))
        await _settle(app, 21)
        skipped = sample(app, M + "skipped_total", route="telemetry")
    for a in range(20):  # clear the retained messages
        publisher.publish(_topic(unique, f"r{a}"), b"", retain=True)
    publisher.wait_acked()
    publisher.close()
    entries = _entries(settings)
    if policy == "skip":
        assert skipped == 20
        assert [e["asset"] for e in entries] == ["live"]
    else:
        assert skipped == 0
        assert sorted(e["asset"] for e in entries if e.get("retained") == "1") == sorted(
            f"r{a}" for a in range(20)
        )
        assert [e["asset"] for e in entries if "retained" not in e] == ["live"]


async def test_while_redis_is_away_the_spool_takes_and_acks_then_drains_in_order(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    service = own_redis(tmp_path / "redis")
    service.start()
    settings = make_settings(
        redis={"url": f"redis://127.0.0.1:{service.port}/0", "key_prefix": unique,
               "socket_timeout_s": 0.5, "connect_timeout_s": 0.5},
        bridge={"spool": {"dir": str(tmp_path / "spool")}},
    )  # fmt: skip
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    count = 3000
    try:
        async with running_bridge(settings) as app:
            service.kill()
            for seq in range(count):
                publisher.publish(_topic(unique, f"a{seq % 10}"), telemetry(seq // 10))
            assert publisher.wait_acked() == count  # acked from the spool, Redis still down
            await wait_for(
                lambda: app.spool is not None and app.spool.entries == count, 20, "all spooled"
            )
            assert sample(app, M + "forwarded_total", route="telemetry") == count
            assert sample(app, "iotbridge_bridge_spool_entries") == count
            assert not app.redis_ok
            service.start()
            await wait_for(
                lambda: app.spool is not None and app.spool.empty, 30, "the spool to drain"
            )
            assert app.redis_ok
        db = redis.Redis(port=service.port, decode_responses=True)
        rows = [
            (f["asset"], int(f["seq"])) for _, f in db.xrange(Keys(unique).telemetry("telemetry"))
        ]
        assert len(rows) == count
        for a in range(10):
            assert [s for asset, s in rows if asset == f"a{a}"] == list(range(count // 10))
        assert list((tmp_path / "spool").glob("seg-*")) == []
    finally:
        publisher.close()
        service.stop()


async def test_retention_trims_to_its_bound_but_never_an_entry_pending_in_a_group(
    redis_url: str, unique: str
) -> None:
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = Keys(unique).telemetry("telemetry")
    ids = [db.xadd(stream, {"seq": str(i)}) for i in range(100)]
    db.xgroup_create(stream, "workers", id="0")
    db.xreadgroup("workers", "w1", {stream: ">"}, count=60)  # 60 delivered
    db.xack(stream, "workers", *ids[:30])  # 30 acked, 30 pending, 40 not yet delivered
    metrics = BridgeMetrics(CollectorRegistry())
    client = redis.asyncio.Redis.from_url(redis_url)
    retention = Retention(
        client, {"telemetry": [stream]}, RetentionSettings(max_entries=10), metrics
    )
    try:
        assert (
            await retention.trim_route("telemetry", [stream]) == 30
        )  # only the acked ones could go
        assert [e[0] for e in db.xrange(stream)] == ids[30:]
        db.xack(stream, "workers", *ids[30:60])
        db.xreadgroup("workers", "w1", {stream: ">"})
        db.xack(stream, "workers", *ids[60:])
        assert await retention.trim_route("telemetry", [stream]) == 60
    finally:
        await client.aclose()
    assert db.xlen(stream) == 10
    assert metrics.stream_fill_ratio.labels("telemetry")._value.get() == 1.0


async def test_a_route_with_a_declared_contract_stores_typed_values(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings(bridge={
        "routes": [{"name": "pumps", "topic": f"{unique}/plant/{{site}}/{{line}}/{{asset}}/pump", "contract": "pump"}],
        "contracts": {"pump": {"values": {"flow": {"min": 0, "max": 500, "unit": "m3/h"},
                                          "mode": {"type": "string", "enum": ["auto", "manual"]}}}},
    })  # fmt: skip
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    topic = f"{unique}/plant/s1/l1/p7/pump"
    now = time.time()
    async with running_bridge(settings) as app:
        publisher.publish(
            topic,
            json.dumps({"ts": now, "seq": 1, "values": {"flow": 42.5, "mode": "auto"}}).encode(),
        )
        publisher.publish(
            topic,
            json.dumps({"ts": now, "seq": 2, "values": {"flow": 900, "mode": "auto"}}).encode(),
        )
        assert publisher.wait_acked() == 2
        await wait_for(lambda: sample(app, M + "forwarded_total", route="pumps")
                       + sample(app, M + "rejected_total", route="pumps", reason="schema") == 2, 10, "2 messages")  # fmt: skip
    publisher.close()
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    [(_, entry)] = db.xrange(Keys(unique).telemetry("pumps"))
    assert (entry["asset"], entry["v.flow"], entry["s.mode"]) == ("p7", "42.5", "auto")
    [letter] = _dead_letters(settings)
    assert letter["reason"] == "schema"
    assert "less than or equal to 500" in letter["error"]


async def test_with_shards_every_asset_lands_in_exactly_its_own_shard(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings(
        redis={"url": make_settings().redis.url, "key_prefix": unique, "stream_shards": 4}
    )
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    keys = Keys(unique, 4)
    async with running_bridge(settings) as app:
        for seq in range(5):
            for a in range(40):
                publisher.publish(_topic(unique, f"a{a}"), telemetry(seq))
        assert publisher.wait_acked() == 200
        await _settle(app, 200)
    publisher.close()
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    assert keys.telemetry("telemetry", 3) == f"{unique}:tel:telemetry:{{3}}"
    seen: dict[str, int] = {}
    for shard, stream in enumerate(keys.telemetry_streams("telemetry")):
        entries = [f for _, f in db.xrange(stream)]
        assert 0 < len(entries) < 200  # the load is spread
        for entry in entries:
            assert seen.setdefault(entry["asset"], shard) == shard
            assert shard_of(entry["asset"], 4) == shard
    assert len(seen) == 40
    assert not db.exists(Keys(unique).telemetry("telemetry"))  # no unsharded stream was written


async def test_retention_copes_with_entries_acked_between_its_two_reads(
    redis_url: str, unique: str
) -> None:
    """XINFO says pending > 0, the worker acks everything, then XPENDING has no oldest entry."""
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    stream = Keys(unique).telemetry("telemetry")
    ids = [db.xadd(stream, {"seq": str(i)}) for i in range(20)]
    db.xgroup_create(stream, "workers", id="0")
    db.xreadgroup("workers", "w1", {stream: ">"})
    client = redis.asyncio.Redis.from_url(redis_url)
    real_xpending = client.xpending

    async def acked_meanwhile(name: str, group: str) -> object:
        db.xack(stream, "workers", *ids)
        return await real_xpending(name, group)

    client.xpending = acked_meanwhile  # type: ignore[method-assign]
    retention = Retention(
        client,
        {"telemetry": [stream]},
        RetentionSettings(max_entries=5),
        BridgeMetrics(CollectorRegistry()),
    )
    try:
        assert (
            await retention.safe_point(stream)
            == f"{ids[-1].split('-')[0]}-{int(ids[-1].split('-')[1]) + 1}"
        )
    finally:
        await client.aclose()
