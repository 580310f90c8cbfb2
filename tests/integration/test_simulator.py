"""The simulator against a real broker: every message scheduled is published, acknowledged and
delivered to a subscriber; the report and the command line say so."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client import CollectorRegistry

from config.settings import Settings
from simulators.app import SimulatorApp
from simulators.schedule import Schedule
from tests.services import free_port, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REPORT_KEYS = {
    "assets",
    "connections",
    "qos",
    "target_rate",
    "duration_s",
    "sent",
    "acked",
    "failed",
    "achieved_rate_msgs_per_s",
    "publish_ack_latency_s",
}


class Subscriber:
    """A plain paho client on its own network thread, recording every message it receives."""

    def __init__(self, url_and_protocol: tuple[str, str], topic_filter: str, client_id: str):
        settings = Settings(mqtt={"url": url_and_protocol[0]})
        protocol = (
            MQTTProtocolVersion.MQTTv5
            if url_and_protocol[1] == "5"
            else MQTTProtocolVersion.MQTTv311
        )
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self._client.on_connect = lambda client, *_: client.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(settings.mqtt.host, settings.mqtt.port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"no SUBACK for {topic_filter}")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append((message.topic, bytes(message.payload)))

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self._messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def subscriber(mqtt_broker: tuple[str, str], unique: str) -> Iterator[Subscriber]:
    client = Subscriber(mqtt_broker, f"{unique}/plant/#", f"{unique}-sub")
    yield client
    client.close()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    await asyncio.to_thread(wait_until, condition, timeout_s, what)


async def run_app(settings: Settings) -> tuple[SimulatorApp, CollectorRegistry]:
    registry = CollectorRegistry()
    app = SimulatorApp(settings, registry)
    async with asyncio.timeout(settings.simulator.duration_s + 30):
        await app.run(asyncio.Event())
    return app, registry


async def test_every_message_is_acked_and_delivered(
    make_settings: Callable[..., Settings], subscriber: Subscriber, unique: str
) -> None:
    settings = make_settings(simulator={"assets": 200, "rate_hz": 5, "duration_s": 2, "qos": 1})
    expected = 200 * 5 * 2
    assert Schedule(200, 5, 2).total == expected

    app, registry = await run_app(settings)

    report = app.report()
    assert report["sent"] == report["acked"] == expected
    assert report["failed"] == 0
    assert report["unsent"] == 0
    assert report["connections"] == 1
    assert report["publish_ack_latency_s"]["p50"] is not None
    assert report["achieved_rate_msgs_per_s"] == pytest.approx(1000, rel=0.1)
    await eventually(lambda: len(subscriber.messages) >= expected, f"{expected} messages")
    received = subscriber.messages
    assert len(received) == report["acked"]
    per_asset: dict[str, set[int]] = {}
    for topic, payload in received:
        assert topic.startswith(f"{unique}/plant/s")
        assert topic.endswith("/telemetry")
        per_asset.setdefault(topic.split("/")[4], set()).add(json.loads(payload)["seq"])
    assert len(per_asset) == 200
    assert all(seqs == set(range(10)) for seqs in per_asset.values())

    def metric(name: str) -> float | None:
        return registry.get_sample_value(f"iotbridge_simulator_{name}")

    assert metric("messages_sent_total") == metric("messages_acked_total") == expected
    assert metric("publish_ack_seconds_count") == expected
    assert metric("assets") == 200
    assert metric("connections") == 0  # all closed after the run


async def test_report_has_the_documented_keys(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        simulator={
            "assets": 30,
            "rate_hz": 2,
            "duration_s": 1,
            "qos": 0,
            "assets_per_connection": 10,
        }
    )
    app, _ = await run_app(settings)

    report = json.loads(json.dumps(app.report()))
    assert set(report) >= REPORT_KEYS
    assert set(report["publish_ack_latency_s"]) == {"p50", "p99"}
    assert report["connections"] == 3
    assert report["qos"] == 0
    assert report["sent"] == report["acked"] == 60  # QoS 0: acked means written to the socket
    assert report["publish_ack_latency_s"] == {"p50": None, "p99": None}
    assert report["target_rate"] == 60
    assert report["duration_s"] == 1


async def test_stop_ends_the_run_early(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(simulator={"assets": 10, "rate_hz": 2, "duration_s": 60, "qos": 1})
    app = SimulatorApp(settings, CollectorRegistry())
    stop = asyncio.Event()
    assert app.readiness()[0] is False
    run = asyncio.create_task(app.run(stop))
    await eventually(lambda: app.readiness()[0] and app.report()["acked"] >= 10, "first acks")

    stop.set()
    async with asyncio.timeout(10):
        await run

    report = app.report()
    assert report["sent"] == report["acked"] > 0
    assert report["failed"] == 0
    assert report["unsent"] > 0
    assert report["elapsed_s"] < 30
    assert app.readiness() == (False, "finished")


async def test_unreachable_broker_fails_publishes_as_not_connected(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        mqtt={"url": f"mqtt://127.0.0.1:{free_port()}", "connect_timeout_s": 0.3},
        simulator={"assets": 5, "rate_hz": 2, "duration_s": 0.5},
    )
    app, _ = await run_app(settings)

    report = app.report()
    assert report["sent"] == report["acked"] == 0
    assert report["failed_by_kind"] == {"not_connected": 5}


def test_command_line_prints_one_json_report(mqtt_broker: tuple[str, str], unique: str) -> None:
    url, protocol = mqtt_broker
    env = {
        **os.environ,
        "IOTBRIDGE_MQTT__URL": url,
        "IOTBRIDGE_MQTT__PROTOCOL": protocol,
        "IOTBRIDGE_SIMULATOR__METRICS_PORT": "0",
        "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": unique,
    }
    args = ["simulate", "--assets", "50", "--rate", "2", "--duration", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    report = json.loads(lines[0])
    assert report["sent"] == report["acked"] == 100
    assert report["failed"] == 0
    assert "simulator finished" in done.stderr
