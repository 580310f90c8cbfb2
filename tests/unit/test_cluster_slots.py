"""On a Redis Cluster every atomic step names keys of one hash slot: the bridge's appends."""

from __future__ import annotations

import time

import pytest

from bridge.intake import Intake
from bridge.redis_nodes import slot_of
from bridge.sink import Append, Dedup, slot_groups
from bridge.source import Inbound
from config.keys import Keys
from config.settings import Settings

ROUTES = [
    {"name": "telemetry", "topic": "plant/{site}/{line}/{asset}/telemetry"},
    {"name": "power", "topic": "plant/{site}/{line}/{asset}/power"},
]


@pytest.mark.parametrize("shards", [1, 4, 12])
def test_each_shard_of_every_route_is_one_slot_beside_the_dead_letters(shards: int) -> None:
    settings = Settings(redis={"cluster": True, "stream_shards": shards}, bridge={"routes": ROUTES})
    keys = Keys.of(settings.redis)
    groups = slot_groups(Intake(settings.bridge, keys).write_keys)
    # One group per shard (both routes' streams and dedup states), and the dead letters alone.
    assert len(groups) == shards + 1
    assert [keys.dead_letters] in groups.values()
    for shard in range(shards):
        step = {keys.telemetry(route, shard) for route in ("telemetry", "power")}
        step |= {keys.dedup(route, shard) for route in ("telemetry", "power")}
        assert len({slot_of(key) for key in step}) == 1


def test_an_append_and_its_dedup_state_share_a_slot_for_any_asset() -> None:
    settings = Settings(redis={"cluster": True, "stream_shards": 12}, bridge={"routes": ROUTES})
    keys = Keys.of(settings.redis)
    intake = Intake(settings.bridge, keys)
    for n in range(500):
        topic = f"plant/s1/l1/asset-{n}/telemetry"
        payload = b'{"ts": %d, "seq": 1, "values": {"t": 1.0}}' % time.time()
        inbound = Inbound(
            n + 1, 1, topic, topic.encode(), payload, False, 0, time.monotonic(), time.time()
        )
        pending = intake.classify(inbound)
        append = pending.append
        assert isinstance(append, Append)
        assert isinstance(append.dedup, Dedup)
        assert slot_of(append.stream) == slot_of(append.dedup.key)


def test_one_redis_keeps_its_key_names() -> None:
    keys = Keys.of(Settings().redis)
    assert keys.telemetry("telemetry") == "iotbridge:tel:telemetry"
    assert keys.dedup("telemetry") == "iotbridge:dedup:telemetry"
    assert keys.anomaly_streams() == ["iotbridge:anomalies"]
    assert keys.worker_dead_letters_of(3) == "iotbridge:dlq:worker"
    assert keys.worker_checkpoint("g", "telemetry") == "iotbridge:worker:g:state:telemetry"
