"""The Sparkplug host's own STATE on spBv1.0/STATE/<host_id>, as an observer on the real broker
sees it: the Will, the birth and the clean stop, over 20 reconnects and 20 restarts."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from prometheus_client import CollectorRegistry

from bridge.sparkplug.session import SparkplugSession
from config.settings import Settings
from tests.clients import running_bridge, wait_for

pytestmark = pytest.mark.integration

CYCLES = 20


@dataclass(frozen=True)
class State:
    online: bool
    timestamp: int
    qos: int
    retain: bool


class Observer:
    """Subscribes to one host's STATE topic (MQTT 5, retain as published) and keeps every message."""

    def __init__(self, url: str, topic: str, client_id: str) -> None:
        parts = urlsplit(url)
        self.messages: list[State] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5,
        )  # fmt: skip
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()
        self.client.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
        if not subscribed.wait(10):
            raise TimeoutError("observer: no SUBACK")

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        document = json.loads(message.payload)
        assert set(document) == {"online", "timestamp"}, document
        state = State(document["online"], document["timestamp"], message.qos, message.retain)
        with self._lock:
            self.messages.append(state)

    def seen(self) -> list[State]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho closes them only when the client is collected


def _retained(url: str, topic: str, client_id: str) -> list[State]:
    """What a new subscriber is given: the retained STATE."""
    observer = Observer(url, topic, client_id)
    try:
        deadline = time.monotonic() + 5
        while not observer.seen() and time.monotonic() < deadline:
            time.sleep(0.01)  # a polling step of a bounded wait, not a wait for a fixed time
        return observer.seen()
    finally:
        observer.close()


def _settings(make_settings: Callable[..., Settings], unique: str) -> Settings:
    return make_settings(sparkplug={"enabled": True, "host_id": unique, "groups": [unique]})


async def test_20_of_20_reconnects_publish_a_will_and_a_birth_with_the_connect_time(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    topic = f"spBv1.0/STATE/{unique}"
    observer = await asyncio.to_thread(Observer, settings.mqtt.url, topic, f"{unique}-obs")
    births: list[int] = []
    wills: list[int] = []
    try:
        async with running_bridge(settings) as app:
            session = app.sparkplug
            assert session is not None
            for cycle in range(CYCLES + 1):
                previous = births[-1] if births else 0

                def born(after: int = previous) -> list[State]:
                    return [s for s in observer.seen() if s.online and s.timestamp > after]

                await wait_for(lambda: born() and session.online, 10, f"birth {cycle}")
                birth = born()[0]
                births.append(birth.timestamp)
                assert (birth.qos, birth.retain) == (1, True)
                assert birth.timestamp == session.host.connect_ms
                if cycle == CYCLES:
                    break
                session.drop_connection()  # the network fails: the broker publishes the Will

                def will(stamp: int = birth.timestamp) -> list[State]:
                    return [s for s in observer.seen() if not s.online and s.timestamp == stamp]

                await wait_for(will, 10, f"the Will of connection {cycle}")
                [offline] = will()
                assert (offline.qos, offline.retain) == (1, True)
                wills.append(offline.timestamp)
            last = births[-1]
        await wait_for(lambda: any(not s.online and s.timestamp > last for s in observer.seen()),
                       5, "the clean stop")  # fmt: skip
    finally:
        await asyncio.to_thread(observer.close)
    assert len(wills) == CYCLES
    assert wills == births[:CYCLES]  # each Will carries its CONNECT's time, as the birth did
    assert births == sorted(set(births))  # a new time per connection
    [stop] = [s for s in observer.seen() if not s.online and s.timestamp > last]
    assert (stop.qos, stop.retain) == (1, True)
    assert stop.timestamp <= round(time.time() * 1000)
    assert [s.online for s in await asyncio.to_thread(
        _retained, settings.mqtt.url, topic, f"{unique}-late")] == [False]  # fmt: skip


async def test_20_of_20_clean_stops_publish_offline_with_the_stop_time_before_disconnect(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    topic = f"spBv1.0/STATE/{unique}"
    observer = await asyncio.to_thread(Observer, settings.mqtt.url, topic, f"{unique}-obs")
    try:
        for cycle in range(CYCLES):
            session = SparkplugSession(settings, CollectorRegistry())
            stop = asyncio.Event()
            task = asyncio.create_task(session.run(stop))
            await wait_for(lambda: session.online or task.done(), 10, f"start {cycle}")  # noqa: B023
            connect_ms = session.host.connect_ms
            stop.set()
            await asyncio.wait_for(task, 10)
            stopped_ms = round(time.time() * 1000)
            assert connect_ms is not None

            def mine(since: int = connect_ms) -> list[State]:
                return [s for s in observer.seen() if s.timestamp >= since]

            await wait_for(lambda: any(not s.online for s in mine()), 5, f"offline {cycle}")
            # The birth (its answer to the previous stop's retained offline may repeat it), then
            # offline with the time of the stop; never the Will's (a Will would carry connect_ms).
            seen = mine()
            assert {(s.online, s.timestamp) for s in seen if s.online} == {(True, connect_ms)}
            offline = [s for s in seen if not s.online]
            assert len(offline) == 1
            assert connect_ms <= offline[0].timestamp <= stopped_ms
            assert seen[-1] == offline[0]
            assert all((s.qos, s.retain) == (1, True) for s in seen)
            observer.messages.clear()
    finally:
        await asyncio.to_thread(observer.close)


async def test_an_offline_state_for_its_own_id_is_answered_with_its_birth_3_of_3_times(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    topic = f"spBv1.0/STATE/{unique}"
    observer = await asyncio.to_thread(Observer, settings.mqtt.url, topic, f"{unique}-obs")
    try:
        async with running_bridge(settings) as app:
            session = app.sparkplug
            assert session is not None
            connect_ms = session.host.connect_ms
            for attempt in range(3):
                # Another client (or a stale retained Will) says this host is offline.
                stale = json.dumps({"online": False, "timestamp": 1000 + attempt}).encode()
                observer.client.publish(topic, stale, qos=1, retain=True).wait_for_publish(5)

                def answered(after: int = attempt) -> bool:
                    seen = observer.seen()
                    marks = [i for i, s in enumerate(seen) if s.timestamp == 1000 + after]
                    return bool(marks) and any(
                        s.online and s.timestamp == connect_ms for s in seen[marks[-1] :]
                    )

                await wait_for(answered, 5, f"the birth again ({attempt})")
            assert session.online
            assert session.host.connect_ms == connect_ms  # answered on the same connection
            # What a new subscriber is given: the birth again, with the connection's time.
            retained = await asyncio.to_thread(_retained, settings.mqtt.url, topic, f"{unique}-l")
            assert [(s.online, s.timestamp) for s in retained] == [(True, connect_ms)]
    finally:
        await asyncio.to_thread(observer.close)
