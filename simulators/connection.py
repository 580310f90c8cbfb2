"""One MQTT connection of the simulator: a paho client carrying a slice of the fleet, driven by
the engine's own loop (paho's external-loop API: `loop_read`, `loop_write`, `loop_misc`), never by
a paho thread. One thread per process then drives every connection: no locks, no thread per
client (20,000 connections would be 20,000 threads), no wake-up byte per publish.

paho connects, pings and disconnects; on plain TCP the publishes and their PUBACKs bypass it
(`simulators.wire`); TLS keeps paho's public API. CPU µs per message of the whole process at 100K
assets, 10,000 msg/s QoS 1, over the middle of the run (bench/simulator_bench.py --only target,
Mosquitto on the 2-core machine): 71 through paho's `publish()` and `on_publish`; 53 with the
framing here; 39 with quick-ack re-armed only while PUBACKs are owed. Most of what remains is a
`send`, a `recv` and an epoll wake-up per message: 10,000 msg/s over 400 connections is about
one message per connection per 5 ms tick.

What a connection holds is bounded: `window` unacknowledged publishes (`simulator.max_in_flight`,
lowered to the broker's Receive Maximum), `OUT_LIMIT_BYTES` not yet taken by the kernel, and a
`backlog` of at most one message's extras (a duplicate, a bad copy, a held message released). The
engine publishes a scheduled message only on a `ready` connection: otherwise the asset waits, and
a message that waits too long is skipped, never queued.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from config.settings import Settings
from simulators.wire import BufferedSocket, publish_packet

log = logging.getLogger(__name__)

# Bytes handed to a connection and not yet taken by the kernel before it stops taking scheduled
# messages: a broker that stops reading (QoS 0 has no window) costs bounded memory (25 MB over
# 400 connections; 10 s of what a connection carries at 100K assets and 10,000 msg/s).
OUT_LIMIT_BYTES = 64 * 1024
# Packet ids are 16 bits: the window stays below that.
MAX_WINDOW = 65_000


def _protocol(version: str) -> MQTTProtocolVersion:
    return MQTTProtocolVersion.MQTTv5 if version == "5" else MQTTProtocolVersion.MQTTv311


def _noop(*_: Any) -> None:
    """Registered as paho's socket-write callbacks: their presence alone stops paho writing
    inside `publish()`, so the engine batches the writes."""


class Connection:
    """A paho client, its in-flight window and its publish bookkeeping (engine thread only)."""

    def __init__(
        self,
        settings: Settings,
        index: int,
        on_ack: Callable[[Connection, int, bool], None],
        on_state: Callable[[Connection, bool], None],
        sockets: Callable[[Connection, socket.socket | None], None],
    ) -> None:
        """`on_ack(conn, mid, failed)` per PUBACK; `on_state(conn, up)` when it connects or drops;
        `sockets(conn, sock)` when a socket opens (None: when it closes)."""
        sim, s = settings.simulator, settings.mqtt
        self.index = index
        self.client_id = f"{sim.client_id_prefix}-{index}"
        self.qos = sim.qos
        self.window = min(sim.max_in_flight, MAX_WINDOW)
        self.up = False
        self.opened = False
        self.ever_up = False
        self.registered: socket.socket | None = None
        self.closing = False
        self.retry_at = 0.0
        self.failures = 0
        # mid -> (local asset, epoch, seq, publish time): QoS 1 messages awaiting their PUBACK.
        self.pending: dict[int, tuple[int, int, int, float]] = {}
        # (topic, payload, ident, scheduled) of a message's extras that found the window full.
        self.backlog: deque[tuple[bytes, bytes, tuple[int, int, int], bool]] = deque()
        # Assets with a message due that waited for this connection to be `ready`.
        self.waiting: deque[int] = deque()
        self.unflushed = 0  # QoS 0 publishes handed over, not yet written to the socket
        self.buffered: BufferedSocket | None = None
        self.dirty = False
        self._mid = 0
        self._v5 = s.protocol == "5"
        self._on_ack, self._on_state, self._sockets = on_ack, on_state, sockets
        self._tls = s.tls_enabled
        self._host, self._port, self._keepalive = s.host, s.port, s.keepalive_s
        self.client = self._build(settings)

    def _build(self, settings: Settings) -> mqtt.Client:
        s = settings.mqtt
        protocol = _protocol(s.protocol)
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            # MQTT 3.1.1 only (MQTT 5 takes clean_start at connect): the simulator needs no session.
            clean_session=True if protocol is MQTTProtocolVersion.MQTTv311 else None,
        )
        # Off: paho's limit walks every in-flight message on every PUBACK (O(window) per ack).
        # The window is enforced here instead, with the broker's Receive Maximum.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.connect_timeout = s.connect_timeout_s
        if s.username is not None:
            password = s.password.get_secret_value() if s.password is not None else None
            client.username_pw_set(s.username, password)
        if self._tls:
            tls = s.tls
            client.tls_set(
                ca_certs=tls.ca_file,
                certfile=tls.cert_file,
                keyfile=tls.key_file,
                cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(tls.insecure_skip_verify)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = _noop
        client.on_socket_unregister_write = _noop
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        if self.qos == 1:
            client.on_publish = self._on_publish  # TLS only; QoS 0 would decode a ReasonCode
        return client

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.window

    @property
    def out_bytes(self) -> int:
        """Bytes handed over and not yet taken by the kernel (plain TCP; TLS: paho's packets)."""
        if self.buffered is not None:
            return self.buffered.out_bytes
        return len(self.client._out_packet) * 256  # paho's queue, at a typical packet size

    @property
    def ready(self) -> bool:
        """Takes a scheduled message now: up, a free slot in the window, the socket draining."""
        return (
            self.up
            and not self.backlog
            and len(self.pending) < self.window
            and self.out_bytes < OUT_LIMIT_BYTES
        )

    def publish(self, topic: bytes, payload: bytes) -> int:
        """Queue one PUBLISH of a `wire.topic_field`; returns its packet id (0 at QoS 0), or -1
        when the client refused it (not connected)."""
        mid = 0
        if self.qos == 1:
            mid = self._next_mid()
        buffered = self.buffered
        if buffered is not None:
            buffered.send(publish_packet(topic, payload, mid, v5=self._v5))
            return mid
        info = self.client.publish(topic[2:].decode(), payload, self.qos)
        return -1 if info.rc else info.mid if self.qos == 1 else 0

    def _next_mid(self) -> int:
        mid, pending = self._mid, self.pending
        while True:  # the window is below 65,535: a free id is a few steps away at most
            mid = mid % 65535 + 1
            if mid not in pending:
                self._mid = mid
                return mid

    def connect(self) -> None:
        """Open the TCP connection and queue CONNECT (the CONNACK arrives through `read`)."""
        self._mid = 0
        if self.ever_up or self.failures:
            self.client.reconnect()
        else:
            self.client.connect(self._host, self._port, keepalive=self._keepalive)

    def read(self) -> None:
        client, buffered = self.client, self.buffered
        if buffered is None:
            client.loop_read()
            return
        if buffered.fill():
            self._take(client, buffered)
            if self.pending and client.socket() is not None:
                buffered.quickack()  # PUBACKs still owed: see BufferedSocket.quickack
        elif buffered.eof:
            self._take(client, buffered)

    def _take(self, client: mqtt.Client, buffered: BufferedSocket) -> None:
        """Whole PUBACKs are taken here; paho reads any other packet, or the end of the stream."""
        while client.socket() is not None:
            if client._in_packet["command"] == 0 and self.up:
                try:
                    other = buffered.take_pubacks(self._ack)
                except ValueError:
                    log.warning(
                        "malformed packet from the broker", extra={"client_id": self.client_id}
                    )
                    client.disconnect()
                    return
                if not other and not buffered.eof:
                    return
            before = buffered.buffered
            client.loop_read()
            if not before and not buffered.eof:
                return

    def _ack(self, mid: int, failed: bool) -> None:
        self._on_ack(self, mid, failed)

    def flush(self) -> bool:
        """Hand queued packets to the socket; False when the kernel buffer is full."""
        self.dirty = False
        client = self.client
        if client.want_write():
            client.loop_write()
        buffered = self.buffered
        done = True
        if buffered is not None:
            try:
                done = buffered.flush()
            except OSError:
                # Reset or broken pipe: the read side sees it too and paho reports the loss.
                return True
        if done:
            self.unflushed = 0
        return done

    def misc(self) -> None:
        self.client.loop_misc()  # keepalive PINGREQ, and a lost connection noticed

    def close(self) -> None:
        self.closing = True
        if self.client.socket() is not None:
            self.client.disconnect()
            self.flush()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self.buffered = None
        if not self._tls and isinstance(sock, socket.socket):
            self.buffered = BufferedSocket(sock)
            client._sock = self.buffered  # see BufferedSocket
        self._sockets(self, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._sockets(self, None)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Properties
    ) -> None:
        self._on_ack(self, mid, reason.is_failure)

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
        # MQTT 5 (3.3.4): at most Receive Maximum unacknowledged QoS 1 publishes.
        limit = getattr(properties, "ReceiveMaximum", None)
        if isinstance(limit, int):
            self.window = max(1, min(self.window, limit))
        self.up, self.failures = True, 0
        if self.ever_up:
            log.info("mqtt connection restored", extra={"client_id": self.client_id})
        self.ever_up = True
        self._on_state(self, True)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was_up, self.up = self.up, False
        if was_up and not self.closing:
            log.info(
                "mqtt connection lost, reconnecting",
                extra={"client_id": self.client_id, "reason": str(reason)},
            )
        if was_up:
            self._on_state(self, False)

    def failed_to_connect(self, now: float, initial_s: float, max_s: float, jitter: float) -> None:
        self.failures += 1
        delay = min(max_s, initial_s * math.pow(2.0, self.failures - 1))
        self.retry_at = now + delay * (1.0 + jitter * ((self.index * 0.618) % 1.0 - 0.5))
