"""One MQTT connection of the simulator: a paho client carrying a slice of the fleet, driven by
the engine's own loop (paho's external-loop API: `loop_read`, `loop_write`, `loop_misc`), never by
a paho thread. One thread per process then drives every connection: no locks, no thread per
client (20,000 connections would be 20,000 threads), no wake-up byte per publish.

Measured against Mosquitto on the 2-core machine (µs of CPU per message, paho 2.2):

| path                                              | QoS 0 | QoS 1 |
| ------------------------------------------------- | ----- | ----- |
| `loop_start()` thread, `on_publish` set            | 27    | 50    |
| own loop, no `on_publish` at QoS 0                 | 13    | 49    |
| own loop, paho's in-flight limit off (see below)   |       | 44    |
| own loop, writes and reads through `BufferedSocket` | 8     | 36    |

What remains at QoS 1 is paho decoding each PUBACK (an MQTT 5 `Properties` and two `ReasonCode`
objects) and its `MQTTMessageInfo` (a `threading.Condition`) per publish.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from config.settings import Settings

log = logging.getLogger(__name__)

# Messages waiting for a free in-flight slot, per in-flight slot, before publishes fail as
# queue_full: a broker slower than the schedule costs bounded memory.
QUEUE_PER_IN_FLIGHT = 10
READ_SIZE = 1 << 16
QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class BufferedSocket:
    """paho's socket seen through two buffers: paho's one `send()` per packet appends to a list
    that the engine writes with one `send()` per loop pass, and paho's one-byte `recv()`s (three
    system calls per PUBACK) are served from one large read.

    Installed from `on_socket_open` on plain TCP only: paho 2.x touches its socket only through
    `send`, `recv`, `close`, `setblocking` and `fileno`, all of which this forwards."""

    __slots__ = ("_in", "_out", "_pos", "_quickack", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._quickack = QUICKACK is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        self._out: list[bytes] = []
        self._in = b""
        self._pos = 0

    def send(self, data: bytes | bytearray) -> int:
        self._out.append(bytes(data))
        return len(data)

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._in):
            self._in, self._pos = self.sock.recv(READ_SIZE), 0  # BlockingIOError: paho's AGAIN
            if not self._in:
                return b""
            if self._quickack:
                # Mosquitto leaves Nagle on (set_tcp_nodelay false): its next PUBACK waits for our
                # TCP ack, which Linux delays up to 40 ms. Quick-ack mode lapses, so it is re-armed
                # after every read: one system call per read, not per message.
                self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)  # type: ignore[arg-type]
        start = self._pos
        self._pos = start + size
        return self._in[start : start + size]

    @property
    def buffered(self) -> bool:
        return self._pos < len(self._in)

    @property
    def pending_out(self) -> bool:
        return bool(self._out)

    def flush(self) -> bool:
        """Write what paho queued, without blocking; True when nothing is left."""
        if not self._out:
            return True
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        try:
            written = self.sock.send(data)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                written = 0
            else:
                self._out.clear()
                raise
        self._out = [data[written:]] if written < len(data) else []
        return not self._out

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def close(self) -> None:
        # paho closes right after "sending" DISCONNECT, which is still in our buffer.
        with contextlib.suppress(OSError):
            self.flush()
        self._out.clear()
        self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


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
        self.window = sim.max_in_flight
        self.queue_limit = sim.max_in_flight * QUEUE_PER_IN_FLIGHT
        self.up = False
        self.opened = False
        self.ever_up = False
        self.registered: socket.socket | None = None
        self.closing = False
        self.retry_at = 0.0
        self.failures = 0
        # mid -> (local asset, epoch, seq, publish time): QoS 1 messages awaiting their PUBACK.
        self.pending: dict[int, tuple[int, int, int, float]] = {}
        # (topic, payload, ident) of QoS 1 messages waiting for a free slot in the window.
        self.backlog: deque[tuple[str, bytes, tuple[int, int, int]]] = deque()
        self.unflushed = 0  # QoS 0 publishes handed to paho, not yet written to the socket
        self.buffered: BufferedSocket | None = None
        self.dirty = False
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
            client.on_publish = self._on_publish  # QoS 0: one ReasonCode + Properties per write
        return client

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.window

    def connect(self) -> None:
        """Open the TCP connection and queue CONNECT (the CONNACK arrives through `read`)."""
        if self.ever_up or self.failures:
            self.client.reconnect()
        else:
            self.client.connect(self._host, self._port, keepalive=self._keepalive)

    def read(self) -> None:
        client = self.client
        client.loop_read()
        # paho reads at most one packet per message it holds; PUBACKs already in our buffer
        # would otherwise wait for the next readable event, which may never come.
        buffered = self.buffered
        while buffered is not None and buffered.buffered and client.socket() is not None:
            client.loop_read()

    def flush(self) -> bool:
        """Hand paho's queued packets to the socket; False when the kernel buffer is full."""
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
            # Bounded by the window in force: Mosquitto's default Receive Maximum is 20, and 10
            # per slot of the configured 1,000 would queue 2.5 GB over 400 slow connections.
            self.queue_limit = max(100, self.window * QUEUE_PER_IN_FLIGHT)
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


class _Published:
    """Stands in for the `MQTTMessageInfo` paho marks as published once a QoS 0 packet is
    written: nobody waits on it, and building one (a `threading.Condition`) cost a quarter of
    the engine's CPU at QoS 0."""

    __slots__ = ()

    def _set_as_published(self) -> None:
        pass


_PUBLISHED = _Published()
# paho 2.x's packet encoder; absent (another major version) -> the public publish().
_FAST_QOS0 = callable(getattr(mqtt.Client, "_send_publish", None)) and callable(
    getattr(mqtt.Client, "_mid_generate", None)
)


def publish_qos0(client: mqtt.Client, topic: bytes, payload: bytes) -> bool:
    """A QoS 0 PUBLISH through paho's own encoder and queue, without the per-message objects
    of `publish()`: topic already encoded (and valid: built from the route template), no info
    object. True when queued."""
    if _FAST_QOS0:
        info: Any = _PUBLISHED  # paho marks it published; see _Published
        rc = client._send_publish(client._mid_generate(), topic, payload, 0, False, False, info)
    else:
        rc = client.publish(topic.decode(), payload, 0).rc
    return rc == MQTTErrorCode.MQTT_ERR_SUCCESS
