"""Test-side clients: a paho publisher and an in-process bridge, both against the real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from bridge.app import BridgeApp
from config.settings import Settings


def telemetry(seq: int, ts: float | None = None, **values: float) -> bytes:
    return json.dumps(
        {"ts": ts or time.time(), "seq": seq, "values": values or {"temperature": 50.0}}
    ).encode()


class Publisher:
    """A QoS 1 publisher that counts the broker's PUBACKs."""

    def __init__(
        self, url: str, client_id: str, protocol: str = "5", auth: tuple[str, str] | None = None
    ) -> None:
        parts = urlsplit(url)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )  # fmt: skip
        if auth is not None:
            self.client.username_pw_set(*auth)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=qos, retain=retain))

    def wait_acked(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + timeout_s
        for info in self.infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        return sum(1 for info in self.infos if info.is_published())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    """Poll a condition (sync or async) until it holds, failing after `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                result = predicate()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}") from None


@contextlib.asynccontextmanager
async def running_bridge(settings: Settings) -> AsyncIterator[BridgeApp]:
    """A bridge running in this event loop; ready (connected, subscribed) when yielded."""
    app = BridgeApp(settings, CollectorRegistry())
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop), name="bridge-under-test")
    try:
        await wait_for(lambda: app.readiness()[0] or task.done(), 15, "the bridge to be ready")
        if task.done():
            task.result()
        yield app
    finally:
        stop.set()
        async with asyncio.timeout(settings.bridge.shutdown_grace_s + 5):
            await task


def sample(app: BridgeApp, name: str, **labels: str) -> float:
    """A metric's current value as /metrics would show it (0 when the series does not exist)."""
    return app.registry.get_sample_value(name, labels) or 0.0
