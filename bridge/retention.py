"""Retention: keep each telemetry stream within its bounds without trimming what a group still needs.

Every `retention.interval_s` each stream is trimmed with XTRIM MINID to the further of its entry
bound and its age bound, but never past the safe point: the oldest entry still pending in any
consumer group, or not yet delivered to it. A stream whose groups fall behind therefore grows past
its bound; `iotbridge_bridge_stream_fill_ratio` shows it before Redis memory runs out.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from bridge.record import entry_key
from config.settings import RetentionSettings
from observability.metrics import BridgeMetrics

log = logging.getLogger(__name__)

# At most this many ids are read per pass to find the entry bound; a backlog is cut over passes.
_MAX_SCAN = 10_000


def _after(entry_id: str) -> str:
    ms, seq = entry_key(entry_id)
    return f"{ms}-{seq + 1}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Retention:
    def __init__(
        self, redis: aioredis.Redis, streams: dict[str, list[str]], settings: RetentionSettings,
        metrics: BridgeMetrics,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._streams = streams  # route -> its shard streams
        self._settings = settings
        self._metrics = metrics

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for route, streams in self._streams.items():
                try:
                    await self.trim_route(route, streams)
                except (RedisError, RedisClusterException) as exc:
                    log.debug("retention pass skipped", extra={"route": route, "error": str(exc)})
            try:
                async with asyncio.timeout(self._settings.interval_s):
                    await stop.wait()
            except TimeoutError:
                continue

    async def safe_point(self, stream: str) -> str | None:
        """The lowest id any consumer group still needs, or None when no group constrains it."""
        try:
            groups = await self._redis.xinfo_groups(stream)
        except (RedisError, RedisClusterException):
            return None  # no such stream yet
        points: list[str] = []
        for group in groups:
            name = _text(group["name"])
            last = group["last-delivered-id"]
            oldest = None
            if int(group["pending"]) > 0:
                # Acked between XINFO and XPENDING: then there is no oldest, min is None.
                oldest = (await self._redis.xpending(stream, name))["min"]
            points.append(_text(oldest) if oldest else _after(_text(last or "0-0")))
        return min(points, key=entry_key) if points else None

    async def trim_route(self, route: str, streams: list[str]) -> int:
        """One pass over a route's shard streams; sets its gauges. The number trimmed."""
        trimmed, length = 0, 0
        for stream in streams:
            cut, left = await self.trim(stream)
            trimmed += cut
            length += left
        self._metrics.stream_entries.labels(route).set(length)
        # The bound applies per stream; the ratio is that of the fullest share of it.
        self._metrics.stream_fill_ratio.labels(route).set(
            length / (self._settings.max_entries * len(streams))
        )
        return trimmed

    async def trim(self, stream: str) -> tuple[int, int]:
        """One pass over one stream: (entries trimmed, entries left)."""
        length = int(await self._redis.xlen(stream))
        cuts: list[str] = []
        if length > self._settings.max_entries:
            excess = min(length - self._settings.max_entries, _MAX_SCAN)
            oldest = await self._redis.xrange(stream, "-", "+", count=excess)
            if oldest and oldest[-1][0] is not None:
                cuts.append(_after(_text(oldest[-1][0])))
        if self._settings.max_age_s is not None:
            cuts.append(f"{int((time.time() - self._settings.max_age_s) * 1000)}-0")
        trimmed = 0
        if cuts:
            cut = max(cuts, key=entry_key)
            safe = await self.safe_point(stream)
            if safe is not None and entry_key(safe) < entry_key(cut):
                cut = safe
            trimmed = int(await self._redis.xtrim(stream, minid=cut, approximate=False))
        return trimmed, length - trimmed
