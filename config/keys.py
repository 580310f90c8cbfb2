"""Redis key names: the one place that builds them. Every other module imports from here.

Keys are built from configured names only (prefix, route, group), never from a raw topic level.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


def shard_of(asset: str, shards: int) -> int:
    """The shard of an asset: crc32, stable across processes and languages (unlike hash())."""
    return zlib.crc32(asset.encode()) % shards if shards > 1 else 0


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (default `iotbridge`)."""

    prefix: str = "iotbridge"
    shards: int = 1

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
        return base if self.shards == 1 else f"{base}:{{{shard}}}"

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
        return (
            f"{self.prefix}:anomaly:once:{group}:{route}:{shard}:{source_id}:{detector}:{value}:"
            f"{event}"
        )

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
        """Poison entries a worker gave up on: `iotbridge:dlq:worker`."""
        return f"{self.prefix}:dlq:worker"

    @property
    def anomalies(self) -> str:
        """Anomaly flags: `iotbridge:anomalies`."""
        return f"{self.prefix}:anomalies"
