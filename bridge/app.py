"""Bridge wiring: MQTT source -> intake -> batched atomic write (Redis, or the spool) -> acks.

Intake runs inside the source's message callback (synchronous and cheap); the message then waits
in `pending` until a batch carrying it is stored, and only then is it acknowledged. Up to
`batch.pipeline` batches are written to Redis at once, on one connection whose replies come in
order, so the bridge packs the next batch while Redis runs the last, and a slow reply does not
hold the next batch past its `max_delay_ms`; batches are settled oldest first, so acks leave in
the order messages arrived.

Where a batch is stored: in Redis while the spool is empty; in the spool (fsynced) while Redis is
away or the spool still holds older batches, which drain to Redis first. With no spool, or a full
one, the batch is held: no acks, the broker stops sending at the receive maximum, and the writer
retries with backoff. It never busy-loops: every retry waits for its backoff delay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.intake import Intake, Pending
from bridge.partitions import PartitionedSource
from bridge.retention import Retention
from bridge.sink import ReplicasBehind, make_sink
from bridge.source import Inbound, MqttSource
from bridge.sparkplug.session import SparkplugSession
from bridge.spool import Spool, SpoolFull
from config.errors import ConfigError, SinkUnavailable
from config.keys import Keys
from config.settings import Settings
from observability.lifecycle import Backoff, gc_thresholds, wait_any
from observability.metrics import UNROUTED, BridgeMetrics

log = logging.getLogger(__name__)

# Spool batches drained per pass, so new messages keep flowing into the spool meanwhile.
_DRAIN_PER_PASS = 8


@dataclass(slots=True, eq=False)
class _Batch:
    """Messages taken from `pending` together; their Redis write while it runs; its result once
    Redis stored them (acknowledged in their turn). Neither: held, to be stored again."""

    items: list[Pending]
    write: asyncio.Task[tuple[list[int], float]] | None
    result: tuple[list[int], float] | None = None


class BridgeApp:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = BridgeMetrics(registry)
        self.keys = Keys.of(settings.redis)
        self.intake = Intake(settings.bridge, self.keys)
        self.sink = make_sink(settings.redis, self.intake.write_keys)
        self.source: MqttSource | PartitionedSource
        if settings.bridge.partitions:
            # One session per partition owned (leases in Redis), for a fleet of bridges.
            self.source = PartitionedSource(
                settings, self.intake.routes, self._receive, self.metrics
            )
            self.source.watch(self._unacknowledged)
        else:
            self.source = MqttSource(
                settings.mqtt,
                self.intake.routes.subscriptions(settings.bridge.shared_group),
                self._receive,
                self.metrics,
                Backoff(settings.backoff),
            )
        spool_dir = settings.bridge.spool.dir
        self.spool = None if spool_dir is None else Spool(
            spool_dir, settings.bridge.spool.max_bytes, settings.bridge.spool.segment_bytes
        )  # fmt: skip
        # The Sparkplug B host: its own clean MQTT session, beside the source (bridge.sparkplug).
        self.sparkplug = (
            SparkplugSession(settings, registry) if settings.sparkplug.enabled else None
        )
        self.pending: deque[Pending] = deque()
        self.batches: deque[_Batch] = deque()  # taken from pending, not yet stored and acknowledged
        self._batched = 0  # messages in `batches`
        self._arrived = asyncio.Event()
        self._backoff = Backoff(settings.backoff)
        self._retry_at = 0.0  # monotonic time before which Redis is not tried again
        self._spool_backoff = Backoff(settings.backoff)
        self._spool_retry_at = 0.0  # the same for a full spool
        self.redis_ok = False
        self._redis_error = ""  # why the last write failed, for /readyz
        self.metrics.in_flight.set_function(self.in_flight)
        self.metrics.oldest_unacked_age.set_function(self.oldest_unacked_age_s)
        if self.spool is not None:
            spool = self.spool
            self.metrics.spool_bytes.set_function(lambda: spool.bytes)
            self.metrics.spool_entries.set_function(lambda: spool.entries)
            self.metrics.spool_max_bytes.set(spool.max_bytes)
        self._received = self.metrics.received.values
        self._max_in_flight = settings.bridge.max_in_flight  # read per message
        for route in [*self.intake.route_names, UNROUTED]:
            self._received[route,] = 0
            self.metrics.forwarded.labels(route)

    # --- intake (inside the MQTT callback) ------------------------------------------------------

    def _receive(self, inbound: Inbound) -> None:
        pending = self.intake.classify(inbound)
        self._received[pending.route,] += 1
        if inbound.qos == 0 and self.in_flight() >= self._max_in_flight:
            # At most once was asked for: with the writer behind and the buffer full, drop, count.
            self.metrics.dropped.labels(pending.route).inc()
            return
        self.pending.append(pending)
        if len(self.pending) + self._batched >= self._max_in_flight and self.redis_ok:
            # The bound of what is received and not yet acknowledged. The broker should stop at
            # the receive maximum, but Mosquitto 2.0 sends a resumed session's whole queue at once
            # (191,500 of 200,000 held here, measured): reading stops until acks make room.
            # While Redis is away nothing is acknowledged, and reading goes on as before (the
            # keepalive's replies must be read); the broker's receive maximum bounds it then.
            self.source.hold()
        if len(self.pending) == 1:
            # The writer clears `_arrived` only with nothing pending: the first message wakes it.
            self._arrived.set()

    def in_flight(self) -> int:
        return self._batched + len(self.pending)

    def _unacknowledged(self) -> Iterator[Inbound]:
        for batch in self.batches:
            for item in batch.items:
                yield item.inbound
        for item in self.pending:
            yield item.inbound

    def oldest_unacked_age_s(self) -> float:
        oldest = (
            self.batches[0].items[0] if self.batches else self.pending[0] if self.pending else None
        )
        return 0.0 if oldest is None else time.monotonic() - oldest.inbound.received

    @property
    def spooling(self) -> bool:
        return self.spool is not None and not self.spool.empty

    # --- the writer -----------------------------------------------------------------------------

    def _take_batch(self) -> list[Pending]:
        limits = self.settings.bridge.batch
        batch: list[Pending] = []
        size = 0
        while self.pending and len(batch) < limits.max_size and size < limits.max_bytes:
            item = self.pending.popleft()
            batch.append(item)
            size += len(item.inbound.payload)
        return batch

    def _due_in(self) -> float | None:
        """Seconds until the next batch should leave: 0 once it is full or its oldest message
        has waited `max_delay_ms`; None while nothing is pending."""
        if not self.pending:
            return None
        limits = self.settings.bridge.batch
        if len(self.pending) >= limits.max_size:
            return 0.0
        oldest = self.pending[0].inbound.received
        return max(0.0, oldest + limits.max_delay_ms / 1000 - time.monotonic())

    async def _let_batch_fill(self, stop: asyncio.Event) -> None:
        """Wait until the batch is due, so one round trip carries many."""
        wait_s = self._due_in()
        if wait_s and not stop.is_set():
            await asyncio.sleep(wait_s)

    async def _write_loop(self, stop: asyncio.Event) -> None:
        try:
            while True:
                if stop.is_set() and not self.in_flight():
                    return  # whatever is spooled stays on disk for the next start
                if self.pending and not self.batches:
                    await self._let_batch_fill(stop)
                self._send_batches()
                if self.batches:
                    if await self._next_batch_due(self.batches[0]):
                        continue  # sent beside the head, which is still on its way
                    await self._settle(self.batches[0])
                if self._may_drain(stop):
                    await self._drain_spool()
                await self._wait_for_work(stop)
        finally:
            writes = [b.write for b in self.batches if b.write is not None]
            for write in writes:
                write.cancel()
            await asyncio.gather(*writes, return_exceptions=True)

    @property
    def _direct(self) -> bool:
        """Batches go straight to Redis: nothing older waits in the spool, no retry is due."""
        return not self.spooling and time.monotonic() >= self._retry_at

    def _may_drain(self, stop: asyncio.Event) -> bool:
        """The spool drains whenever nothing is on its way to Redis beside it (which would
        overtake it): also while a batch is held for want of spool space, which the drain frees."""
        return self.spooling and not stop.is_set() and all(b.write is None for b in self.batches)

    def _may_send_beside(self) -> bool:
        """Another batch may join those in flight: a free pipeline slot, every batch ahead of
        it on its way to Redis (none held after a failure), and Redis in use directly."""
        return (
            len(self.batches) < self.settings.bridge.batch.pipeline
            and all(b.write is not None for b in self.batches)
            and self._direct
        )

    def _send_batches(self) -> None:
        """Start the Redis writes of the next batches, up to `batch.pipeline` in flight. While
        another is in flight, a batch leaves only once due (full, or its oldest message has
        waited `max_delay_ms`), so batches stay large and no message waits much longer than the
        delay for a slow reply. Behind a batch whose write failed nothing new is sent: it is
        stored again first (Redis, spool, or held) by `_settle`, one batch at a time, so entries
        keep their order."""
        while self.pending:
            if self.batches and not (self._may_send_beside() and self._due_in() == 0):
                return
            items = self._take_batch()
            write = None
            if self._direct:
                appends = [p.append for p in items if p.append is not None]
                write = asyncio.create_task(self.sink.write(appends), name="redis-write")
            self.batches.append(_Batch(items, write))
            self._batched += len(items)

    async def _next_batch_due(self, head: _Batch) -> bool:
        """Wait for the head's write; True if the next batch fell due first and may be sent
        beside it. Wakes when the head is written, a first message arrives, or the oldest one
        reaches its delay: not per message, and never in a loop while Redis is slow."""
        while head.write is not None and not head.write.done() and self._may_send_beside():
            due_in = self._due_in()
            if due_in == 0:
                return True
            if due_in is not None:
                await asyncio.wait([head.write], timeout=due_in)
                continue
            self._arrived.clear()
            arrival = asyncio.ensure_future(self._arrived.wait())
            try:
                await asyncio.wait([head.write, arrival], return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrival.cancel()
        return False

    async def _settle(self, batch: _Batch) -> None:
        """Finish the oldest batch: its Redis write's outcome, or storing it again after a failure.
        Acknowledged, in order, only once stored."""
        if batch.write is not None:
            write, batch.write = batch.write, None
            try:
                batch.result = await write
            except SinkUnavailable as exc:
                self._redis_failed(exc)
                await self._settle_followers()
                return  # stored again (Redis or spool) once its retry is due
            self._redis_succeeded()
        if batch.result is not None:
            self._written(batch.items, *batch.result)
            self._done()
        elif await self._store(batch.items):
            self._done()

    def _done(self) -> None:
        """The oldest batch is stored and acknowledged: make room, read again if held."""
        self._batched -= len(self.batches.popleft().items)
        if self.source.held and self.in_flight() < self.settings.bridge.max_in_flight:
            self.source.release()

    async def _settle_followers(self) -> None:
        """The oldest write failed: wait for those sent behind it. What Redis stored is kept, to
        be acknowledged in its turn; the rest is held, to be stored again. Their failures are the
        same outage: counted as failed writes, not as another reconnect."""
        for batch in list(self.batches)[1:]:
            if batch.write is None:
                continue
            write, batch.write = batch.write, None
            try:
                batch.result = await write
            except SinkUnavailable as exc:
                self.metrics.write_errors.labels(_kind(exc)).inc()

    def _written(self, batch: list[Pending], written: list[int], duration: float) -> None:
        self.metrics.xadd_duration.observe(duration)
        self.metrics.batch_size.observe(len(batch))
        self._acknowledge(batch, written)

    async def _wait_for_work(self, stop: asyncio.Event) -> None:
        """Return at once when there is work that can be done now; otherwise sleep until there
        is (a message arrives, a retry delay passes, or stop). Every retry waits for its backoff
        delay, so nothing here can spin."""
        now = time.monotonic()
        if self.batches:
            head = self.batches[0]
            if head.write is not None or head.result is not None:
                return
            # Held: stored again once Redis may be tried (directly, or by draining the spool
            # in front of it) or the spool may be tried. This holds while stopping too: the
            # grace period bounds the shutdown.
            due = [self._spool_retry_at] if self.spool is not None else []
            if not self.spooling or not stop.is_set():
                due.append(self._retry_at)
            if min(due) > now:
                await asyncio.sleep(min(due) - now)
            return
        if self.pending:
            return
        timeout: float | None = None
        if self.spooling and not stop.is_set():
            if now >= self._retry_at:
                return
            timeout = self._retry_at - now
        self._arrived.clear()
        try:
            async with asyncio.timeout(timeout):
                await wait_any(self._arrived, stop)
        except TimeoutError:
            pass

    async def _store(self, batch: list[Pending]) -> bool:
        """Store a held batch in Redis or the spool and acknowledge it; False when it must wait."""
        appends = [p.append for p in batch if p.append is not None]
        if self._direct:
            try:
                written, duration = await self.sink.write(appends)
            except SinkUnavailable as exc:
                self._redis_failed(exc)
            else:
                self._redis_succeeded()
                self._written(batch, written, duration)
                return True
        if self.spool is not None and time.monotonic() >= self._spool_retry_at:
            try:
                await asyncio.to_thread(self.spool.append, appends)
            except SpoolFull:
                # Its own delay: the Redis retry timer drives the drain that makes room.
                self.metrics.spool_full.inc()
                self._spool_retry_at = time.monotonic() + self._spool_backoff.next_delay()
                return False
            self._spool_backoff.reset()
            self._acknowledge(batch, None)
            return True
        return False

    async def _drain_spool(self) -> None:
        """Move the oldest spooled batches to Redis, oldest first, while Redis takes them."""
        assert self.spool is not None
        for _ in range(_DRAIN_PER_PASS):
            if time.monotonic() < self._retry_at:
                return
            appends = await asyncio.to_thread(self.spool.peek)
            if appends is None:
                return
            try:
                await self.sink.write(appends)
            except SinkUnavailable as exc:
                self._redis_failed(exc)
                return
            self._redis_succeeded()
            await asyncio.to_thread(self.spool.consume)
            # Not counted again: each message was counted (forwarded, rejected) when its batch
            # was spooled and acknowledged, or by an earlier run. One the stream already holds
            # (a write whose reply was lost landed after all) is dropped here by the dedup.
            if self.spool.empty:
                log.info("spool drained; writing to redis directly")

    def _redis_failed(self, exc: SinkUnavailable) -> None:
        if self.redis_ok or self._backoff.attempts == 0:
            action = "spooling" if self.spool is not None else "holding acks"
            log.warning("redis unavailable, %s and retrying with backoff", action,
                        extra={"error": str(exc), "in_flight": self.in_flight()})  # fmt: skip
        self._set_redis(ok=False)
        self._redis_error = str(exc)
        self.source.release()  # nothing is acknowledged now: read on, as the broker's bound allows
        self.metrics.write_errors.labels(_kind(exc)).inc()
        self.metrics.reconnects.labels("redis").inc()
        self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _redis_succeeded(self) -> None:
        if not self.redis_ok:
            log.info("redis available", extra={"retries": self._backoff.attempts})
        self._backoff.reset()
        self._retry_at = 0.0
        self._set_redis(ok=True)

    def _acknowledge(self, batch: list[Pending], written: list[int] | None) -> None:
        """PUBACK the batch in arrival order and count each message once. `written` has one flag
        per append (the sink's: 0 duplicate, 1 written, 2 written unverified); None when the batch
        went to the spool."""
        self.source.ack([item.inbound for item in batch])
        flags = iter(written) if written is not None else None
        now = time.monotonic()
        wall = time.time()
        counts: Counter[tuple[str, str, str]] = Counter()
        published: list[float] = []
        for item in batch:
            flag = 1 if flags is None or item.append is None else next(flags)
            if item.append is None:
                counts["skipped", item.route, ""] += 1
            elif item.reason is not None:
                counts["rejected", item.route, item.reason.value] += 1
            elif flag == 0:
                counts["duplicates", item.route, ""] += 1
            else:
                counts["forwarded", item.route, ""] += 1
                if flag == 2:
                    counts["unverified", item.route, ""] += 1
                if item.device_ts is not None and flags is not None:
                    published.append(max(0.0, wall - item.device_ts))
        self.metrics.receive_to_ack.observe_many([now - item.inbound.received for item in batch])
        self.metrics.publish_to_write.observe_many(published)
        for (kind, route, reason), count in counts.items():
            metric = getattr(self.metrics, kind)
            (metric.labels(route, reason) if reason else metric.labels(route)).inc(count)

    def _set_redis(self, *, ok: bool) -> None:
        self.redis_ok = ok
        self.metrics.connected.labels("redis").set(int(ok))

    # --- lifecycle ------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        # Redis first: the bridge connects it before MQTT, so while Redis refuses (a bad TLS
        # certificate, a wrong password) "mqtt not connected" would point at the wrong server.
        if not self.redis_ok:
            return False, f"redis unavailable: {self._redis_error}" if self._redis_error else (
                "redis unavailable"
            )
        if not self.source.connected:
            return False, "mqtt not connected"
        if not self.source.subscribed:
            return False, "mqtt subscription not confirmed"
        if self.sparkplug is not None and not self.sparkplug.online:
            return False, "sparkplug host not online"
        age = self.oldest_unacked_age_s()
        if age > self.settings.bridge.max_unacked_age_s:
            return False, f"oldest unacknowledged message is {age:.1f} s old"
        return True, "ready"

    async def _connect_redis(self, stop: asyncio.Event) -> bool:
        """Wait for Redis before taking any message; with a spool holding data, start anyway."""
        backoff = Backoff(self.settings.backoff)
        while not stop.is_set():
            try:
                await self.sink.check()
            except SinkUnavailable as exc:
                if self.spool is not None:
                    self._redis_failed(exc)
                    return True
                if backoff.attempts == 0:
                    log.warning(
                        "redis unavailable, retrying with backoff", extra={"error": str(exc)}
                    )
                self.metrics.reconnects.labels("redis").inc()
                if await backoff.wait(stop):
                    return False
                continue
            self._set_redis(ok=True)
            log.info("redis connected", extra={"url": self.settings.redis.url.split("@")[-1]})
            self.source.previous_filters = await self._remembered_filters()
            return True
        return False

    @property
    def _filters_key(self) -> str:
        return self.keys.bridge_subscriptions(self.settings.mqtt.client_id)

    async def _remembered_filters(self) -> set[str] | None:
        try:
            raw = await self.sink.client.get(self._filters_key)
        except (RedisError, OSError):
            return None
        return None if raw is None else set(json.loads(raw))

    async def _remember_filters(self) -> None:
        """Once subscribed, record the filters, so the next run can tell a changed route table."""
        await self.source.subscribed_event.wait()
        filters = sorted(self.source.previous_filters or ())
        try:
            await self.sink.client.set(self._filters_key, json.dumps(filters))
        except (RedisError, OSError) as exc:
            log.warning("could not record the subscribed filters", extra={"error": str(exc)})

    async def run(self, stop: asyncio.Event) -> None:
        """Connect Redis first (no message is taken before it can be stored), then MQTT."""
        with gc_thresholds():
            await self._run(stop)

    async def _run(self, stop: asyncio.Event) -> None:
        try:
            if not await self._connect_redis(stop):
                return
            streams = {r: self.keys.telemetry_streams(r) for r in self.intake.route_names}
            retention = Retention(
                self.sink.client, streams, self.settings.bridge.retention, self.metrics
            )
            writer_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.source.run(stop), name="mqtt-source")
                if self.sparkplug is not None:
                    tasks.create_task(self.sparkplug.run(stop), name="sparkplug-host")
                writer = tasks.create_task(self._write_loop(writer_stop), name="writer")
                tasks.create_task(retention.run(writer_stop), name="retention")
                if isinstance(self.source, MqttSource):  # partitions remember their own
                    remember = tasks.create_task(self._remember_filters(), name="remember-filters")
                await stop.wait()
                if isinstance(self.source, MqttSource):
                    remember.cancel()
                await self._drain(writer, writer_stop)
        except ConfigError as exc:
            log.error("refusing to start: %s", exc)  # noqa: TRY400 -- the message is the answer
            raise SystemExit(2) from exc
        finally:
            await self.sink.close()

    async def _drain(self, writer: asyncio.Task[None], writer_stop: asyncio.Event) -> None:
        """Stop intake, store and ack what was received within the grace period, disconnect."""
        self.source.pause()
        writer_stop.set()
        grace = self.settings.bridge.shutdown_grace_s
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(writer)
        except TimeoutError:
            log.warning("drain did not finish in %.1f s; %d message(s) stay with the broker",
                        grace, self.in_flight())  # fmt: skip
            writer.cancel()
        await self.source.close()
        log.info("bridge stopped")


# The `kind` label of a failed write, by the class of what redis-py raised; first match wins
# (BusyLoadingError is a ConnectionError, OutOfMemoryError and ReadOnlyError are ResponseErrors).
_KINDS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (BusyLoadingError, "loading"),
    (OutOfMemoryError, "oom"),
    (ReadOnlyError, "readonly"),
    (ReplicasBehind, "replicas"),
    ((RedisTimeoutError, TimeoutError), "timeout"),
    ((RedisConnectionError, ConnectionError), "connection"),
)


def _kind(exc: SinkUnavailable) -> str:
    return next((kind for cls, kind in _KINDS if isinstance(exc.__cause__, cls)), "other")
