"""Sessions and subscriptions: MQTT 3.1.1 and 5, a route table that changes between runs, and two
bridges splitting one shared subscription."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import pytest
import redis
from prometheus_client import CollectorRegistry

from bridge.app import BridgeApp
from bridge.source import _PACKETS_PER_READ, Inbound
from config.keys import Keys
from config.settings import Settings
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for

pytestmark = pytest.mark.integration

M = "iotbridge_bridge_messages_"


def _route(unique: str, name: str, leaf: str) -> dict[str, str]:
    return {"name": name, "topic": f"{unique}/plant/{{site}}/{{line}}/{{asset}}/{leaf}"}


def _stream(settings: Settings, route: str) -> list[dict[str, str]]:
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    return [f for _, f in db.xrange(Keys(settings.redis.key_prefix).telemetry(route))]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
async def test_both_protocols_keep_the_session_across_a_bridge_restart(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str, protocol: str
) -> None:
    settings = make_settings(mqtt={"protocol": protocol, "client_id": f"{unique}-bridge"})
    async with running_bridge(settings) as app:
        assert sample(app, "iotbridge_bridge_mqtt_session_present") == 0
    publisher = Publisher(mqtt_url, f"{unique}-pub", protocol)
    for seq in range(300):
        publisher.publish(f"{unique}/plant/s1/l1/a1/telemetry", telemetry(seq))
    assert publisher.wait_acked() == 300
    publisher.close()
    async with running_bridge(settings) as app:
        assert sample(app, "iotbridge_bridge_mqtt_session_present") == 1
        await wait_for(
            lambda: sample(app, M + "forwarded_total", route="telemetry") == 300, 15, "300 queued"
        )
    assert [int(e["seq"]) for e in _stream(settings, "telemetry")] == list(range(300))


async def test_a_resumed_sessions_backlog_is_read_only_as_fast_as_acks_make_room(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    """Mosquitto 2.0 sends a resumed session's whole queue at once, past the receive maximum: the
    bridge stops reading at `bridge.max_in_flight` and reads on as its batches are acknowledged,
    so what it holds stays bounded, and every message still arrives once."""
    settings = make_settings(
        mqtt={"protocol": "5", "client_id": f"{unique}-bridge"},
        bridge={"max_in_flight": 200, "batch": {"max_size": 50}},
    )
    async with running_bridge(settings):
        pass  # the session, subscribed, then away
    publisher = Publisher(mqtt_url, f"{unique}-pub", "5")
    count = 3000
    for i in range(count):
        publisher.publish(f"{unique}/plant/s1/l1/a{i % 10}/telemetry", telemetry(i // 10))
    assert publisher.wait_acked() == count
    publisher.close()
    app = BridgeApp(settings, CollectorRegistry())
    receive, most = app.source._on_message, 0

    def counted(inbound: Inbound) -> None:
        nonlocal most
        receive(inbound)
        most = max(most, app.in_flight())

    app.source._on_message = counted
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop), name="bridge-under-test")
    try:
        await wait_for(
            lambda: sample(app, M + "forwarded_total", route="telemetry") == count or task.done(),
            30, "the backlog",
        )  # fmt: skip
    finally:
        stop.set()
        await task
    # At most the slice of packets being read when the bound was reached goes past it.
    assert 200 <= most <= 200 + _PACKETS_PER_READ
    pairs = Counter((e["asset"], int(e["seq"])) for e in _stream(settings, "telemetry"))
    assert len(pairs) == count
    assert set(pairs.values()) == {1}


async def test_a_changed_route_table_is_subscribed_even_on_a_resumed_session(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    old = make_settings(bridge={"routes": [_route(unique, "telemetry", "telemetry")]})
    async with running_bridge(old):
        pass
    new = make_settings(bridge={"routes": [_route(unique, "events", "events")]})
    publisher = Publisher(mqtt_url, f"{unique}-pub", new.mqtt.protocol)
    async with running_bridge(new) as app:
        assert sample(app, "iotbridge_bridge_mqtt_session_present") == 1
        publisher.publish(f"{unique}/plant/s1/l1/a1/events", telemetry(1))
        publisher.publish(f"{unique}/plant/s1/l1/a1/telemetry", telemetry(2))  # no longer routed
        assert publisher.wait_acked() == 2
        await wait_for(
            lambda: sample(app, M + "forwarded_total", route="events") == 1, 10, "the new route"
        )
        assert sample(app, M + "received_total", route="unrouted") == 0  # the old filter is gone
    publisher.close()
    assert [e["seq"] for e in _stream(new, "events")] == ["1"]


async def test_two_bridges_on_a_shared_subscription_split_the_load_without_loss_or_duplicates(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    first = make_settings(mqtt={"client_id": f"{unique}-b1"}, bridge={"shared_group": unique})
    second = make_settings(mqtt={"client_id": f"{unique}-b2"}, bridge={"shared_group": unique})
    publisher = Publisher(mqtt_url, f"{unique}-pub", first.mqtt.protocol)
    count = 2000
    async with running_bridge(first) as one, running_bridge(second) as two:
        for seq in range(count):
            publisher.publish(f"{unique}/plant/s1/l1/a{seq % 50}/telemetry", telemetry(seq // 50))
        assert publisher.wait_acked() == count

        def done() -> bool:
            return sample(one, M + "forwarded_total", route="telemetry") + sample(
                two, M + "forwarded_total", route="telemetry") == count  # fmt: skip

        await wait_for(done, 20, f"{count} forwarded by the two bridges")
        shares = [sample(b, M + "forwarded_total", route="telemetry") for b in (one, two)]
    publisher.close()
    assert min(shares) > count * 0.2, shares  # both took a real share
    keys = Counter((e["asset"], e["seq"]) for e in _stream(first, "telemetry"))
    assert len(keys) == count
    assert max(keys.values()) == 1
