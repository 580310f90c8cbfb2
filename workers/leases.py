"""Leases in Redis: which member of a group owns which unit of work. Workers own telemetry shards
(`workers.state.Shard`) this way, bridges own session partitions (`bridge.partitions`).

Each unit is owned by one member at a time through a
lease: a key holding the owner's consumer name, taken with SET NX PX `lease_ttl_ms`, renewed by a
compare-and-set script every third of the TTL, released by a compare-and-delete script on shutdown
or when rebalancing, and lost when its owner stops renewing it (a crash: after at most the TTL).

Live workers announce themselves in a sorted set scored by the expiry of their heartbeat, in Redis'
clock (the scripts read TIME, so the workers' own clocks do not matter). With W live workers each
aims to own ceil(shards / W): one above that releases its least preferred shards, one below takes
free ones. Preference is a rendezvous hash of (worker, shard), so workers reach for different
shards first.

One script renews, takes or releases many leases at once. On a Redis Cluster (`by_slot`) a script
may only name keys of one slot: it runs once per slot, each on the master of that slot (the
leases of one shard index share its hash tag).
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Sequence
from itertools import groupby
from typing import Generic, Protocol, TypeVar

from redis.asyncio import Redis

from bridge.redis_nodes import slot_of


class Leased(Protocol):
    """A unit of work owned through a lease: the key of its lease."""

    @property
    def lease(self) -> str: ...


T = TypeVar("T", bound=Leased)

# KEYS[1] members; ARGV owner, ttl_ms. Reply: {Redis time in ms, live members}.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], 3 * tonumber(ARGV[2]))
return {now, redis.call('ZRANGE', KEYS[1], 0, -1)}
"""
# KEYS leases; ARGV owner, ttl_ms. Reply: the 1-based indexes of the leases still held.
_RENEW = """
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    held[#held + 1] = i
  end
end
return held
"""
# KEYS candidate leases in order; ARGV owner, ttl_ms, wanted. Reply: indexes of those taken.
_ACQUIRE = """
local taken = {}
for i, key in ipairs(KEYS) do
  if #taken >= tonumber(ARGV[3]) then break end
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then taken[#taken + 1] = i end
end
return taken
"""
# KEYS leases; ARGV owner. Deletes those still held by owner.
_RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


class Leases(Generic[T]):
    """One member's side of the lease protocol for one group (`members`: its sorted set)."""

    def __init__(
        self, members: str, owner: str, shards: Sequence[T], ttl_ms: int, *, by_slot: bool = False
    ) -> None:
        """`by_slot`: a Redis Cluster, where one script names the leases of one slot only."""
        self.owner = owner
        self.ttl_ms = ttl_ms
        self._members = members
        self._by_slot = by_slot
        # Rendezvous hashing: a fixed order of preference per member.
        self.preferred = sorted(
            shards, key=lambda shard: zlib.crc32(f"{owner}/{shard.lease}".encode())
        )

    def target(self, members: int) -> int:
        """Shards this worker aims to own with `members` live workers."""
        return math.ceil(len(self.preferred) / max(1, members))

    async def heartbeat(self, client: Redis) -> tuple[int, list[str]]:
        """Announce this worker; (Redis time in ms, live workers)."""
        now, members = await client.eval(_HEARTBEAT, 1, self._members, self.owner, self.ttl_ms)
        return int(now), [str(m) for m in members]

    async def renew(self, client: Redis, shards: Sequence[T]) -> list[T]:
        """Extend the leases of `shards`; those still held."""
        parts = self._slots(shards)
        replies = await asyncio.gather(*(
            client.eval(_RENEW, len(part), *(s.lease for s in part), self.owner, self.ttl_ms)
            for part in parts
        ))  # fmt: skip
        return [part[int(i) - 1] for part, held in zip(parts, replies, strict=True) for i in held]

    async def acquire(self, client: Redis, candidates: Sequence[T], wanted: int) -> list[T]:
        """Take up to `wanted` free leases among `candidates`, in order."""
        taken: list[T] = []
        # On a cluster, one script per run of candidates in one slot, in turn: the order of
        # preference is kept, and the count taken so far decides what the next run may take.
        for part in self._runs(candidates):
            if len(taken) >= wanted:
                break
            indexes = await client.eval(
                _ACQUIRE, len(part), *(s.lease for s in part),
                self.owner, self.ttl_ms, wanted - len(taken),
            )  # fmt: skip
            taken += [part[int(i) - 1] for i in indexes]
        return taken

    async def release(self, client: Redis, shards: Sequence[T]) -> None:
        await asyncio.gather(*(
            client.eval(_RELEASE, len(part), *(s.lease for s in part), self.owner)
            for part in self._slots(shards)
        ))  # fmt: skip

    def _slots(self, shards: Sequence[T]) -> list[list[T]]:
        """`shards` by the slot of their lease (all together on one Redis)."""
        if not self._by_slot:
            return [list(shards)] if shards else []
        by_slot: dict[int, list[T]] = {}
        for shard in shards:
            by_slot.setdefault(slot_of(shard.lease), []).append(shard)
        return list(by_slot.values())

    def _runs(self, shards: Sequence[T]) -> list[list[T]]:
        """`shards` in order, cut where the slot of their lease changes (one run on one Redis)."""
        if not self._by_slot:
            return [list(shards)] if shards else []
        return [list(run) for _, run in groupby(shards, key=lambda s: slot_of(s.lease))]

    async def leave(self, client: Redis) -> None:
        """Stop counting as a live worker, so the others rebalance at once."""
        await client.zrem(self._members, self.owner)
