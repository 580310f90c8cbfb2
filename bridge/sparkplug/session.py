"""The Sparkplug B host application's MQTT session and its path into the telemetry streams.

The connection is the host's own, beside the bridge's persistent session, because Sparkplug asks
for the opposite kind (spec 5.8, host session establishment):
- a clean session: MQTT 3.1.1 clean session, MQTT 5 clean start with session expiry 0
  (tck-id-operational-behavior-host-application-connect-session-clean-start,
  -session-expiry-interval for 5.0, tck-id-principles-persistence-clean-session-311 for 3.1.1);
- the Will on `spBv1.0/STATE/<host id>`, QoS 1, retained, `{"online": false, "timestamp": T}`
  with T the time of this CONNECT (tck-id-host-topic-phid-death-topic, -death-payload, -death-qos,
  -death-retain, -death-payload-timestamp-connect); a new client, so a new Will, per connection;
- subscriptions first, STATE birth after the SUBACK: `{"online": true, "timestamp": T}` with the
  Will's T, QoS 1, retained (tck-id-host-topic-phid-birth-sub-required, -birth-topic,
  -birth-payload, -birth-payload-timestamp, -birth-qos, -birth-retain,
  tck-id-operational-behavior-host-application-connect-birth);
- its own STATE seen offline while connected is answered with the birth again
  (tck-id-message-flow-hid-sparkplug-state-message-delivered);
- a clean stop publishes `{"online": false, "timestamp": <now>}` before DISCONNECT
  (tck-id-operational-behavior-host-application-disconnect-intentional,
  tck-id-host-topic-phid-death-payload-timestamp-disconnect-clean). Edge nodes that watch this
  host then store and forward (spec 5.17): the data they hold comes later, `is_historical`.

Every received message goes through `Host.handle` (births, aliases, sequence, deaths) in arrival
order; the entries, death events and dead letters of a batch are written with the bridge's sink
(`RedisSink.write`: one atomic script, dedup on `(asset, seq)`), and a batch's QoS 1 messages are
acknowledged only after that write. Rebirth requests (NCMD) leave at QoS 0, not retained.

Entries go to the route `sparkplug` (`iotbridge:tel:sparkplug`, or its shards by asset). Before
the first entry of an asset after a start, its entry counter resumes from the dedup high-water
mark, so a restarted host never reuses a seq the dedup has seen. A death is an entry too:
`sp.type` NDEATH or DDEATH, `sp.online` 0, `sp.stale` the value names now stale, and no values.

The host is online only while Redis takes its writes: a failed write takes it offline (STATE,
DISCONNECT), so edge nodes store and forward; the batch is held and retried with backoff, and the
host connects again once a write succeeds.

Bounds: at most `bridge.max_in_flight` messages wait for the writer; past that, QoS 0 messages
are dropped and counted (QoS 1 ones wait unacknowledged: the broker's receive maximum bounds them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from bridge.record import Reason
from bridge.sink import Append, Dedup, make_sink
from bridge.sparkplug import names
from bridge.sparkplug.host import Host
from bridge.sparkplug.publish import Publication
from bridge.sparkplug.records import Entry, Event, Outcome, Refusal
from bridge.sparkplug.topic import MessageType, subscriptions
from config.errors import SinkUnavailable, SourceUnavailable
from config.keys import Keys, shard_of
from config.settings import Settings
from observability.lifecycle import Backoff, wait_any
from observability.metrics import SparkplugMetrics

log = logging.getLogger(__name__)

ROUTE = "sparkplug"
# Messages handled per write: one round trip for a burst, a short wait for a single message.
_BATCH = 500
# How long paho's network loop waits in select before looking at its stop flag again.
_PUMP_TIMEOUT_S = 0.2
_MESSAGE_TYPES = frozenset({*(str(t) for t in MessageType), "STATE"})
_COMMANDS = frozenset({str(MessageType.NCMD), str(MessageType.DCMD)})


@dataclass(slots=True)
class Received:
    """A message as paho handed it over, with the connection it came on (acks go on that one)."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    generation: int
    received_wall: float


