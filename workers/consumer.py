"""The consumer: reads the telemetry streams in a consumer group, runs the detectors, writes the
anomalies and dead letters, then acknowledges.

Delivery is at-least-once: an entry is acknowledged only in the same MULTI/EXEC as the outputs it
caused, so either both land or neither does, and a batch that failed is read again from this
consumer's own pending entries, which are always read before new ones.

Redis being down is a state, not an error: one warning, retries with a capped jittered backoff that
ends early on stop, one info line when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT, KeyT, StreamIdT

from config.errors import DependencyUnavailable, PayloadRejected
from config.keys import Keys
from config.settings import Settings, WorkerSettings
from observability.lifecycle import Backoff
from observability.metrics import WorkerMetrics
from workers.anomaly import AnomalyEvent
from workers.detectors import Detector, decode_entry

log = logging.getLogger(__name__)

TARGET = "redis"
# XREADGROUP ids: "0" replays this consumer's own pending entries, ">" asks for new ones.
PENDING = "0"
NEW = ">"
LAG_REFRESH_S = 1.0
# A BLOCK must end before socket_timeout does, or every idle read would look like a stalled server.
_BLOCK_MARGIN_MS = 250

# Down, restarting (LOADING is a BusyLoadingError, a ConnectionError), stalled past socket_timeout,
# or a replica after a failover (READONLY): all pass with time, so all are retried.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)

# (stream key, entry id, fields); fields are None for a pending entry that was trimmed away.
RawEntry = tuple[str, str, dict[str, str] | None]


def consumer_name(worker: WorkerSettings) -> str:
    """The configured name, else host-pid: unique per process, so pending entries have one owner."""
    return worker.consumer or f"{socket.gethostname()}-{os.getpid()}"


def _error_code(exc: ResponseError) -> str:
    # Redis error replies start with a code word; redis-py has classes for only a few of them.
    return str(exc).split(" ", 1)[0]


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Library errors that pass with time become `DependencyUnavailable`."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise DependencyUnavailable(f"redis: {exc}") from exc
    except ResponseError as exc:
        if _error_code(exc) != "NOGROUP":
            raise
        # Someone deleted the group (or the stream); the next session creates it again.
        raise DependencyUnavailable(f"redis: {exc}") from exc


def _entries(reply: Any) -> list[RawEntry]:
    """Flatten an XREADGROUP reply: RESP2 `[[stream, [(id, fields), ...]], ...]` or a RESP3 map."""
    if not reply:
        return []
    streams = reply.items() if isinstance(reply, dict) else reply
    return [
        (str(stream), str(entry_id), fields)
        for stream, items in streams
        for entry_id, fields in items
    ]


def _fields(fields: dict[str, str]) -> dict[FieldT, EncodableT]:
    # redis-py's parameter type is an invariant dict of unions; a str dict is a valid argument.
    return dict(fields.items())


async def _stopped_within(stop: asyncio.Event, delay: float) -> bool:
    """Sleep `delay`, or less if `stop` is set; True when stopping."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay)
    except TimeoutError:
        return False
    return True


@dataclass
class _Batch:
    """Outputs of one batch, written in one transaction."""

    events: list[AnomalyEvent] = field(default_factory=list)
    dead_letters: list[dict[str, str]] = field(default_factory=list)
    acks: dict[str, list[str]] = field(default_factory=dict)
    processed: Counter[str] = field(default_factory=Counter)


