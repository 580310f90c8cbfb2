"""One MQTT connection of the simulator: a paho client carrying a slice of the fleet.

Each connection runs on paho's own network thread (`loop_start`): connecting, reconnecting with
paho's backoff, writing and reading PUBACKs all happen there, never on the asyncio loop. The
publishing thread only calls `publish`, which queues the packet and wakes the network thread.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from config.settings import Settings
from observability.metrics import SimulatorMetrics
from simulators.stats import PublishStats

log = logging.getLogger(__name__)

# paho keeps at most this many QoS 1 messages per connection (in flight + queued behind them), so a
# broker slower than the schedule fails publishes as queue_full instead of growing memory.
QUEUE_PER_IN_FLIGHT = 10
# Packet ids are 16-bit and paho hands them out round-robin without skipping ids still in use, so
# more messages than this outstanding could reuse the id of one not yet acknowledged.
MAX_QUEUED = 60_000

_FAILURE_KINDS = {
    MQTTErrorCode.MQTT_ERR_NO_CONN: "not_connected",
    MQTTErrorCode.MQTT_ERR_QUEUE_SIZE: "queue_full",
}


def _protocol(version: str) -> MQTTProtocolVersion:
    return MQTTProtocolVersion.MQTTv5 if version == "5" else MQTTProtocolVersion.MQTTv311


def _build_client(settings: Settings, client_id: str) -> mqtt.Client:
    s, sim = settings.mqtt, settings.simulator
    protocol = _protocol(s.protocol)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        # MQTT 3.1.1 only (MQTT 5 takes clean_start at connect): the simulator needs no session.
        clean_session=True if protocol is MQTTProtocolVersion.MQTTv311 else None,
    )
    client.max_inflight_messages_set(sim.max_in_flight)
    client.max_queued_messages_set(min(MAX_QUEUED, sim.max_in_flight * QUEUE_PER_IN_FLIGHT))
    # paho takes whole seconds here.
    backoff = settings.backoff
    client.reconnect_delay_set(math.ceil(backoff.initial_s), math.ceil(backoff.max_s))
    if s.username is not None:
        password = s.password.get_secret_value() if s.password is not None else None
        client.username_pw_set(s.username, password)
    if s.tls_enabled:
        tls = s.tls
        client.tls_set(
            ca_certs=tls.ca_file,
            certfile=tls.cert_file,
            keyfile=tls.key_file,
            cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(tls.insecure_skip_verify)
    return client


class Connection:
    """A paho client plus the bookkeeping that turns its callbacks into publish outcomes."""

    def __init__(
        self,
        settings: Settings,
        index: int,
        stats: PublishStats,
        metrics: SimulatorMetrics,
        on_change: Callable[[], None],
    ) -> None:
        """`on_change` is called from paho's thread whenever the connection goes up or down."""
        self.client_id = f"{settings.simulator.client_id_prefix}-{index}"
        self.receive_maximum: int | None = None
        self._metrics = metrics
        self._on_change = on_change
        self._settings = settings
        self._qos = settings.simulator.qos
        self._stats = stats
        self._lock = threading.Lock()
        # mid -> monotonic time of publish(), until the ack (QoS 1) or the write (QoS 0).
        self._pending: dict[int, float] = {}
        # mid -> (time, reason) of callbacks that beat publish() returning the mid to us.
        self._early: dict[int, tuple[float, ReasonCode]] = {}
        self._connected = False
        self._was_connected = False
        self._closing = False
        self._client = _build_client(settings, self.client_id)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self) -> None:
        """Connect in the background: paho's network thread connects and keeps reconnecting."""
        s = self._settings.mqtt
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s)
        self._client.loop_start()

    def publish(self, topic: str, payload: bytes, anomaly: bool = False) -> bool:
        """Hand one message to paho; True when accepted (counted as sent)."""
        # Checked here because paho accepts a QoS 1 publish while disconnected and sends it after
        # the reconnect, which would hold the message back rather than fail it.
        if not self._client.is_connected():
            self._stats.record_failed("not_connected")
            return False
        started = time.monotonic()
        info = self._client.publish(topic, payload, qos=self._qos)
        # A QoS 1 message that lost the race with a disconnect is still queued in paho and goes
        # out after the reconnect, so it counts as sent.
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self._qos == 1
        ):
            # Counted as sent before its outcome can be, so `outstanding` never goes negative.
            self._stats.record_sent(anomaly)
            self._track(info.mid, started)
            return True
        self._stats.record_failed(_FAILURE_KINDS.get(info.rc, "error"))
        return False

    def close(self) -> None:
        """Send DISCONNECT and join the network thread (blocking: call it off the event loop)."""
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    def _track(self, mid: int, started: float) -> None:
        # Our lock is never held while calling paho, and paho holds its own message lock while
        # it calls on_publish, so the two locks are always taken in the same order.
        with self._lock:
            early = self._early.pop(mid, None)
            if early is None:
                self._pending[mid] = started
                return
        self._settle(early[0] - started, early[1])

    def _settle(self, latency_s: float, reason: ReasonCode) -> None:
        if reason.is_failure:  # MQTT 5 PUBACK with an error reason, e.g. not authorized
            self._stats.record_failed("rejected")
        else:
            self._stats.record_acked(latency_s if self._qos == 1 else None)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        now = time.monotonic()
        with self._lock:
            started = self._pending.pop(mid, None)
            if started is None:
                self._early[mid] = (now, reason)
                return
        self._settle(now - started, reason)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.warning(
                "mqtt connection refused",
                extra={"client_id": self.client_id, "reason": str(reason)},
            )
            return
        # MQTT 5 (3.3.4): at most Receive Maximum unacknowledged QoS 1 publishes; kept for the
        # app to compare with max_in_flight, which paho cannot lower once connected.
        limit = getattr(properties, "ReceiveMaximum", None)
        self.receive_maximum = limit if isinstance(limit, int) else None
        self._connected = True
        self._metrics.connections.inc()
        if self._was_connected:
            log.info("mqtt connection restored", extra={"client_id": self.client_id})
        else:
            log.debug("mqtt connected", extra={"client_id": self.client_id})
        self._was_connected = True
        self._on_change()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._connected:
            return
        self._connected = False
        self._metrics.connections.dec()
        if self._closing:
            log.debug("mqtt disconnected", extra={"client_id": self.client_id})
        else:
            log.info(
                "mqtt connection lost, reconnecting",
                extra={"client_id": self.client_id, "reason": str(reason)},
            )
        self._on_change()
