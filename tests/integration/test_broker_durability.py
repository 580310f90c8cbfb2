"""Mosquitto killed with -9 after accepting 900 QoS 1 messages while the bridge is away.

The loss window this proves: with the shipped broker/mosquitto.conf (saves every
`autosave_interval` seconds), everything the broker acknowledged before its next save -- which comes
within autosave_interval + 1 s of the last PUBACK, asserted -- reaches Redis after the restart: 900
of 900. What a kill -9 can lose is what was acknowledged in the seconds since the last save and not
yet delivered to the bridge. With Mosquitto's defaults (no persistence) all 900 are lost: the
negative control that shows the test can see loss."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from config.keys import Keys
from config.settings import Settings
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for
from tests.integration.test_broker import autosave_interval_s, shipped_conf_for_test, wait_for_save
from tests.services import Service, free_port, mosquitto_binary, require

pytestmark = pytest.mark.integration

COUNT = 900
CREDENTIALS = ("iotbridge", "durability-test")


def _default_conf(tmp_path: Path, port: int) -> Path:
    conf = tmp_path / "default.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")  # everything else default
    return conf


async def _kill_9_with_900_queued(make_settings: Callable[..., Settings], unique: str, conf: Path,
                                  port: int, tmp_path: Path, auth: bool, persisted: bool) -> int:  # fmt: skip
    """Messages of the 900 that reach Redis."""
    broker = Service(
        "mosquitto", [require(mosquitto_binary(), "mosquitto"), "-c", str(conf)], port, tmp_path
    )
    broker.start()
    mqtt = {"url": f"mqtt://127.0.0.1:{port}", "protocol": "5", "client_id": f"{unique}-bridge"}
    if auth:
        mqtt |= {"username": CREDENTIALS[0], "password": CREDENTIALS[1]}
    settings = make_settings(mqtt=mqtt)
    try:
        async with running_bridge(settings):
            pass  # its persistent session and subscription now exist; the bridge goes away
        publisher = Publisher(f"mqtt://127.0.0.1:{port}", f"{unique}-pub", "5",
                              auth=CREDENTIALS if auth else None)  # fmt: skip
        for seq in range(COUNT):
            publisher.publish(f"{unique}/plant/s1/l1/a{seq % 9}/telemetry", telemetry(seq // 9))
        assert publisher.wait_acked() == COUNT
        publisher.close()
        if persisted:
            waited_s = await asyncio.to_thread(wait_for_save, tmp_path / "data")
            assert waited_s <= autosave_interval_s() + 1 + 10, "the loss window is bounded"
        broker.kill()
        broker.start()
        async with running_bridge(settings) as app:
            await wait_for(lambda: app.source.subscribed, 10, "the bridge back")
            # Without persistence the broker lost the session too: nothing can come.
            if sample(app, "iotbridge_bridge_mqtt_session_present") == 1:
                await wait_for(lambda: sample(app, "iotbridge_bridge_messages_forwarded_total", route="telemetry") >= COUNT,
                               20, "the queued messages")  # fmt: skip
        with redis.Redis.from_url(settings.redis.url) as db:
            return int(db.xlen(Keys(unique).telemetry("telemetry")))
    finally:
        broker.stop()


async def test_the_shipped_config_keeps_900_of_900_across_kill_9(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path
) -> None:
    port = free_port()
    conf = shipped_conf_for_test(tmp_path, port, CREDENTIALS)
    assert (
        await _kill_9_with_900_queued(
            make_settings, unique, conf, port, tmp_path, auth=True, persisted=True
        )
        == COUNT
    )


async def test_negative_control_mosquittos_defaults_lose_all_900_on_kill_9(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path
) -> None:
    port = free_port()
    conf = _default_conf(tmp_path, port)
    assert (
        await _kill_9_with_900_queued(
            make_settings, unique, conf, port, tmp_path, auth=False, persisted=False
        )
        == 0
    )
