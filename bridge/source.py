"""The MQTT source: a persistent session whose messages are acknowledged only when the app says so.

paho-mqtt 2.x is driven directly from the asyncio event loop (its socket callbacks register the
socket with the loop) with `manual_ack=True`: aiomqtt 2.x has no manual acknowledgement (aiomqtt
issue 345), and its thread hop per message costs more than half the QoS 1 throughput.

Acknowledgements are tied to a connection generation: after a reconnect the broker resends every
unacknowledged message, so an ack meant for the old connection is dropped rather than sent on the
new one, where the same packet id may name a different message.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from bridge.mqtt_client import BufferedClient
from config.errors import SourceUnavailable
from config.settings import MqttSettings
from observability.lifecycle import Backoff
from observability.metrics import BridgeMetrics

log = logging.getLogger(__name__)

# paho needs loop_misc() about once a second for keepalive pings and timeouts.
_MISC_INTERVAL_S = 1.0
# Packets handled per readable event before yielding to the event loop, so a Redis reply, its
# acks and the next batch wait for at most one such slice (about 1.5 ms) of a backlog being read.
# With 1,000 (15 ms) the writer stalled behind the reads whenever the bridge fell behind: bench
# runs at 22,000 msg/s beside a half-core CPU hog had a p99 publish-to-XADD of 54-396 ms (3 runs);
# with 100, 17-64 ms (6 runs).
_PACKETS_PER_READ = 100


@dataclass(slots=True)
class Inbound:
    """A message as received, before routing: the app acknowledges it with `MqttSource.ack`."""

    mid: int
    qos: int
    topic: str | None  # None when the topic is not valid UTF-8
    raw_topic: bytes
    payload: bytes
    retain: bool
    generation: int
    received: float  # time.monotonic()
    received_wall: float  # time.time()


class MqttSource:
    """One MQTT connection with a persistent session, reconnecting with backoff."""

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: list[tuple[str, int]],
        on_message: Callable[[Inbound], None],
        metrics: BridgeMetrics,
        backoff: Backoff,
        lease_valid: Callable[[], bool] | None = None,
    ) -> None:
        self._settings = settings
        # A partition's session (bridge.partitions): acknowledged and reconnected only while
        # this bridge holds the partition's lease.
        self._lease_valid = lease_valid
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._metrics = metrics
        self._backoff = backoff
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client = self._make_client()
        self._connack: asyncio.Future[tuple[int, bool]] | None = None
        self._lost = asyncio.Event()
        self._closing = asyncio.Event()
        self.generation = 0
        self.connected = False
        self.subscribed = False
        self.subscribed_event = asyncio.Event()
        # The filters the broker's session holds from an earlier run (None: unknown), so a changed
        # route table is noticed even when the session is resumed.
        self.previous_filters: set[str] | None = None
        self.paused = False
        # Reading stopped while the app holds its bound of messages in flight (`hold`).
        self.held = False
        self._last_rx = 0.0
        self._rx, self._rx_wall = time.monotonic(), time.time()  # when what is read now arrived

    def _make_client(self) -> BufferedClient:
        s = self._settings
        v5 = s.protocol == "5"
        client = BufferedClient(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=s.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        if s.username:
            password = s.password.get_secret_value() if s.password else None
            client.username_pw_set(s.username, password)
        if s.tls_enabled:
            client.tls_set(
                ca_certs=s.tls.ca_file,
                certfile=s.tls.cert_file,
                keyfile=s.tls.key_file,
                cert_reqs=ssl.CERT_NONE if s.tls.insecure_skip_verify else ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(s.tls.insecure_skip_verify)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish_raw = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        return client

    # --- socket callbacks: may run on the connect thread, so hop onto the loop ------------------

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def _socket_open(self, client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self._on_loop(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        assert self._loop is not None
        self.held = False  # a new connection: the app holds again if it must
        if not self.paused and sock.fileno() >= 0:
            self._client.reset_buffer()
            self._loop.add_reader(sock, self._readable)

    def _readable(self) -> None:
        if self.paused or self.held:
            return
        # One reading of the clocks for the packets handled now: they were received together.
        self._last_rx = self._rx = time.monotonic()
        self._rx_wall = time.time()
        # Bounded, so the writer and timers run between bursts; bytes left in the buffer would
        # never make the socket readable again, so the rest is scheduled right away.
        if self._client.read_available(_PACKETS_PER_READ):
            assert self._loop is not None
            self._loop.call_soon(self._readable)

    def _socket_close(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)

    def _register_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        self._on_loop(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        assert self._loop is not None
        if sock.fileno() >= 0:
            self._loop.add_writer(sock, self._client.loop_write)

    def _unregister_write(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.remove_writer(sock)

    # --- protocol callbacks (on the loop) -------------------------------------------------------

    def _handle_connect(
        self, _c: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, _p: Any
    ) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_result((reason.value, flags.session_present))

    def _handle_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, reason: ReasonCode, _p: Any
    ) -> None:
        if self._closing.is_set():
            log.info("mqtt disconnected")
        elif self.connected:
            log.warning("mqtt connection lost", extra={"reason": str(reason)})
        if self._connack is not None and not self._connack.done():
            # Closed before the CONNACK (the broker is restarting, a proxy let us in and hung up):
            # fail this attempt now rather than after connect_timeout_s, so the retry comes soon.
            self._connack.set_exception(ConnectionError(f"closed before CONNACK: {reason}"))
        self._mark_lost()

    def _mark_lost(self) -> None:
        self.connected = False
        self._metrics.connected.labels("mqtt").set(0)
        self._lost.set()

    def _handle_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error("subscription refused by the broker", extra={"reasons": refused})
            return
        self._confirm_subscribed()
        log.info("subscribed", extra={"filters": [f for f, _ in self._subscriptions]})

    def _handle_publish(
        self, mid: int, qos: int, retain: bool, topic: bytes, payload: bytes
    ) -> None:
        try:
            text: str | None = topic.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        self._on_message(
            Inbound(
                mid, qos, text, topic, payload, retain, self.generation, self._rx, self._rx_wall
            )
        )

    # --- the app's side -------------------------------------------------------------------------

    def ack(self, inbound: list[Inbound]) -> None:
        """Acknowledge messages (QoS 1: PUBACK), in order, in one write; messages received on an
        earlier connection are skipped (the broker resends them on this one)."""
        if not self.connected:
            return
        if self._lease_valid is not None and not self._lease_valid():
            self._metrics.acks_fenced.inc(len(inbound))
            return
        generation = self.generation
        self._client.ack_many([m.mid for m in inbound if m.qos == 1 and m.generation == generation])

    def hold(self) -> None:
        """Stop reading until `release`: the app holds as many messages as it may. What the
        broker sends meanwhile waits in the socket buffers (TCP flow control), then at the broker."""
        if self.held:
            return
        self.held = True
        sock = self._client.socket()
        if self._loop is not None and sock is not None:
            self._loop.remove_reader(sock)

    def release(self) -> None:
        """Read again after `hold`, starting with what is already buffered."""
        if not self.held:
            return
        self.held = False
        self._last_rx = time.monotonic()  # silence is counted from here, not from the hold
        sock = self._client.socket()
        if self._loop is not None and sock is not None and not self.paused:
            self._loop.add_reader(sock, self._readable)
            self._loop.call_soon(self._readable)

    def pause(self) -> None:
        """Stop reading from the broker (shutdown); unread messages stay with the broker."""
        self.paused = True
        sock = self._client.socket()
        if self._loop is not None and sock is not None:
            self._loop.remove_reader(sock)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, keep the connection alive, reconnect with backoff, until `close()`."""
        self._loop = asyncio.get_running_loop()
        while not self._closing.is_set():
            if self._lease_valid is not None and not self._lease_valid():
                # Another bridge may own the partition now: connecting would take its session.
                log.warning("partition lease lapsed; not reconnecting",
                            extra={"client_id": self._settings.client_id})  # fmt: skip
                break
            try:
                await self._connect()
            except SourceUnavailable as exc:
                delay_log = self._backoff.attempts == 0
                if delay_log:
                    log.warning(
                        "mqtt unavailable, retrying with backoff", extra={"error": str(exc)}
                    )
                self._metrics.reconnects.labels("mqtt").inc()
                if await self._backoff.wait(self._closing):
                    break
                continue
            self._backoff.reset()
            await self._keepalive_until_lost()

    async def _connect(self) -> None:
        s = self._settings
        assert self._loop is not None
        self._lost.clear()
        self._connack = self._loop.create_future()
        self.generation += 1
        properties = None
        if s.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = s.session_expiry_s
            properties.ReceiveMaximum = s.receive_maximum
        try:
            # connect() resolves and opens a socket: blocking, so off the event loop.
            if properties is None:
                await asyncio.to_thread(self._client.connect, s.host, s.port, s.keepalive_s)
            else:
                await asyncio.to_thread(
                    self._client.connect, s.host, s.port, s.keepalive_s,
                    clean_start=False, properties=properties,
                )  # fmt: skip
            async with asyncio.timeout(s.connect_timeout_s):
                code, session_present = await self._connack
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._client.disconnect()
            raise SourceUnavailable(f"{s.host}:{s.port}: {exc or type(exc).__name__}") from exc
        if code != 0:
            self._client.disconnect()
            raise SourceUnavailable(f"{s.host}:{s.port} refused the connection: {code}")
        self.connected = True
        self._metrics.connected.labels("mqtt").set(1)
        self._metrics.session_present.set(int(session_present))
        log.info("mqtt connected", extra={"broker": f"{s.host}:{s.port}",
                                          "session_present": session_present})  # fmt: skip
        current = {f for f, _ in self._subscriptions}
        # Subscribed on every connect, a resumed session included: a broker may resume a session
        # without its subscriptions. Mosquitto 2.0.11 does not write $share subscriptions to its
        # persistence file, so after its restart a shared subscriber's session comes back empty
        # and, were it trusted, nothing would be delivered again. Subscribing to a filter the
        # session still holds replaces it (MQTT 5 3.8.4) and, with retain handling 1, replays
        # no retained message.
        self.subscribed = False
        # A resumed session may hold an older route table's filters.
        stale = sorted((self.previous_filters or set()) - current)
        if session_present and stale:
            self._client.unsubscribe(stale)
            log.info(
                "unsubscribed from filters no longer in the route table",
                extra={"filters": stale},
            )
        self._subscribe()

    def _confirm_subscribed(self) -> None:
        self.subscribed = True
        self.previous_filters = {f for f, _ in self._subscriptions}
        self.subscribed_event.set()

    def _subscribe(self) -> None:
        if self._settings.protocol == "5":
            # retainHandling 1: retained messages only for a new subscription, not on resume.
            topics: list[tuple[str, Any]] = [
                (f, SubscribeOptions(qos=q, retainHandling=1)) for f, q in self._subscriptions
            ]
        else:
            topics = list(self._subscriptions)
        result, _mid = self._client.subscribe(topics)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._client.disconnect()

    async def _keepalive_until_lost(self) -> None:
        """Drive paho's keepalive, and close a silent link after 1.5 keepalives (the limit
        MQTT gives a broker; paho alone waits a full keepalive for a PINGRESP, about 2)."""
        self._last_rx = time.monotonic()
        limit_s = 1.5 * self._settings.keepalive_s
        while not self._lost.is_set():
            self._client.loop_misc()
            silent_s = time.monotonic() - self._last_rx
            if silent_s > limit_s and not self.paused and not self.held:
                log.warning("mqtt link silent for %.1f s, reconnecting", silent_s)
                # Closed at once: a DISCONNECT would wait behind a dead link's send buffer.
                self._client._sock_close()
                self._mark_lost()
                break
            try:
                async with asyncio.timeout(_MISC_INTERVAL_S):
                    await self._lost.wait()
            except TimeoutError:
                continue

    async def close(self, timeout_s: float = 2.0) -> None:
        """Send DISCONNECT after the queued acks, and stop reconnecting."""
        self._closing.set()
        if self.connected:
            self._client.disconnect()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._lost.wait()
            except TimeoutError:
                log.warning("mqtt disconnect not confirmed in time")
        self._lost.set()
