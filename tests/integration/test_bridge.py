"""The bridge against real mosquitto and redis-server: what lands in the streams, and when acks go."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from config.keys import Keys
from config.settings import Settings
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for
from tests.faults import redis as own_redis
from tests.services import free_port, http_get, wait_until

pytestmark = pytest.mark.integration

TEL = "iotbridge_bridge_messages_"


def _topic(unique: str, asset: str = "a1") -> str:
    return f"{unique}/plant/s1/l1/{asset}/telemetry"


def _redis(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis.url, decode_responses=True)


@pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto_pub not installed")
async def test_one_valid_and_one_invalid_publish_with_mosquitto_pub(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings()
    keys = Keys(unique)
    port = str(settings.mqtt.port)
    now = int(time.time())
    async with running_bridge(settings) as app:
        for payload in (f'{{"ts": {now}, "seq": 1, "values": {{"temperature": 50.5}}}}',
                        f'{{"ts": {now}, "seq": "two"}}'):  # fmt: skip
            await asyncio.to_thread(
                subprocess.run,
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-q", "1",
                 "-t", _topic(unique), "-m", payload], check=True, timeout=10,
            )  # fmt: skip
        await wait_for(lambda: sample(app, TEL + "received_total", route="telemetry") == 2
                       and app.in_flight() == 0, 10, "both messages")  # fmt: skip
    db = _redis(settings)
    [(_, entry)] = db.xrange(keys.telemetry("telemetry"))
    assert entry == {"asset": "a1", "seq": "1", "ts": f"{now}.0", "topic": _topic(unique),
                     "route": "telemetry", "rx": entry["rx"], "site": "s1", "line": "l1",
                     "v.temperature": "50.5"}  # fmt: skip
    [(_, letter)] = db.xrange(keys.dead_letters)
    assert letter["reason"] == "schema"
    assert letter["payload"] == f'{{"ts": {now}, "seq": "two"}}'
    assert letter["topic"] == _topic(unique)
    assert "seq" in letter["error"]


async def test_every_message_is_counted_once_and_lands_in_one_stream(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings()
    keys = Keys(unique)
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    valid, bad_json, bad_schema, bad_level, wrong_asset = 300, 20, 30, 10, 5
    async with running_bridge(settings) as app:
        for seq in range(valid):
            publisher.publish(_topic(unique, f"a{seq % 7}"), telemetry(seq, temperature=seq * 0.5))
        for i in range(bad_json):
            publisher.publish(_topic(unique), b'{"ts": 1, "seq": ' + str(i).encode())
        for _ in range(bad_schema):
            publisher.publish(_topic(unique), b'{"ts": 1, "seq": 1, "values": {"t": "hot"}}')
        for i in range(bad_level):
            publisher.publish(_topic(unique, "a b"), telemetry(i))
        for _ in range(wrong_asset):
            publisher.publish(
                _topic(unique, "a1"), b'{"ts": 1, "seq": 1, "values": {"t": 1}, "asset": "a2"}'
            )
        total = valid + bad_json + bad_schema + bad_level + wrong_asset
        assert publisher.wait_acked() == total
        routed = total - bad_level

        def settled() -> bool:
            received = sample(app, TEL + "received_total", route="telemetry") + sample(
                app, TEL + "received_total", route="unrouted"
            )
            return received == total and app.in_flight() == 0

        await wait_for(settled, 20, f"{total} messages written")
        assert sample(app, TEL + "forwarded_total", route="telemetry") == valid
        rejected = {reason: sample(app, TEL + "rejected_total", route="telemetry", reason=reason)
                    for reason in ("json", "schema", "identity")}  # fmt: skip
        assert rejected == {"json": bad_json, "schema": bad_schema, "identity": wrong_asset}
        assert sample(app, TEL + "rejected_total", route="unrouted", reason="topic") == bad_level
        assert sample(app, TEL + "received_total", route="telemetry") == routed
    publisher.close()
    db = _redis(settings)
    assert db.xlen(keys.telemetry("telemetry")) == valid
    assert db.xlen(keys.dead_letters) == total - valid
    seqs = sorted(int(f["seq"]) for _, f in db.xrange(keys.telemetry("telemetry")))
    assert seqs == list(range(valid))


async def test_no_ack_while_redis_is_down_then_everything_is_written(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str, tmp_path: Path
) -> None:
    service = own_redis(tmp_path / "redis")
    service.start()
    settings = make_settings(redis={"url": f"redis://127.0.0.1:{service.port}/0", "key_prefix": unique,
                                    "socket_timeout_s": 0.5, "connect_timeout_s": 0.5})  # fmt: skip
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    try:
        async with running_bridge(settings) as app:
            service.kill()
            count = 200
            for seq in range(count):
                publisher.publish(_topic(unique), telemetry(seq))
            await wait_for(lambda: sample(app, TEL + "received_total", route="telemetry") == count,
                           10, "the bridge to receive every message")  # fmt: skip
            await wait_for(lambda: not app.redis_ok, 10, "the bridge to notice Redis is down")
            assert sample(app, TEL + "forwarded_total", route="telemetry") == 0
            assert app.readiness()[0] is False
            assert app.readiness()[1].startswith("redis unavailable")
            assert sample(app, "iotbridge_bridge_in_flight_messages") == count
            service.start()
            await wait_for(lambda: sample(app, TEL + "forwarded_total", route="telemetry") == count,
                           20, "every held message to be written after Redis returned")  # fmt: skip
            assert app.readiness()[0]
        assert publisher.wait_acked() == count
        db = redis.Redis(port=service.port, decode_responses=True)
        assert db.xlen(Keys(unique).telemetry("telemetry")) == count
    finally:
        publisher.close()
        service.stop()


async def test_messages_sent_while_the_bridge_is_away_arrive_after_it_returns(
    make_settings: Callable[..., Settings], mqtt_url: str, unique: str
) -> None:
    settings = make_settings()
    async with running_bridge(settings):
        pass  # creates the persistent session and its subscription
    publisher = Publisher(mqtt_url, f"{unique}-pub", settings.mqtt.protocol)
    count = 500
    for seq in range(count):
        publisher.publish(_topic(unique), telemetry(seq))
    assert publisher.wait_acked() == count
    publisher.close()
    async with running_bridge(settings) as app:
        await wait_for(lambda: sample(app, TEL + "forwarded_total", route="telemetry") == count,
                       20, "the queued messages")  # fmt: skip
    assert _redis(settings).xlen(Keys(unique).telemetry("telemetry")) == count


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_bridge_command_stops_cleanly_on_signal(
    make_settings: Callable[..., Settings], unique: str, signum: int
) -> None:
    settings = make_settings()
    port = free_port()
    env = {"IOTBRIDGE_MQTT__URL": settings.mqtt.url, "IOTBRIDGE_MQTT__PROTOCOL": settings.mqtt.protocol,
           "IOTBRIDGE_MQTT__CLIENT_ID": f"{unique}-cli", "IOTBRIDGE_REDIS__URL": settings.redis.url,
           "IOTBRIDGE_REDIS__KEY_PREFIX": unique, "IOTBRIDGE_BRIDGE__METRICS_PORT": str(port)}  # fmt: skip
    import os

    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "bridge"], env={**os.environ, **env},
                            stderr=subprocess.PIPE)  # fmt: skip

    try:
        wait_until(lambda: http_get(port, "/readyz", 1)[0] == 200, 15, "the bridge's /readyz")
        proc.send_signal(signum)
        assert proc.wait(timeout=settings.bridge.shutdown_grace_s) == 0
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert b"Traceback" not in err
    assert b"bridge stopped" in err
