"""The bridge behind a fault proxy on both of its links (to the broker and to Redis): added latency,
connection resets, a blackhole. Each test publishes QoS 1 traffic through the faults and counts
what is in the stream against what the broker acknowledged to the publisher."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from bridge.app import BridgeApp
from config.keys import Keys
from config.settings import Settings
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for
from tests.proxy import FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def proxies(mqtt_url: str, redis_url: str) -> AsyncIterator[tuple[FaultProxy, FaultProxy]]:
    mqtt, db = urlsplit(mqtt_url), urlsplit(redis_url)
    to_broker = await FaultProxy(mqtt.hostname or "127.0.0.1", mqtt.port or 1883).start()
    to_redis = await FaultProxy(db.hostname or "127.0.0.1", db.port or 6379).start()
    yield to_broker, to_redis
    await to_broker.close()
    await to_redis.close()


def _through(make_settings: Callable[..., Settings], unique: str, proxies: tuple[FaultProxy, FaultProxy],
             keepalive_s: int = 10) -> Settings:  # fmt: skip
    to_broker, to_redis = proxies
    base = make_settings()
    return make_settings(
        mqtt={"url": f"mqtt://127.0.0.1:{to_broker.port}", "protocol": base.mqtt.protocol,
              "client_id": f"{unique}-bridge", "keepalive_s": keepalive_s},
        redis={"url": f"redis://127.0.0.1:{to_redis.port}/0", "key_prefix": unique,
               "socket_timeout_s": 1.0, "connect_timeout_s": 1.0},
    )  # fmt: skip


async def _publish(publisher: Publisher, unique: str, count: int, rate_hz: float) -> None:
    """`count` QoS 1 messages over 20 assets at about `rate_hz`, from this event loop."""
    started = time.monotonic()
    for i in range(count):
        publisher.publish(f"{unique}/plant/s1/l1/a{i % 20}/telemetry", telemetry(i // 20))
        if (ahead := started + (i + 1) / rate_hz - time.monotonic()) > 0:
            await asyncio.sleep(ahead)  # pacing the load, not waiting for a condition


async def _everything_arrived(app: BridgeApp, count: int, timeout_s: float) -> None:
    await wait_for(lambda: sample(app, "iotbridge_bridge_messages_forwarded_total", route="telemetry")
                   + sample(app, "iotbridge_bridge_messages_duplicate_total", route="telemetry") >= count
                   and app.in_flight() == 0, timeout_s, f"{count} messages through the faults")  # fmt: skip


async def _run_through_faults(
    settings: Settings, mqtt_url: str, redis_url: str, unique: str, count: int, faults: Callable[[BridgeApp], Any],
    rate_hz: float = 100, timeout_s: float = 40,
) -> BridgeApp:  # fmt: skip
    """Publish `count` messages while `faults()` runs, wait for all, check lost 0 and dup 0."""
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    async with running_bridge(settings) as app:
        await asyncio.gather(_publish(publisher, unique, count, rate_hz), faults(app))
        await _everything_arrived(app, count, timeout_s)
    acked = publisher.wait_acked()
    publisher.close()
    db = redis.Redis.from_url(redis_url, decode_responses=True)
    entries = Counter(
        (f["asset"], f["seq"]) for _, f in db.xrange(Keys(unique).telemetry("telemetry"))
    )
    assert acked == count
    _check(entries, count)
    return app


def _check(entries: Counter[tuple[str, str]], count: int) -> None:
    expected = {(f"a{i % 20}", str(i // 20)) for i in range(count)}
    assert set(entries) == expected, f"lost {len(expected - set(entries))}"
    assert max(entries.values()) == 1, "duplicates in the stream"


async def test_200ms_latency_with_jitter_on_both_links_loses_nothing(
    make_settings: Callable[..., Settings],
    mqtt_url: str,
    redis_url: str,
    unique: str,
    proxies: tuple[FaultProxy, FaultProxy],
) -> None:
    for proxy in proxies:
        proxy.faults.latency_s, proxy.faults.jitter_s = 0.2, 0.1
    settings = _through(make_settings, unique, proxies)

    async def none(_app: BridgeApp) -> None:
        return None

    await _run_through_faults(settings, mqtt_url, redis_url, unique, 600, none, timeout_s=30)


async def test_a_reset_every_5_s_on_both_links_loses_nothing_and_duplicates_nothing(
    make_settings: Callable[..., Settings],
    mqtt_url: str,
    redis_url: str,
    unique: str,
    proxies: tuple[FaultProxy, FaultProxy],
) -> None:
    settings = _through(make_settings, unique, proxies)
    reconnects: list[float] = []

    async def resets(app: BridgeApp) -> None:
        for _ in range(3):
            await asyncio.sleep(5)  # the fault's schedule
            for proxy in proxies:
                proxy.reset_all()
        reconnects.append(sample(app, "iotbridge_bridge_reconnects_total", target="mqtt"))

    await _run_through_faults(settings, mqtt_url, redis_url, unique, 1500, resets)
    assert proxies[0].connections >= 4  # it really was reset, and came back each time
    assert reconnects[0] <= 6


async def test_a_blackholed_broker_link_is_detected_within_1_5_keepalives_plus_5_s(
    make_settings: Callable[..., Settings],
    mqtt_url: str,
    redis_url: str,
    unique: str,
    proxies: tuple[FaultProxy, FaultProxy],
) -> None:
    keepalive = 5
    settings = _through(make_settings, unique, proxies, keepalive_s=keepalive)
    to_broker = proxies[0]
    detected: list[float] = []

    async def blackhole(app: BridgeApp) -> None:
        await asyncio.sleep(2)  # traffic flows before the fault
        to_broker.faults.blackhole = True
        started = time.monotonic()
        await wait_for(
            lambda: not app.source.connected, 1.5 * keepalive + 5, "the dead link to be noticed"
        )
        detected.append(time.monotonic() - started)
        await asyncio.sleep(
            max(0.0, 3 * keepalive - detected[0])
        )  # the blackhole lasts 3 keepalives
        to_broker.faults.blackhole = False

    await _run_through_faults(
        settings, mqtt_url, redis_url, unique, 1000, blackhole, rate_hz=50, timeout_s=60
    )
    print(f"dead link detected after {detected[0]:.1f} s (keepalive {keepalive} s)")
    assert detected[0] <= 1.5 * keepalive + 5