class Consumer:
    """One consumer of the group `worker.group` on every route's telemetry stream."""

    def __init__(
        self,
        settings: Settings,
        metrics: WorkerMetrics,
        detectors: Sequence[Detector],
        name: str,
    ) -> None:
        self.name = name
        self._group = settings.worker.group
        self._batch_size = settings.worker.batch_size
        self._block_ms = max(
            1,
            min(
                settings.worker.block_ms,
                int(settings.redis.socket_timeout_s * 1000) - _BLOCK_MARGIN_MS,
            ),
        )
        self._backoff_settings = settings.backoff
        self._keys = Keys(settings.redis.key_prefix)
        # stream key -> route name: labels and outputs carry configured names only.
        self._routes = {self._keys.telemetry(r.name): r.name for r in settings.bridge.routes}
        self._detectors = tuple(detectors)
        self._metrics = metrics
        self._cursors: dict[str, str] = {}
        self._lag_refreshed_at = -math.inf
        self._down_since: float | None = None
        self.connected = False
        self.group_ready = False
        metrics.connected.labels(target=TARGET).set(0)

    def readiness(self) -> tuple[bool, str]:
        if not self.connected:
            return False, "redis unavailable"
        if not self.group_ready:
            return False, f"consumer group {self._group} not created"
        return True, "ready"

    async def run(self, client: Redis, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in hand is written and acked before returning."""
        backoff = Backoff(self._backoff_settings)
        try:
            while not stop.is_set():
                try:
                    await self._session(client, stop, backoff)
                except DependencyUnavailable as exc:
                    delay = backoff.next_delay()
                    self._mark_down(exc, delay)
                    if await _stopped_within(stop, delay):
                        break
                    self._metrics.reconnects.labels(target=TARGET).inc()
        finally:
            # Stopped or cancelled, this consumer no longer does its job: /readyz must say so.
            self.connected = self.group_ready = False
            self._metrics.connected.labels(target=TARGET).set(0)

    async def _session(self, client: Redis, stop: asyncio.Event, backoff: Backoff) -> None:
        """One connected stretch: (re)create the groups, drain own pending, then read new entries."""
        with _translated():
            await self._create_groups(client)
        self._mark_up()
        backoff.reset()
        # After any failure the unacked batch is in our pending list: replay it before new entries.
        self._cursors = dict.fromkeys(self._routes, PENDING)
        while not stop.is_set():
            with _translated():
                batch = await self._read(client)
            if batch:
                await self._handle(client, batch)
            with _translated():
                await self._refresh_lag(client)

    async def _create_groups(self, client: Redis) -> None:
        for stream in self._routes:
            try:
                # From "0", not "$": entries written before the first worker started count too.
                await client.xgroup_create(stream, self._group, id="0", mkstream=True)
            except ResponseError as exc:
                if _error_code(exc) != "BUSYGROUP":
                    raise
        self.group_ready = True

    async def _read(self, client: Redis) -> list[RawEntry]:
        backlog = {stream: cursor for stream, cursor in self._cursors.items() if cursor != NEW}
        streams: dict[KeyT, StreamIdT] = {}
        streams.update(backlog or dict.fromkeys(self._routes, NEW))
        # Reads of pending entries return at once; only reads of new entries wait.
        reply = await client.xreadgroup(
            self._group,
            self.name,
            streams,
            count=self._batch_size,
            block=None if backlog else self._block_ms,
        )
        entries = _entries(reply)
        for stream in backlog:
            ids = [entry_id for key, entry_id, _ in entries if key == stream]
            # Continue after the last entry seen; none left means the backlog is drained.
            self._cursors[stream] = ids[-1] if ids else NEW
        return entries

    async def _handle(self, client: Redis, entries: list[RawEntry]) -> None:
        # Timed from after the read: a blocking read's wait is idle time, not work.
        started = time.perf_counter()
        for detector in self._detectors:
            detector.checkpoint()
        batch = self._detect(entries)
        try:
            with _translated():
                acked = await self._commit(client, batch)
        except BaseException:
            # Unacked, these entries come back as own pending; the detectors must meet them in the
            # state they met them in the first time, or a `start` would be lost.
            for detector in self._detectors:
                detector.rollback()
            raise
        for letter in batch.dead_letters:
            log.warning("malformed entry dead-lettered and acked", extra=letter)
        self._count(batch, acked)
        self._metrics.batch_duration.observe(time.perf_counter() - started)

    def _detect(self, entries: list[RawEntry]) -> _Batch:
        batch = _Batch()
        for stream, entry_id, fields in entries:
            route = self._routes[stream]
            batch.acks.setdefault(stream, []).append(entry_id)
            try:
                sample = decode_entry(route, entry_id, fields)
            except PayloadRejected as exc:
                batch.dead_letters.append(
                    {"source_id": entry_id, "stream": stream, "error": exc.detail}
                )
                continue
            batch.processed[route] += 1
            for detector in self._detectors:
                batch.events.extend(detector.feed(sample))
        return batch

    async def _commit(self, client: Redis, batch: _Batch) -> dict[str, int]:
        """Write the outputs and ack in one MULTI/EXEC; acked entries per stream."""
        async with client.pipeline(transaction=True) as pipe:
            for event in batch.events:
                pipe.xadd(self._keys.anomalies, _fields(event.to_fields()))
            for letter in batch.dead_letters:
                pipe.xadd(self._keys.worker_dead_letters, _fields(letter))
            for stream, ids in batch.acks.items():
                pipe.xack(stream, self._group, *ids)
            results = await pipe.execute()
        # XACK counts only entries still pending for the group, so the metric says what happened.
        counts = results[len(results) - len(batch.acks) :]
        return {stream: int(n) for stream, n in zip(batch.acks, counts, strict=True)}

    def _count(self, batch: _Batch, acked: dict[str, int]) -> None:
        metrics = self._metrics
        for route, processed in batch.processed.items():
            metrics.processed.labels(route=route).inc(processed)
        for stream, count in acked.items():
            metrics.acked.labels(route=self._routes[stream]).inc(count)
        for event in batch.events:
            metrics.anomalies.labels(
                route=event.route, detector=event.detector, severity=event.severity
            ).inc()

    async def _refresh_lag(self, client: Redis) -> None:
        now = time.monotonic()
        if now - self._lag_refreshed_at < LAG_REFRESH_S:
            return
        self._lag_refreshed_at = now
        async with client.pipeline(transaction=False) as pipe:
            for stream in self._routes:
                pipe.xinfo_groups(stream)
            # A stream deleted under us answers with an error; the read will report that.
            replies = await pipe.execute(raise_on_error=False)
        for (stream, route), groups in zip(self._routes.items(), replies, strict=True):
            if not isinstance(groups, list):
                log.debug("XINFO GROUPS failed", extra={"stream": stream, "error": str(groups)})
                continue
            info = next((g for g in groups if g.get("name") == self._group), None)
            if info is None:
                continue
            self._metrics.pending.labels(route=route).set(info["pending"])
            # Redis reports no lag while deleted entries make it unknowable; keep the last value.
            if info.get("lag") is not None:
                self._metrics.lag.labels(route=route).set(info["lag"])

    def _mark_up(self) -> None:
        self.connected = True
        self._metrics.connected.labels(target=TARGET).set(1)
        if self._down_since is not None:
            log.info(
                "redis reconnected",
                extra={"outage_s": round(time.monotonic() - self._down_since, 1)},
            )
            self._down_since = None
        else:
            log.info(
                "consuming",
                extra={"group": self._group, "consumer": self.name, "streams": list(self._routes)},
            )

    def _mark_down(self, exc: DependencyUnavailable, delay: float) -> None:
        self.connected = False
        self.group_ready = False
        self._metrics.connected.labels(target=TARGET).set(0)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unavailable, retrying in %.1f s", delay, extra={"error": str(exc)})
        else:
            log.debug("redis still unavailable, retrying in %.1f s", delay)
