"""Redis key names: the one place that builds them. Every other module imports from here.

Keys are built from configured names only (prefix, route, group), never from a raw topic level.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from config.settings import RedisSettings


def shard_of(asset: str, shards: int) -> int:
    """The shard of an asset: crc32, stable across processes and languages (unlike hash())."""
    return zlib.crc32(asset.encode()) % shards if shards > 1 else 0


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (default `iotbridge`)."""

    prefix: str = "iotbridge"
    shards: int = 1
    # Redis Cluster: every key of a shard carries the shard's hash tag, even with one shard, and
    # so do the worker's outputs (anomalies, its dead letters), so that one atomic step (the
    # bridge's dedup and XADD; the worker's fence, outputs, XACK and checkpoint) is in one slot.
    cluster: bool = False

    @classmethod
    def of(cls, redis: RedisSettings) -> Keys:
        """The layout `redis` settings describe: prefix, shards, and cluster."""
        return cls(redis.key_prefix, redis.stream_shards, redis.cluster)

    def telemetry(self, route: str, shard: int = 0) -> str:
        """Telemetry stream of a route (and shard): `iotbridge:tel:<route>`, or with several
        shards `iotbridge:tel:<route>:{<shard>}`. The hash tag puts a shard's streams and dedup
        state in one Redis Cluster slot, so one script can write them together."""
        return self._sharded(f"{self.prefix}:tel:{route}", shard)

    def telemetry_streams(self, route: str) -> list[str]:
        """Every shard stream of a route, in shard order."""
        return [self.telemetry(route, shard) for shard in range(self.shards)]

    def dedup(self, route: str, shard: int = 0) -> str:
        """Per-asset dedup state of a route's shard (a hash, one field per asset)."""
        return self._sharded(f"{self.prefix}:dedup:{route}", shard)

    def _sharded(self, base: str, shard: int) -> str:
        return base if self.shards == 1 and not self.cluster else f"{base}:{{{shard}}}"

    def _clustered(self, base: str, shard: int) -> str:
        """`base` on one Redis; with cluster, a key of the shard's slot."""
        return f"{base}:{{{shard}}}" if self.cluster else base

    def worker_lease(self, group: str, route: str, shard: int = 0) -> str:
        """Owner of a telemetry stream among a group's workers: `iotbridge:worker:<group>:lease:
        <route>[:{<shard>}]` (a string: the owner's consumer name, with a TTL)."""
        return self._sharded(f"{self.prefix}:worker:{group}:lease:{route}", shard)

    def worker_checkpoint(self, group: str, route: str, shard: int = 0) -> str:
        """Detector state of a telemetry stream and its last processed entry: `iotbridge:worker:
        <group>:state:<route>[:{<shard>}]` (a hash: one field per asset, and the metadata)."""
        return self._sharded(f"{self.prefix}:worker:{group}:state:{route}", shard)

    def worker_members(self, group: str) -> str:
        """Live workers of a group: `iotbridge:worker:<group>:members` (a sorted set of consumer
        names scored by the expiry time of their heartbeat, in Redis milliseconds)."""
        return f"{self.prefix}:worker:{group}:members"

    def anomaly_once(
        self, group: str, route: str, shard: int, source_id: str, detector: str, value: str,
        event: str,
    ) -> str:  # fmt: skip
        """Dedup key of one anomaly event: the entry that caused it (stream and id), the detector,
        the value and start/ended. Entry ids repeat across shard streams, hence route and shard."""
        return self._clustered(
            f"{self.prefix}:anomaly:once:{group}:{route}:{shard}:{source_id}:{detector}:{value}:"
            f"{event}",
            shard,
        )

    def worker_fence(self, group: str, owner: str, shard: int = 0) -> str:
        """A key of the worker's own that its transaction WATCHes (written to abort it when a
        lease is not ours): `iotbridge:worker:<group>:members:fence:<owner>[:{<shard>}]`."""
        return self._clustered(f"{self.worker_members(group)}:fence:{owner}", shard)

    def bridge_subscriptions(self, client_id: str) -> str:
        """The filters a bridge's persistent session was last subscribed to (JSON list)."""
        return f"{self.prefix}:bridge:{client_id}:filters"

    def bridge_lease(self, client_id: str, partition: str) -> str:
        """Owner of a session partition among the bridges of one client id: `iotbridge:bridge:
        <client_id>:lease:<partition>` (a string: the owner's name, with a TTL)."""
        return f"{self.prefix}:bridge:{client_id}:lease:{partition}"

    def bridge_members(self, client_id: str) -> str:
        """Live bridges sharing one client id's partitions: `iotbridge:bridge:<client_id>:members`
        (a sorted set of owner names scored by the expiry of their heartbeat, Redis ms)."""
        return f"{self.prefix}:bridge:{client_id}:members"

    @property
    def gateway_tokens(self) -> str:
        """Device tokens of the HTTP gateway: `iotbridge:gateway:tokens` (a hash: token id ->
        JSON with the SHA-256 of the secret, never the secret, and the asset pattern)."""
        return f"{self.prefix}:gateway:tokens"

    @property
    def dead_letters(self) -> str:
        """Dead letters of the bridge: `iotbridge:dlq`."""
        return f"{self.prefix}:dlq"

    @property
    def worker_dead_letters(self) -> str:
        """Poison entries a worker gave up on: `iotbridge:dlq:worker` (on one Redis)."""
        return f"{self.prefix}:dlq:worker"

    def worker_dead_letters_of(self, shard: int) -> str:
        """Where a worker dead-letters an entry of `shard`: `iotbridge:dlq:worker`, with cluster
        `iotbridge:dlq:worker:{<shard>}`."""
        return self._clustered(self.worker_dead_letters, shard)

    def worker_dead_letter_streams(self) -> list[str]:
        """Every worker dead-letter stream (one, or one per shard with cluster)."""
        return self._across(self.worker_dead_letters)

    @property
    def anomalies(self) -> str:
        """Anomaly flags: `iotbridge:anomalies` (on one Redis)."""
        return f"{self.prefix}:anomalies"

    def anomalies_of(self, shard: int) -> str:
        """Where the anomalies of an entry of `shard` go: `iotbridge:anomalies`, with cluster
        `iotbridge:anomalies:{<shard>}`."""
        return self._clustered(self.anomalies, shard)

    def anomaly_streams(self) -> list[str]:
        """Every anomaly stream (one, or one per shard with cluster): readers merge them."""
        return self._across(self.anomalies)

    def dead_letter_streams(self) -> list[str]:
        """Every dead-letter stream of the bridge: one, with cluster too (a dead letter is written
        alone, with no dedup, so it needs no shard's slot)."""
        return [self.dead_letters]

    def _across(self, base: str) -> list[str]:
        return (
            [self._clustered(base, shard) for shard in range(self.shards)]
            if self.cluster
            else [base]
        )
