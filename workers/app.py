"""The worker process: wiring only. Settings in, a consumer with its detectors, metrics and Redis
clients out; `run(stop)` until stop, then at most `worker.shutdown_grace_s` to finish the batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from config.settings import Settings
from observability.lifecycle import gc_thresholds
from observability.metrics import WorkerMetrics
from workers.consumer import Consumer, consumer_name
from workers.detectors import Check, build_checks
from workers.placement import Placement
from workers.state import Engine

log = logging.getLogger(__name__)


class WorkerApp:
    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        checks: Sequence[Check] | None = None,
    ) -> None:
        """`checks` replaces the configured detectors (tests inject their own)."""
        self._settings = settings
        self.metrics = WorkerMetrics(registry)
        engine = Engine(build_checks(settings.worker.detectors) if checks is None else checks)
        self.consumer = Consumer(settings, self.metrics, engine, consumer_name(settings.worker))

    def readiness(self) -> tuple[bool, str]:
        """Ready when Redis answers and the consumer groups exist."""
        return self.consumer.readiness()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`; then finish and ack the current batch, hand the shards back and
        close the client."""
        # Built here, not in __init__, so its connections belong to the running event loop.
        redis = Placement.connect(
            self._settings.redis, client_name=f"iotbridge-worker-{self.consumer.name}"
        )
        try:
            with gc_thresholds():
                async with asyncio.TaskGroup() as tasks:
                    consuming = tasks.create_task(self.consumer.run(redis, stop), name="consumer")
                    tasks.create_task(self._enforce_grace(stop, consuming), name="shutdown-grace")
        finally:
            await redis.close()

    async def _enforce_grace(self, stop: asyncio.Event, consuming: asyncio.Task[None]) -> None:
        """After stop, give the consumer the grace period to finish its batch, then cancel it: an
        unacked batch is safe, the shard's next owner claims it (this worker's leases expire)."""
        await stop.wait()
        grace = self._settings.worker.shutdown_grace_s
        done, _ = await asyncio.wait({consuming}, timeout=grace)
        if not done:
            log.warning("batch not finished within %.1f s of stop, cancelling it", grace)
            consuming.cancel()
