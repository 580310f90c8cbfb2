"""Bridge wiring: MQTT source -> route and validate -> batched XADD -> acks in arrival order.

Routing and validation run inside the source's message callback (synchronous and cheap); the
message then waits in `pending` until a batch carrying it has been written, and only then is it
acknowledged. Batches are written one at a time, so acks leave in the order messages arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from bridge.contracts import validate_telemetry
from bridge.record import Reason, value_field
from bridge.routing import RouteTable
from bridge.sink import Append, RedisSink
from bridge.source import Inbound, MqttSource
from config.errors import ConfigError, PayloadRejected, SinkUnavailable
from config.keys import Keys
from config.settings import Settings
from observability.lifecycle import Backoff
from observability.metrics import UNROUTED, BridgeMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pending:
    """A received message and what it becomes in Redis (None: acknowledged without a write)."""

    inbound: Inbound
    route: str
    append: Append | None
    reason: Reason | None


class BridgeApp:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = BridgeMetrics(registry)
        self.keys = Keys(settings.redis.key_prefix)
        self.routes = RouteTable(settings.bridge.routes)
        self.sink = RedisSink(settings.redis, settings.bridge.stream_maxlen)
        self.source = MqttSource(
            settings.mqtt,
            self.routes.subscriptions(settings.bridge.shared_group),
            self._receive,
            self.metrics,
            Backoff(settings.backoff),
        )
        self.pending: deque[Pending] = deque()
        self.writing: list[Pending] = []  # the batch being written: taken from pending, not acked
        self._arrived = asyncio.Event()
        self.redis_ok = False
        self._streams = {r.name: self.keys.telemetry(r.name) for r in self.routes.routes}
        self.metrics.in_flight.set_function(self.in_flight)
        self.metrics.oldest_unacked_age.set_function(self.oldest_unacked_age_s)
        for route in [*self._streams, UNROUTED]:
            self.metrics.received.labels(route)
            self.metrics.forwarded.labels(route)

    # --- intake (inside the MQTT callback) ------------------------------------------------------

    def _receive(self, inbound: Inbound) -> None:
        pending = self._classify(inbound)
        self.metrics.received.labels(pending.route).inc()
        if inbound.qos == 0 and not self.redis_ok and self.in_flight() >= self._max_in_flight:
            # At most once was asked for: with Redis away and the buffer full, drop and count.
            self.metrics.dropped.labels(pending.route).inc()
            return
        self.pending.append(pending)
        self._arrived.set()

    @property
    def _max_in_flight(self) -> int:
        return self.settings.bridge.max_in_flight

    def _classify(self, inbound: Inbound) -> Pending:
        matched = self.routes.match(inbound.topic) if inbound.topic is not None else None
        if matched is None:
            detail = "no route matches the topic" if inbound.topic is not None else "not UTF-8"
            return self._dead_letter(inbound, UNROUTED, Reason.TOPIC, detail)
        route, levels = matched
        try:
            sample = validate_telemetry(
                inbound.payload, levels[route.settings.asset_level],
                self.settings.bridge.max_payload_bytes,
            )  # fmt: skip
        except PayloadRejected as exc:
            return self._dead_letter(inbound, route.name, Reason(exc.reason), exc.detail)
        fields: list[bytes | str] = [
            "asset", sample.asset, "seq", str(sample.seq), "ts", repr(sample.ts),
            "topic", inbound.raw_topic, "route", route.name, "rx", repr(inbound.received_wall),
        ]  # fmt: skip
        for level, value in levels.items():
            if level != route.settings.asset_level:
                fields += [level, value]
        for name, reading in sample.values.items():
            fields += [value_field(name), repr(reading)]
        return Pending(inbound, route.name, Append(self._streams[route.name], fields), None)

    def _dead_letter(self, inbound: Inbound, route: str, reason: Reason, detail: str) -> Pending:
        cap = self.settings.bridge.dlq_payload_bytes
        fields: list[bytes | str] = [
            "topic", inbound.raw_topic, "route", route, "reason", reason.value, "error", detail[:500],
            "rx", repr(inbound.received_wall), "size", str(len(inbound.payload)),
            "payload", inbound.payload[:cap],
        ]  # fmt: skip
        return Pending(inbound, route, Append(self.keys.dead_letters, fields), reason)

    # --- write and acknowledge ------------------------------------------------------------------

    def _take_batch(self) -> list[Pending]:
        batch_settings = self.settings.bridge.batch
        batch: list[Pending] = []
        size = 0
        while (
            self.pending
            and len(batch) < batch_settings.max_size
            and size < batch_settings.max_bytes
        ):
            item = self.pending[0]
            batch.append(item)
            size += len(item.inbound.payload)
            self.pending.popleft()
        return batch

    async def _write_loop(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.settings.backoff)
        delay_s = self.settings.bridge.batch.max_delay_ms / 1000
        while True:
            if not self.pending:
                if stop.is_set():
                    return
                self._arrived.clear()
                await _wait_any(self._arrived, stop)
                continue
            if len(self.pending) < self.settings.bridge.batch.max_size and delay_s > 0:
                # Let a batch fill for at most max_delay_ms: one round trip carries many messages.
                oldest = self.pending[0].inbound.received
                wait_s = oldest + delay_s - time.monotonic()
                if wait_s > 0 and not stop.is_set():
                    await asyncio.sleep(wait_s)
            self.writing = self._take_batch()
            await self._write_until_done(self.writing, backoff, stop)
            self.writing = []

    async def _write_until_done(
        self, batch: list[Pending], backoff: Backoff, stop: asyncio.Event
    ) -> None:
        appends = [p.append for p in batch if p.append is not None]
        while True:
            try:
                duration = await self.sink.write(appends)
            except SinkUnavailable as exc:
                if self.redis_ok or backoff.attempts == 0:
                    log.warning(
                        "redis unavailable, holding acks and retrying with backoff",
                        extra={"error": str(exc), "in_flight": len(batch) + len(self.pending)},
                    )
                self._set_redis(ok=False)
                self.metrics.write_errors.labels(_kind(exc)).inc()
                self.metrics.reconnects.labels("redis").inc()
                await backoff.wait(asyncio.Event())  # keep retrying during shutdown, within grace
                continue
            if not self.redis_ok:
                log.info("redis available again", extra={"retries": backoff.attempts})
            backoff.reset()
            self._set_redis(ok=True)
            self.metrics.xadd_duration.observe(duration)
            self.metrics.batch_size.observe(len(batch))
            self._acknowledge(batch)
            return

    def _acknowledge(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        for item in batch:
            self.source.ack(item.inbound)
            if item.reason is None:
                self.metrics.forwarded.labels(item.route).inc()
            else:
                self.metrics.rejected.labels(item.route, item.reason.value).inc()
            self.metrics.receive_to_ack.observe(now - item.inbound.received)

    def _set_redis(self, *, ok: bool) -> None:
        self.redis_ok = ok
        self.metrics.connected.labels("redis").set(int(ok))

    def in_flight(self) -> int:
        return len(self.writing) + len(self.pending)

    def oldest_unacked_age_s(self) -> float:
        oldest = self.writing[0] if self.writing else self.pending[0] if self.pending else None
        return 0.0 if oldest is None else time.monotonic() - oldest.inbound.received

    # --- lifecycle ------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if not self.source.connected:
            return False, "mqtt not connected"
        if not self.source.subscribed:
            return False, "mqtt subscription not confirmed"
        if not self.redis_ok:
            return False, "redis unavailable"
        age = self.oldest_unacked_age_s()
        if age > self.settings.bridge.max_unacked_age_s:
            return False, f"oldest unacknowledged message is {age:.1f} s old"
        return True, "ready"

    async def _check_redis(self, stop: asyncio.Event) -> bool:
        backoff = Backoff(self.settings.backoff)
        while not stop.is_set():
            try:
                await self.sink.check()
            except SinkUnavailable as exc:
                if backoff.attempts == 0:
                    log.warning(
                        "redis unavailable, retrying with backoff", extra={"error": str(exc)}
                    )
                if await backoff.wait(stop):
                    return False
                continue
            self._set_redis(ok=True)
            log.info("redis connected", extra={"url": self.settings.redis.url.split("@")[-1]})
            return True
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Connect Redis first (no message is taken before it can be written), then MQTT."""
        try:
            if not await self._check_redis(stop):
                return
            writer_stop = asyncio.Event()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.source.run(stop), name="mqtt-source")
                writer = tasks.create_task(self._write_loop(writer_stop), name="redis-writer")
                await stop.wait()
                await self._drain(writer, writer_stop)
        except ConfigError as exc:
            log.error("refusing to start: %s", exc)  # noqa: TRY400 -- the message is the answer
            raise SystemExit(2) from exc
        finally:
            await self.sink.close()

    async def _drain(self, writer: asyncio.Task[None], writer_stop: asyncio.Event) -> None:
        """Stop intake, write and ack what was received within the grace period, disconnect."""
        self.source.pause()
        writer_stop.set()
        grace = self.settings.bridge.shutdown_grace_s
        try:
            async with asyncio.timeout(grace):
                await asyncio.shield(writer)
        except TimeoutError:
            log.warning("drain did not finish in %.1f s; %d message(s) stay with the broker",
                        grace, len(self.pending))  # fmt: skip
            writer.cancel()
        await self.source.close()
        log.info("bridge stopped")


async def _wait_any(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _kind(exc: SinkUnavailable) -> str:
    cause = exc.__cause__
    name = type(cause).__name__ if cause is not None else "unknown"
    return {"ConnectionError": "connection", "TimeoutError": "timeout",
            "OutOfMemoryError": "oom", "ReadOnlyError": "readonly"}.get(name, "other")  # fmt: skip
