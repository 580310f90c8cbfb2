"""Typed reads of the streams the admin API shows (redis-py's stubs type replies loosely)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

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