class SparkplugSession:
    """The host's connection, reconnecting with backoff, and the writer behind it."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.sparkplug = settings.sparkplug
        self.metrics = SparkplugMetrics(registry)
        self.host = Host.from_settings(self.sparkplug)
        self.keys = Keys.of(settings.redis)
        self.streams = self.keys.telemetry_streams(ROUTE)
        self._dedup = [self.keys.dedup(ROUTE, shard) for shard in range(self.keys.shards)]
        self.sink = make_sink(settings.redis, [self.keys.dead_letters, *self.streams, *self._dedup])
        self.queue: deque[Received] = deque()
        self._max_queued = settings.bridge.max_in_flight
        self._arrived = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._lost = asyncio.Event()
        # Redis took the last write (up) or refused it (down): the host is online only while up.
        self._sink_up = asyncio.Event()
        self._sink_up.set()
        self._sink_down = asyncio.Event()
        self._connack: asyncio.Future[int] | None = None
        self._suback: asyncio.Future[list[ReasonCode]] | None = None
        self._resumed: set[str] = set()
        self._stale: dict[str, int] = {}  # asset -> metrics stale since its death
        self._online: dict[str, str] = {}  # asset online -> level
        self.generation = 0
        self._stopping = False  # stop was asked: no reconnect during the drain
        self.online = False  # connected and the STATE birth published

    # --- the connection -------------------------------------------------------------------------

    def _make_client(self, will: Publication) -> mqtt.Client:
        s = self.settings.mqtt
        v5 = s.protocol == "5"
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{s.client_id}-spb-{self.sparkplug.host_id}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
            manual_ack=True,
        )
        if s.username:
            client.username_pw_set(
                s.username, s.password.get_secret_value() if s.password else None
            )
        if s.tls_enabled:
            client.tls_set(ca_certs=s.tls.ca_file, certfile=s.tls.cert_file, keyfile=s.tls.key_file)
            client.tls_insecure_set(s.tls.insecure_skip_verify)
        client.will_set(will.topic, will.payload, will.qos, will.retain)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        return client

    def _hop(self, fn: Any, *args: Any) -> None:
        """paho calls back on its network thread: run `fn` on the event loop."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under a late callback
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._hop(_settle, self._connack, reason.value)

    def _on_subscribe(
        self, _c: Any, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        self._hop(_settle, self._suback, reasons)

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._hop(self._mark_lost, str(reason))

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode(errors="replace")
        received = Received(message.mid, message.qos, topic, bytes(message.payload), self.generation,
                            time.time())  # fmt: skip
        self._hop(self._receive, received)

    def _mark_lost(self, reason: str) -> None:
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectionError(f"closed before CONNACK: {reason}"))
        if self.online:
            log.warning("sparkplug host connection lost", extra={"reason": reason})
        self.online = False
        self.metrics.connected.set(0)
        self._lost.set()

    def _receive(self, received: Received) -> None:
        kind = received.topic.split("/")[2] if received.topic.count("/") >= 2 else ""
        if received.topic.startswith("spBv1.0/STATE/"):
            kind = "STATE"
        self.metrics.received.labels(kind if kind in _MESSAGE_TYPES else "invalid").inc()
        if kind in _COMMANDS:
            # Commands to edge nodes (this host's own rebirth requests among them, as it subscribes
            # to whole groups): the host ignores them, so they take no room in the queue.
            return
        if received.qos == 0 and len(self.queue) >= self._max_queued:
            self.metrics.dropped.inc()
            return
        self.queue.append(received)
        self._arrived.set()

    async def _connect(self) -> threading.Thread:
        """CONNECT with a Will of now, SUBSCRIBE, then the STATE birth; the network thread."""
        s = self.settings.mqtt
        assert self._loop is not None
        will, birth = self.host.start_session(round(time.time() * 1000))
        client = self._client = self._make_client(will)
        self.generation += 1
        self._lost.clear()
        self._connack = self._loop.create_future()
        self._suback = self._loop.create_future()
        properties = None
        if s.protocol == "5":
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
        try:
            await asyncio.to_thread(
                client.connect, s.host, s.port, s.keepalive_s,
                clean_start=True, properties=properties,
            )  # fmt: skip
        except OSError as exc:
            raise SourceUnavailable(f"{s.host}:{s.port}: {exc}") from exc
        pump = threading.Thread(target=_pump, args=(client,), name="sparkplug-mqtt", daemon=True)
        pump.start()
        filters = subscriptions(self.sparkplug.groups, self.sparkplug.host_id)
        try:
            async with asyncio.timeout(s.connect_timeout_s):
                await self._handshake(client, filters)
        except (TimeoutError, ConnectionError, SourceUnavailable) as exc:
            client.disconnect()
            await _finish(pump, client)
            if isinstance(exc, SourceUnavailable):
                raise
            raise SourceUnavailable(f"{s.host}:{s.port}: {exc or type(exc).__name__}") from exc
        self._publish(birth)
        self.online = True
        self.metrics.connected.set(1)
        log.info("sparkplug host online", extra={"host_id": self.sparkplug.host_id,
                                                 "filters": filters})  # fmt: skip
        return pump

    async def _handshake(self, client: mqtt.Client, filters: list[str]) -> None:
        """CONNACK, then SUBSCRIBE and its SUBACK: only then may the birth go out."""
        assert self._connack is not None
        assert self._suback is not None
        s = self.settings.mqtt
        code = await self._connack
        if code != 0:
            raise SourceUnavailable(f"{s.host}:{s.port} refused the connection: {code}")
        client.subscribe([(f, 1) for f in filters])
        refused = [str(r) for r in await self._suback if r.is_failure]
        if refused:
            raise SourceUnavailable(f"subscription refused: {refused}")

    def _publish(self, publication: Publication) -> mqtt.MQTTMessageInfo | None:
        client = self._client
        if client is None:
            return None
        return client.publish(publication.topic, publication.payload, publication.qos,
                              publication.retain)  # fmt: skip

    async def _connection(self, closing: asyncio.Event) -> None:
        """Online while Redis takes the writes: when a write fails the host goes offline (STATE,
        DISCONNECT), so edge nodes store and forward, and connects again once Redis is back."""
        backoff = Backoff(self.settings.backoff)
        while not closing.is_set() and not self._stopping:
            if self._sink_down.is_set():
                await wait_any(self._sink_up, closing)
                continue
            try:
                pump = await self._connect()
            except SourceUnavailable as exc:
                if backoff.attempts == 0:
                    log.warning("sparkplug host: mqtt unavailable, retrying with backoff",
                                extra={"error": str(exc)})  # fmt: skip
                self.metrics.reconnects.labels("mqtt").inc()
                if await backoff.wait(closing):
                    return
                continue
            backoff.reset()
            await wait_any(self._lost, closing, self._sink_down)
            if not self._lost.is_set():
                await self._go_offline()
            await _finish(pump, self._client)

    async def _state_offline(self) -> None:
        """STATE offline at the time of the stop, once, and wait for its PUBACK."""
        if not self.online:
            return
        info = self._publish(self.host.stop_session(round(time.time() * 1000)))
        self.online = False
        self.metrics.connected.set(0)
        if info is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # the connection went meanwhile
                await asyncio.to_thread(info.wait_for_publish, self.settings.mqtt.connect_timeout_s)

    async def _go_offline(self) -> None:
        """The clean stop: STATE offline (unless published already), then DISCONNECT."""
        await self._state_offline()
        assert self._client is not None
        self._client.disconnect()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.mqtt.connect_timeout_s):
                await self._lost.wait()
        log.info("sparkplug host offline", extra={"host_id": self.sparkplug.host_id})

    def drop_connection(self) -> None:
        """Close the socket without DISCONNECT, as a network failure would (the broker then
        publishes the Will): for fault tests and for a link found dead."""
        if self._client is not None:
            sock = self._client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # --- the writer -----------------------------------------------------------------------------

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        if self.queue or stop.is_set():
            return
        deadline = self.host.next_deadline
        timeout = None if deadline is None else max(0.0, deadline - time.time())
        self._arrived.clear()
        waiters = [asyncio.ensure_future(self._arrived.wait()),
                   asyncio.ensure_future(stop.wait())]  # fmt: skip
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _write_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.settings.backoff)
        while not (stop.is_set() and not self.queue):
            await self._wait_for_work(stop)
            batch = [self.queue.popleft() for _ in range(min(_BATCH, len(self.queue)))]
            if batch:
                await self._until_stored(self._resume_counters, batch, backoff)
            appends, out = self._handle(batch)
            # Nothing to write says nothing about Redis: only a real write may bring the host back.
            flags = await self._until_stored(self._write, appends, backoff) if appends else []
            self._acknowledge(batch)
            for command in out.commands:
                self._publish(command)
            self._count(out, appends, flags)

    async def _until_stored(self, step: Any, arg: Any, backoff: Backoff) -> Any:
        """Run a Redis step until it succeeds, waiting for the backoff delay after each failure
        (the batch is held meanwhile: nothing is acknowledged)."""
        while True:
            try:
                result = await step(arg)
            except SinkUnavailable as exc:
                if backoff.attempts == 0:
                    log.warning("sparkplug host: redis unavailable, going offline, holding and "
                                "retrying", extra={"error": str(exc), "queued": len(self.queue)})  # fmt: skip
                self._sink_up.clear()
                self._sink_down.set()
                self.metrics.reconnects.labels("redis").inc()
                await asyncio.sleep(backoff.next_delay())
                continue
            if backoff.attempts:
                log.info("sparkplug host: redis available", extra={"retries": backoff.attempts})
            backoff.reset()
            return result

    async def _resume_counters(self, batch: list[Received]) -> None:
        """Entries of an asset this run has not written yet continue its dedup high-water mark.
        Only a birth makes an asset writable, so births are the messages to look at."""
        for received in batch:
            levels = received.topic.split("/")
            if len(levels) not in (4, 5) or levels[2] not in ("NBIRTH", "DBIRTH"):
                continue
            try:
                asset = names.asset_id(
                    levels[1], levels[3], levels[4] if len(levels) == 5 else None
                )
            except ValueError:
                continue  # the host refuses the topic
            if asset in self._resumed:
                continue
            key = self._dedup[shard_of(asset, self.keys.shards)]
            try:
                state = await self.sink.client.hget(key, asset)
            except (RedisError, OSError) as exc:
                raise SinkUnavailable(f"redis: {exc}") from exc
            if state is not None:
                self.host.counters.resume(asset, int(_text(state).split(" ", 1)[0]))
            self._resumed.add(asset)

    def _handle(self, batch: list[Received]) -> tuple[list[Append], Outcome]:
        total = Outcome()
        appends: list[Append] = []
        limit = self.settings.bridge.max_payload_bytes
        for received in batch:
            if len(received.payload) > limit:
                detail = f"{len(received.payload)} bytes, over {limit}"
                out = Outcome(refusals=[Refusal(received.topic, Reason.SIZE, detail)])
            else:
                out = self.host.handle(received.topic, received.payload, received.received_wall)
            self._appends(out, received, appends)
            total.extend(out)
        out = self.host.expire(time.time())
        self._appends(out, None, appends)
        total.extend(out)
        return appends, total

    def _appends(self, out: Outcome, received: Received | None, appends: list[Append]) -> None:
        now = received.received_wall if received is not None else time.time()
        rx = repr(now)
        for entry in out.entries:
            problem = self._clock_problem(entry, now)
            if problem is None:
                appends.append(self._entry(entry, rx))
            else:
                out.refusals.append(Refusal(_entry_topic(entry), Reason.CLOCK, problem))
        for event in out.events:
            self._track(event)
            if not event.online:
                appends.append(self._death(event, rx))
        for refusal in out.refusals:
            appends.append(self._dead_letter(refusal, received, rx))

    def _clock_problem(self, entry: Entry, now: float) -> str | None:
        """The bridge's clock window (`bridge.clock`), as for JSON devices; historical values
        (store and forward) may be older than `max_past_s`, never in the future."""
        clock = self.settings.bridge.clock
        if clock.max_future_s is not None and entry.ts > now + clock.max_future_s:
            return f"ts {entry.ts:.3f} is {entry.ts - now:.0f} s in the future"
        historical = entry.extra.get("sp.historical") == "1"
        if not historical and clock.max_past_s is not None and entry.ts < now - clock.max_past_s:
            return f"ts {entry.ts:.3f} is {now - entry.ts:.0f} s in the past"
        return None

    def _telemetry(self, asset: str, seq: int, ts: float, fields: dict[str, str]) -> Append:
        shard = shard_of(asset, self.keys.shards)
        flat = [item for pair in fields.items() for item in pair]
        dedup = Dedup(self._dedup[shard], asset, seq, ts)
        return Append.of(self.streams[shard], flat, dedup)

    def _entry(self, entry: Entry, rx: str) -> Append:
        fields = entry.fields()
        fields["route"], fields["rx"] = ROUTE, rx
        return self._telemetry(entry.asset, entry.seq, entry.ts, fields)

    def _death(self, event: Event, rx: str) -> Append:
        seq = self.host.counters.take(event.asset)
        fields = {"asset": event.asset, "seq": str(seq), "ts": repr(event.ts), "route": ROUTE,
                  "rx": rx, "sp.type": event.cause, "sp.online": "0",
                  "sp.stale": ",".join(event.stale)}  # fmt: skip
        if event.bd_seq is not None:
            fields["sp.bdseq"] = str(event.bd_seq)
        return self._telemetry(event.asset, seq, event.ts, fields)

    def _dead_letter(self, refusal: Refusal, received: Received | None, rx: str) -> Append:
        cap = self.settings.bridge.dlq_payload_bytes
        detail = refusal.detail if refusal.metric is None else f"{refusal.metric}: {refusal.detail}"
        fields: list[bytes | str] = ["topic", refusal.topic, "route", ROUTE, "reason",
                                     refusal.reason.value, "error", detail[:500], "rx", rx]  # fmt: skip
        if received is not None and received.topic == refusal.topic:
            fields += ["size", str(len(received.payload)), "payload", received.payload[:cap]]
        return Append.of(self.keys.dead_letters, fields)

    def _track(self, event: Event) -> None:
        # `/` is the only character escaped as `.`: a device's asset has two, a node's one.
        level = "device" if event.asset.count(".") == 2 else "node"
        if event.online:
            self.metrics.births.labels(level).inc()
            self._online[event.asset] = level
            self._stale.pop(event.asset, None)
        else:
            self.metrics.deaths.labels(level).inc()
            self._online.pop(event.asset, None)
            self._stale[event.asset] = len(event.stale)
        for name in ("node", "device"):
            self.metrics.online.labels(name).set(sum(1 for v in self._online.values() if v == name))
        self.metrics.stale_metrics.set(sum(self._stale.values()))

    async def _write(self, appends: list[Append]) -> list[int]:
        written, _ = await self.sink.write(appends)
        # Only a write that went through says Redis is back (a batch with no Redis step does not).
        self._sink_down.clear()
        self._sink_up.set()
        return written

    def _acknowledge(self, batch: list[Received]) -> None:
        client = self._client
        if client is None:
            return
        for received in batch:
            # An ack for an earlier connection's packet id would name another message on this one.
            if received.qos == 1 and received.generation == self.generation:
                client.ack(received.mid, received.qos)

    def _count(self, out: Outcome, appends: list[Append], flags: list[int]) -> None:
        m = self.metrics
        for append, flag in zip(appends, flags, strict=True):
            if append.dedup is None:
                continue
            (m.entries if flag else m.duplicates).inc()
        for refusal in out.refusals:
            m.rejected.labels(refusal.reason.value).inc()
        m.rebirth_requests.inc(sum(1 for c in out.commands if "/NCMD/" in c.topic))
        m.rebirths_suppressed.inc(out.rebirths_suppressed)
        m.gaps.inc(out.missing)
        m.unknown.inc(out.unknown)
        m.unplaced.inc(out.unplaced)

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Connect and write until `stop`; then STATE offline, write what was received within
        `bridge.shutdown_grace_s`, DISCONNECT."""
        self._loop = asyncio.get_running_loop()
        closing = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tasks:
                connection = tasks.create_task(self._connection(closing), name="sparkplug-mqtt")
                writer = tasks.create_task(self._write_loop(stop), name="sparkplug-writer")
                await stop.wait()
                self._stopping = True
                # Offline first, so edge nodes start storing what the drain would miss.
                await self._state_offline()
                grace = self.settings.bridge.shutdown_grace_s
                try:
                    async with asyncio.timeout(grace):
                        await asyncio.shield(writer)
                except TimeoutError:
                    log.warning("sparkplug host: %d message(s) not written in %.1f s",
                                len(self.queue), grace)  # fmt: skip
                    writer.cancel()
                closing.set()
                await connection
        finally:
            await self.sink.close()


def _entry_topic(entry: Entry) -> str:
    """The topic an entry came on (for a dead letter): rebuilt from its type and asset."""
    try:
        group, node, *device = names.unescape(entry.asset).split("/")
    except ValueError:
        return entry.asset  # a shortened id: not reversible
    return "/".join(["spBv1.0", group, entry.extra.get("sp.type", ""), node, *device])


def _text(value: bytes | str) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _settle(future: asyncio.Future[Any] | None, result: Any) -> None:
    if future is not None and not future.done():
        future.set_result(result)


async def _finish(pump: threading.Thread, client: mqtt.Client | None) -> None:
    """Wait for the network thread of a connection that ended, then close the client's sockets:
    paho closes them only when the client is collected, and a reference cycle may delay that."""
    await asyncio.to_thread(pump.join)
    if client is not None:
        client._reset_sockets()


def _pump(client: mqtt.Client) -> None:
    """paho's network loop for one connection, on its own thread, until the connection ends."""
    while True:
        code = client.loop(_PUMP_TIMEOUT_S)
        if code != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return
