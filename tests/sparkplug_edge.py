"""A scripted Sparkplug B edge node for tests: births, DATA with any seq, and the NCMDs it gets.

It writes payloads with `bridge.sparkplug.payload.encode`; the test with an edge node this project
did not write uses pysparkplug instead (tests/integration/test_sparkplug_pysparkplug.py).
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.sparkplug.payload import DataType, OutMetric, decode, encode

BD_SEQ = "bdSeq"


class EdgeNode:
    """One edge node `spBv1.0/<group>/.../<node>` with its Will (NDEATH with its bdSeq)."""

    def __init__(
        self, url: str, group: str, node: str, bd_seq: int = 0, protocol: str = "5"
    ) -> None:
        self.group, self.node, self.bd_seq = group, node, bd_seq
        self.seq = 0
        # (arrival time, topic, qos, retain, [(metric name, raw value)]) of each command received
        self.commands: list[tuple[float, str, int, bool, list[tuple[str | None, object]]]] = []
        self._lock = threading.Lock()
        parts = urlsplit(url)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{group}-{node}-edge",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        death = encode(None, None, [OutMetric(BD_SEQ, DataType.INT64, bd_seq)])
        self.client.will_set(self.topic("NDEATH"), death, qos=1, retain=False)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, keepalive=10)
        self.client.loop_start()
        self.client.subscribe(f"spBv1.0/{group}/NCMD/{node}", qos=0)
        if not subscribed.wait(10):
            raise TimeoutError("edge node: no SUBACK")

    def topic(self, kind: str, device: str | None = None) -> str:
        tail = "" if device is None else f"/{device}"
        return f"spBv1.0/{self.group}/{kind}/{self.node}{tail}"

    def _on_message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        payload = decode(message.payload)
        metrics = [(m.name, m.raw) for m in payload.metrics]
        with self._lock:
            self.commands.append((time.time(), message.topic, message.qos, message.retain, metrics))

    def rebirths(self) -> list[float]:
        """When each rebirth request (NCMD Node Control/Rebirth = true) arrived."""
        with self._lock:
            return [
                at
                for at, _, _, _, metrics in self.commands
                if ("Node Control/Rebirth", True) in metrics
            ]

    def next_seq(self) -> int:
        seq = self.seq
        self.seq = (self.seq + 1) % 256
        return seq

    def publish(self, kind: str, metrics: list[OutMetric], device: str | None = None,
                seq: int | None = None, timestamp_ms: int | None = None) -> None:  # fmt: skip
        """One message; `seq` None takes the next one (NBIRTH: 0)."""
        if kind == "NBIRTH":
            self.seq = 0
        if seq is None:
            seq = self.next_seq()
        now_ms = timestamp_ms if timestamp_ms is not None else round(time.time() * 1000)
        data = encode(now_ms, seq, metrics)
        self.client.publish(self.topic(kind, device), data, qos=0).wait_for_publish(10)

    def birth(self, metrics: list[OutMetric]) -> None:
        bd = OutMetric(BD_SEQ, DataType.INT64, self.bd_seq)
        rebirth = OutMetric("Node Control/Rebirth", DataType.BOOLEAN, False)
        self.publish("NBIRTH", [bd, rebirth, *metrics])

    def die(self) -> None:
        """NDEATH as a clean disconnect would send it, then DISCONNECT."""
        death = encode(None, None, [OutMetric(BD_SEQ, DataType.INT64, self.bd_seq)])
        self.client.publish(self.topic("NDEATH"), death, qos=1).wait_for_publish(10)
        self.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client._reset_sockets()  # paho closes them only when the client is collected
