"""The worker's metrics, recorded at the consumer's stage boundaries: a batch written, a shard
taken or dropped, and once a second the group's lag and pending entries from XINFO GROUPS.

Lag and pending are read for every stream of the group, not only the owned ones, so every worker of
a group reports the same numbers: aggregate them with max(), not sum().
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence

from redis.asyncio import Redis

from observability.metrics import WorkerMetrics
from workers.outputs import Outputs
from workers.state import Shard, ShardState
from workers.streams import group_info


class Reporter:
    def __init__(self, metrics: WorkerMetrics, group: str) -> None:
        self._metrics = metrics
        self._group = group
        # When each owned shard's checkpoint was last written (time.monotonic()).
        self._checkpointed: dict[str, float] = {}
        self._open_labels: set[tuple[str, str]] = set()

    def written(
        self, outputs: Outputs, acked: Mapping[Shard, int], owned: Mapping[str, ShardState]
    ) -> None:
        metrics = self._metrics
        for route, count in outputs.processed.items():
            metrics.processed.labels(route=route).inc(count)
        for shard, count in acked.items():
            metrics.acked.labels(route=shard.route).inc(count)
        for shard, reason, _ in outputs.dead_letters:
            metrics.dead_lettered.labels(route=shard.route, reason=reason).inc()
        now = time.time()
        for _, event in outputs.events:
            metrics.anomalies.labels(
                route=event.route, detector=event.detector, severity=event.severity
            ).inc()
            if not outputs.timed:
                metrics.publish_to_flag.observe(max(0.0, now - float(event.ts)))
        written_at = time.monotonic()
        for shard in outputs.checkpoints:
            self._checkpointed[shard.stream] = written_at
        if outputs.events:
            self.ownership(owned)

    def taken(self, state: ShardState) -> None:
        self._checkpointed[state.shard.stream] = time.monotonic()
        self._metrics.shard_changes.labels(change="acquired").inc()

    def dropped(self, state: ShardState, change: str) -> None:
        self._checkpointed.pop(state.shard.stream, None)
        self._metrics.shard_changes.labels(change=change).inc()

    def ownership(self, owned: Mapping[str, ShardState]) -> None:
        """Gauges of what this worker owns: shards, assets with state, open anomalies."""
        metrics = self._metrics
        metrics.shards_owned.set(len(owned))
        metrics.state_assets.set(sum(len(state.assets) for state in owned.values()))
        totals: Counter[tuple[str, str]] = Counter()
        for state in owned.values():
            for detector, count in state.open.items():
                totals[(state.shard.route, detector)] += count
        self._open_labels.update(totals)
        for route, detector in self._open_labels:
            metrics.open_anomalies.labels(route=route, detector=detector).set(
                totals[(route, detector)]
            )

    async def refresh(
        self, client: Redis, shards: Sequence[Shard], owned: Mapping[str, ShardState]
    ) -> None:
        """Lag and pending per route, and the age of the oldest checkpoint with work waiting."""
        info = await group_info(client, [shard.stream for shard in shards], self._group)
        lag: Counter[str] = Counter()
        pending: Counter[str] = Counter()
        routes = {shard.route for shard in shards}
        now = time.monotonic()
        age = 0.0
        for shard in shards:
            group = info.get(shard.stream)
            if group is None:
                continue
            # Redis reports no lag while deleted entries make it unknowable; count it as 0.
            waiting = int(group.get("lag") or 0) + int(group.get("pending") or 0)
            lag[shard.route] += int(group.get("lag") or 0)
            pending[shard.route] += int(group.get("pending") or 0)
            if shard.stream in owned and waiting:
                age = max(age, now - self._checkpointed.get(shard.stream, now))
        for route in routes:
            self._metrics.lag.labels(route=route, group=self._group).set(lag[route])
            self._metrics.pending.labels(route=route, group=self._group).set(pending[route])
        self._metrics.checkpoint_age.set(age)
        self.ownership(owned)
