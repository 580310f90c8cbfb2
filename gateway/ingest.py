"""From a topic and a payload to an entry (or a dead letter) in Redis, as over MQTT.

The payload goes through the bridge's `Intake.classify` (route, size, JSON and schema, identity,
clock, the per-asset token bucket), and its append through the shared group commit. An over-rate
message is refused (`RateLimited`, answered 429) rather than dead-lettered: over HTTP the client
is there to be told, and retries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from bridge.intake import Intake, Pending
from bridge.record import Reason
from bridge.source import Inbound
from config.settings import Settings
from gateway.commit import GroupCommit
from gateway.context import IngestOutcome, Unavailable


class RateLimited(Unavailable):
    """The asset's token bucket (`bridge.rate_limit`) is empty: nothing was stored."""


def inbound(topic: str, payload: bytes) -> Inbound:
    """A message as if received over MQTT (QoS 1, not retained)."""
    return Inbound(mid=0, qos=1, topic=topic, raw_topic=topic.encode("utf-8", "replace"),
                   payload=payload, retain=False, generation=0, received=time.monotonic(),
                   received_wall=time.time())  # fmt: skip


class Ingestor:
    def __init__(self, settings: Settings, intake: Intake, commit: GroupCommit) -> None:
        self._settings = settings
        self._intake = intake
        self._commit = commit
        rate = settings.bridge.rate_limit.per_asset_hz
        self._rate_retry_s = 1.0 if rate is None else max(1.0, math.ceil(1 / rate))

    def asset_of(self, topic: str) -> tuple[str, str] | None:
        """(route, asset) of a topic, or None when no route matches it."""
        matched = self._intake.routes.match(topic)
        if matched is None:
            return None
        route, levels = matched
        return route.name, levels[route.settings.asset_level]

    async def ingest(self, topic: str, payload: bytes) -> IngestOutcome:
        """Classify and store one message. Raises RateLimited, Unavailable."""
        pending = self._intake.classify(inbound(topic, payload))
        if pending.reason is Reason.RATE:
            raise RateLimited("asset over its rate limit", self._rate_retry_s)
        return (await self._store([pending]))[0]

    async def ingest_many(self, topic: str, payloads: Sequence[bytes]) -> list[IngestOutcome]:
        """Classify and store the lines of one bulk request in one group-commit submission: all
        of them are answered, or none is (Unavailable). An over-rate line is dead-lettered with
        reason rate, as over MQTT: the other lines of the request are stored."""
        return await self._store([self._intake.classify(inbound(topic, p)) for p in payloads])

    async def _store(self, items: Sequence[Pending]) -> list[IngestOutcome]:
        appends = [p.append for p in items if p.append is not None]
        ids = iter(await self._commit.submit(appends))
        outcomes = []
        for item in items:
            entry = next(ids) if item.append is not None else None
            if item.reason is not None:
                outcomes.append(IngestOutcome("rejected", None, item.reason.value, item.error))
            elif entry is None:
                outcomes.append(IngestOutcome("duplicate", None, None, None))
            else:
                outcomes.append(IngestOutcome("stored", entry.decode(), None, None))
        return outcomes
