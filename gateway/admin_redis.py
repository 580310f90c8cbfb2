"""Typed reads of the streams the admin API shows (redis-py's stubs type replies loosely), and
the read of several streams (the anomaly streams of a cluster, one per shard) as one."""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from bridge.shard_reads import order

# An entry: its id and its fields, names as text and values as stored (bytes).
Entry = tuple[str, dict[str, bytes]]


def text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _entries(raw: Any) -> list[Entry]:
    return [(text(i), {text(k): v for k, v in (fields or {}).items()}) for i, fields in raw or []]


async def read_range(
    redis: aioredis.Redis, key: str, start: str, end: str, count: int
) -> list[Entry]:
    """XRANGE key start end COUNT count."""
    return _entries(await redis.xrange(key, start, end, count=count))


async def newest_id(redis: aioredis.Redis, key: str) -> str | None:
    """The id of the stream's last entry; None when it is empty or absent."""
    found = _entries(await redis.xrevrange(key, "+", "-", count=1))
    return found[0][0] if found else None


async def read_after(
    redis: aioredis.Redis, key: str, after: str, count: int, block_ms: int
) -> list[Entry]:
    """XREAD BLOCK block_ms COUNT count STREAMS key after: [] when nothing came in time."""
    reply: Any = await redis.xread({key: after}, count=count, block=block_ms)
    return [entry for _, entries in reply or [] for entry in _entries(entries)]


class MergedRange:
    """XRANGE over several streams, each from its own start to one end, as (stream index, entry)
    in the merged order of `bridge.shard_reads`. Each stream is read `count` entries at a time,
    when the order needs its next entry (a key of its own per XRANGE: no CROSSSLOT on a cluster);
    with one stream it is XRANGE page by page."""

    def __init__(
        self, redis: aioredis.Redis, keys: Sequence[str], starts: Sequence[str], end: str,
        count: int,
    ) -> None:  # fmt: skip
        self._redis = redis
        self._keys = list(keys)
        self._starts: list[str | None] = list(starts)  # None: the stream is read to `end`
        self._end = end
        self._count = count
        self._read: list[deque[Entry]] = [deque() for _ in self._keys]
        self._heads: list[tuple[tuple[int, int, int], int, Entry]] = []  # each stream's next
        self._started = False

    async def next(self) -> tuple[int, Entry] | None:
        """The next entry in the merged order, None after the last."""
        if not self._started:
            self._started = True
            await asyncio.gather(*(self._fill(index) for index in range(len(self._keys))))
        if not self._heads:
            return None
        _, index, entry = heapq.heappop(self._heads)
        if self._read[index]:
            self._push(index)
        elif self._starts[index] is not None:
            await self._fill(index)
        return index, entry

    async def _fill(self, index: int) -> None:
        start = self._starts[index]
        if start is None:
            return
        page = await read_range(self._redis, self._keys[index], start, self._end, self._count)
        self._starts[index] = f"({page[-1][0]}" if len(page) == self._count else None
        self._read[index].extend(page)
        if self._read[index]:
            self._push(index)

    def _push(self, index: int) -> None:
        entry = self._read[index].popleft()
        heapq.heappush(self._heads, (order(entry[0], index), index, entry))
