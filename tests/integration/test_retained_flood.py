"""10,000 retained topics: none is stored as fresh telemetry, and live traffic is not held back."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from config.keys import Keys
from config.settings import Settings
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for

pytestmark = pytest.mark.integration


async def test_ten_thousand_retained_topics_are_skipped_and_a_live_message_arrives_within_2_s(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings()
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    retained = 10_000
    for i in range(retained):
        publisher.publish(f"{unique}/plant/s1/l{i % 10}/r{i}/telemetry", telemetry(1), retain=True)
    assert publisher.wait_acked(120) == retained
    publisher.infos.clear()
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    stream = Keys(unique).telemetry("telemetry")
    try:
        async with running_bridge(settings) as app:  # a new session: every retained message comes
            publisher.publish(f"{unique}/plant/s1/l1/live/telemetry", telemetry(1))
            sent = time.monotonic()
            await wait_for(lambda: db.xlen(stream) >= 1, 10, "the live message")
            live_after_s = time.monotonic() - sent
            await wait_for(lambda: sample(app, "iotbridge_bridge_messages_skipped_total", route="telemetry") == retained,
                           60, "every retained message to be skipped")  # fmt: skip
        print(
            f"live message stored {live_after_s:.2f} s after it was sent, beside {retained} retained"
        )
        assert live_after_s < 2.0
        assert [f["asset"] for _, f in db.xrange(stream)] == ["live"]  # nothing retained stored
    finally:
        for i in range(retained):  # clear the retained messages from the shared test broker
            publisher.publish(f"{unique}/plant/s1/l{i % 10}/r{i}/telemetry", b"", retain=True)
        publisher.wait_acked(120)
        publisher.close()
        db.close()
