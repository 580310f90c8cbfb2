"""Anomalies: query the anomaly stream by asset, detector and time window, and follow it live
over Server-Sent Events.

The time window is that of the entry ids (Redis time when the worker wrote the event), so a
window is one XRANGE per stream, not a scan of the whole stream; each event also carries the
device time (`ts`) of the sample that raised it.

On a Redis Cluster the anomalies are one stream per shard: a query reads them all, merged in id
order, and the live reader follows them all; cursors and event ids then name a position in each
(`gateway.anomaly_positions`). On one Redis both are entry ids.

Live: one reader per gateway process and anomaly stream (XREAD BLOCK, started with the first
client, stopped with the last) hands each new event to every client whose filter it matches,
through a per-client buffer of `BUFFER_EVENTS`. A client that reads slower than events arrive
fills its buffer; it then gets what the buffer held and an `overflow` event naming the last
position it got, and the stream ends. Every event is sent with its position as the SSE `id`, so
an EventSource reconnects with `Last-Event-ID` and the gateway sends what it missed from Redis
first: a slow client loses nothing and never makes the gateway hold more than the bound. When the
gateway stops, `close_live_streams` ends every stream with `event: closing` the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Header, HTTPException, Query, status
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from bridge.record import entry_key
from bridge.shard_reads import REDIS_ERRORS
from config.settings import BackoffSettings
from gateway.admin_http import AdminRoute
from gateway.admin_models import Anomaly, AnomalyPage, Subscribers
from gateway.admin_redis import MergedRange, newest_id, read_after, text
from gateway.anomaly_positions import (
    CURSOR,
    EVENT_ID,
    Position,
    cursor_of,
    event_id,
    positions_of,
    starts_after,
)
from gateway.context import GatewayContext
from observability.lifecycle import Backoff

log = logging.getLogger(__name__)

BUFFER_EVENTS = 256  # per client, in this process
MAX_CLIENTS = 64  # live clients per process; one more is answered 503
READ_COUNT = 500  # entries per XREAD / XRANGE
BLOCK_MS = 1000  # below the Redis client's socket timeout
SCAN_BUDGET = 20_000
PING_S = 15  # keeps proxies from closing a quiet stream


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def to_anomaly(entry_id: str, raw: dict[str, bytes]) -> Anomaly:
    fields = {name: text(value) for name, value in raw.items()}
    return Anomaly(
        id=entry_id, event=fields.get("event", ""), asset=fields.get("asset", ""),
        route=fields.get("route", ""), detector=fields.get("detector", ""),
        value_name=fields.get("value_name", ""), value=_number(fields.get("value")),
        bound=_number(fields.get("bound")), score=_number(fields.get("score")),
        ts=_number(fields.get("ts")), severity=fields.get("severity", ""),
        stream=fields.get("stream", ""), source_id=fields.get("source_id", ""),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Wanted:
    asset: str | None = None
    detector: str | None = None

    def __call__(self, anomaly: Anomaly) -> bool:
        return (self.asset is None or anomaly.asset == self.asset) and (
            self.detector is None or anomaly.detector == self.detector
        )


def _window_bound(value: datetime | None, default: str) -> str:
    return default if value is None else str(int(value.timestamp() * 1000))


@dataclass(eq=False, slots=True)
class Subscriber:
    wanted: Wanted
    start: list[Position]  # per stream, the last entry before this client's first event
    events: deque[tuple[int, Anomaly]] = field(default_factory=deque)  # (stream index, event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    closed: bool = False

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    def offer(self, index: int, anomaly: Anomaly) -> bool:
        """Buffer an event of stream `index`; False when the buffer is full (the client is then
        cut off)."""
        if len(self.events) >= BUFFER_EVENTS:
            self.overflowed = True
            self.ready.set()
            return False
        self.events.append((index, anomaly))
        self.ready.set()
        return True


class AnomalyHub:
    """One XREAD loop per process and anomaly stream, fanned out to bounded per-client buffers.

    A loop per stream: on a cluster one XREAD over several streams is refused (CROSSSLOT), and
    an XREAD of them in turn would hold each stream's events back by the others' BLOCK."""

    def __init__(self, redis: aioredis.Redis, keys: list[str], backoff: BackoffSettings) -> None:
        self._redis = redis
        self._keys = keys
        self._backoff = backoff
        self._subscribers: set[Subscriber] = set()
        self._readers: list[asyncio.Task[None] | None] = [None] * len(keys)
        self._positions = ["$"] * len(keys)  # the last entry fanned out, per stream
        self._failing: set[int] = set()  # the streams whose reads fail
        self._starting = asyncio.Lock()
        self.closing = False
        self.cut_off_total = 0

    @property
    def connected(self) -> int:
        return len(self._subscribers)

    async def subscribe(self, wanted: Wanted) -> Subscriber:
        if self.closing:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the gateway is stopping",
                                headers={"Retry-After": "5"})  # fmt: skip
        if len(self._subscribers) >= MAX_CLIENTS:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                                f"{MAX_CLIENTS} live clients already", headers={"Retry-After": "5"})  # fmt: skip
        async with self._starting:
            idle = [index for index, reader in enumerate(self._readers) if reader is None]
            # Fix the start before the client hears it is subscribed: anything written after
            # that reaches it.
            newest = await asyncio.gather(
                *(newest_id(self._redis, self._keys[index]) for index in idle)
            )
            for index, last in zip(idle, newest, strict=True):
                self._positions[index] = last or "0-0"
                self._readers[index] = asyncio.create_task(
                    self._read(index), name=f"anomaly-stream-reader-{index}"
                )
            subscriber = Subscriber(wanted, [entry_key(p) for p in self._positions])
            self._subscribers.add(subscriber)
            return subscriber

    def close(self) -> None:
        """End every live stream now (`event: closing`): the gateway is stopping, and an open
        stream would otherwise hold its HTTP server until the graceful-shutdown timeout."""
        self.closing = True
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()

    async def unsubscribe(self, subscriber: Subscriber) -> None:
        # The reader ends by itself within BLOCK_MS once nobody listens. Not cancelled: a
        # cancelled XREAD task of redis-py went on reading until the client's connection closed
        # (seen with a cut-off client), and the client's stream waited for it.
        self._subscribers.discard(subscriber)

    async def _read(self, index: int) -> None:
        key, backoff = self._keys[index], Backoff(self._backoff)
        while True:
            if not self._subscribers:
                self._readers[index] = None
                return
            try:
                entries = await read_after(
                    self._redis, key, self._positions[index], READ_COUNT, BLOCK_MS
                )
            except REDIS_ERRORS as exc:
                if not self._failing:
                    log.warning(
                        "redis unavailable, live anomalies paused", extra={"error": str(exc)}
                    )
                self._failing.add(index)
                await asyncio.sleep(backoff.next_delay())
                continue
            if index in self._failing:
                self._failing.discard(index)
                backoff.reset()
                if not self._failing:
                    log.info("redis available again, live anomalies resumed")
            for entry_id, fields in entries:
                self._positions[index] = entry_id
                self._fan_out(index, to_anomaly(entry_id, fields))

    def _fan_out(self, index: int, anomaly: Anomaly) -> None:
        for subscriber in list(self._subscribers):
            if subscriber.wanted(anomaly) and not subscriber.offer(index, anomaly):
                self._subscribers.discard(subscriber)
                self.cut_off_total += 1
                log.info("live anomaly client cut off: its buffer was full",
                         extra={"buffer_events": BUFFER_EVENTS})  # fmt: skip


class Anomalies:
    def __init__(self, ctx: GatewayContext) -> None:
        self._redis = ctx.redis
        self._keys = ctx.keys.anomaly_streams()
        self.hub = AnomalyHub(ctx.redis, self._keys, ctx.settings.backoff)

    @property
    def streams(self) -> int:
        return len(self._keys)

    async def page(
        self, wanted: Wanted, since: datetime | None, until: datetime | None, cursor: str | None,
        count: int,
    ) -> AnomalyPage:  # fmt: skip
        n = self.streams
        starts = _starts(cursor, n) if cursor else [_window_bound(since, "-")] * n
        end = _window_bound(until, "+")
        merged = MergedRange(self._redis, self._keys, starts, end, READ_COUNT)
        items: list[Anomaly] = []
        for _ in range(SCAN_BUDGET):
            found = await merged.next()
            if found is None:
                return AnomalyPage(items=items, next_cursor=None)
            index, (entry_id, fields) = found
            anomaly = to_anomaly(entry_id, fields)
            if wanted(anomaly):
                items.append(anomaly)
                if len(items) == count:
                    break
        return AnomalyPage(items=items, next_cursor=cursor_of(entry_id, index, n))

    async def backlog(
        self, wanted: Wanted, after: list[Position]
    ) -> AsyncIterator[tuple[int, Anomaly]]:
        """Every event after `after` (the positions of an EventSource's Last-Event-ID), read
        from Redis, as (stream index, event)."""
        starts = [f"({ms}-{seq}" for ms, seq in after]
        merged = MergedRange(self._redis, self._keys, starts, "+", READ_COUNT)
        while (found := await merged.next()) is not None:
            index, (entry_id, fields) = found
            anomaly = to_anomaly(entry_id, fields)
            if wanted(anomaly):
                yield index, anomaly

    async def live(
        self, subscriber: Subscriber, after: list[Position] | None
    ) -> AsyncIterator[ServerSentEvent]:
        """The events of one client: what it missed (after the positions of its Last-Event-ID,
        `positions`), then new ones."""
        wanted = subscriber.wanted
        sent = list(subscriber.start if after is None else after)
        try:
            yield ServerSentEvent(event="ready", data="{}", retry=2000)
            if after is not None:
                async for index, anomaly in self.backlog(wanted, after):
                    sent[index] = entry_key(anomaly.id)
                    yield _event(anomaly, sent)
            while True:
                await subscriber.ready.wait()
                subscriber.ready.clear()
                while subscriber.events:
                    index, anomaly = subscriber.events.popleft()
                    if entry_key(anomaly.id) > sent[index]:  # not already sent from the backlog
                        sent[index] = entry_key(anomaly.id)
                        yield _event(anomaly, sent)
                resume = event_id(sent)
                if subscriber.overflowed:
                    yield ServerSentEvent(
                        event="overflow",
                        data=json.dumps({"detail": f"more than {BUFFER_EVENTS} events waited for "
                                         "this client; reconnect with Last-Event-ID",
                                         "last_event_id": resume}),
                    )  # fmt: skip
                    return
                if subscriber.closed:
                    yield ServerSentEvent(
                        event="closing",
                        data=json.dumps({"detail": "the gateway is stopping; reconnect with "
                                         "Last-Event-ID", "last_event_id": resume}),
                    )  # fmt: skip
                    return
        finally:
            await self.hub.unsubscribe(subscriber)

    def positions(self, last_event_id: str) -> list[Position]:
        """The positions a Last-Event-ID names; 400 when it names another number of streams."""
        try:
            return positions_of(last_event_id, self.streams)
        except ValueError as exc:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"Last-Event-ID: {exc}") from exc


def _starts(cursor: str, streams: int) -> list[str]:
    try:
        return starts_after(cursor, streams)
    except ValueError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"cursor: {exc}") from exc


def _event(anomaly: Anomaly, sent: list[Position]) -> ServerSentEvent:
    return ServerSentEvent(id=event_id(sent), event="anomaly", data=anomaly.model_dump_json())


Asset = Annotated[str | None, Query(description="Only this asset.")]
Detector = Annotated[str | None, Query(description="Only this detector (threshold, rate, ...).")]


# The live streams of each gateway (by its context), for close_live_streams.
_HUBS: dict[int, AnomalyHub] = {}


def close_live_streams(ctx: GatewayContext) -> None:
    """End the gateway's live anomaly streams: call it before stopping the HTTP server."""
    hub = _HUBS.pop(id(ctx), None)
    if hub is not None:
        hub.close()


def anomaly_router(ctx: GatewayContext) -> APIRouter:
    anomalies = Anomalies(ctx)
    _HUBS[id(ctx)] = anomalies.hub
    router = APIRouter(prefix="/api/v1/anomalies", tags=["anomalies"], route_class=AdminRoute)

    @router.get("", response_model=AnomalyPage, summary="Query anomalies")
    async def query_anomalies(
        asset: Asset = None,
        detector: Detector = None,
        since: Annotated[datetime | None, Query(description="Written at or after (RFC 3339 or epoch seconds).")] = None,
        until: Annotated[datetime | None, Query(description="Written at or before.")] = None,
        cursor: Annotated[str | None, Query(pattern=CURSOR, description="next_cursor of the previous page.")] = None,
        count: Annotated[int, Query(gt=0, le=1000)] = 100,
    ) -> AnomalyPage:  # fmt: skip
        """Anomaly events oldest first within the window (by when the worker wrote them), for
        one asset and/or detector. A page ends at `count` items or 20,000 entries read. On a
        Redis Cluster every shard's anomaly stream is read, merged by entry id; `next_cursor`
        then may name the stream too (`<id>:<n>`)."""
        return await anomalies.page(Wanted(asset, detector), since, until, cursor, count)

    @router.get(
        "/stream",
        summary="Live anomalies (Server-Sent Events)",
        response_class=EventSourceResponse,
        responses={
            200: {
                "description": "`text/event-stream`: `event: ready` once subscribed, then one "
                "`event: anomaly` per new event (`id` = its entry id; on a Redis Cluster the "
                "position in each shard's anomaly stream, `<id0>,<id1>,...`; `data` = an Anomaly as "
                "JSON); `event: overflow` and the end of the stream when the client fell "
                f"{BUFFER_EVENTS} events behind, `event: closing` when the gateway stops (both "
                "name `last_event_id`: reconnect with `Last-Event-ID`).",
                "content": {"text/event-stream": {"example": 'event: anomaly\nid: 1767225601000-0\ndata: {"asset": "a1", ...}\n\n'}},
            },
            503: {"description": f"{MAX_CLIENTS} clients already follow the stream."},
        },
    )  # fmt: skip
    async def stream_anomalies(
        asset: Asset = None,
        detector: Detector = None,
        last_event_id: Annotated[str | None, Header(pattern=EVENT_ID, description="Resume after this event id (an EventSource sends it when it reconnects).")] = None,
    ) -> EventSourceResponse:  # fmt: skip
        after = None if last_event_id is None else anomalies.positions(last_event_id)
        subscriber = await anomalies.hub.subscribe(Wanted(asset, detector))
        events = anomalies.live(subscriber, after)
        # The generator unsubscribes when it ends; the background task covers a client gone
        # before the first event was sent (the generator then never starts).
        return EventSourceResponse(
            events, ping=PING_S, background=BackgroundTask(anomalies.hub.unsubscribe, subscriber)
        )

    @router.get("/stream/clients", response_model=Subscribers, summary="Live clients")
    async def stream_clients() -> Subscribers:
        """Clients following the live stream in this gateway process, and how many were cut off."""
        hub = anomalies.hub
        return Subscribers(connected=hub.connected, cut_off_total=hub.cut_off_total,
                           buffer_events=BUFFER_EVENTS)  # fmt: skip

    return router
