"""What every part of the gateway's HTTP API is built from: settings, key names, the intake
(routes and contracts), a Redis client for reads, and `ingest`, the one way a message is stored.

`ingest(topic, payload)` goes through the same classification as an MQTT message (route, size,
JSON and schema, identity, clock) and the same group-commit write (one atomic EVALSHA per batch,
the bridge's dedup script), and returns only once Redis has stored the entry or its dead letter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis

from bridge.intake import Intake
from config.keys import Keys
from config.settings import Settings


@dataclass(slots=True)
class IngestOutcome:
    """What became of one message once Redis confirmed it."""

    status: Literal["stored", "duplicate", "rejected"]
    id: str | None  # stream entry id when stored (of the telemetry entry), else None
    reason: str | None  # json|schema|topic|identity|clock|size|... when rejected (dead-lettered)
    error: str | None  # human-readable detail when rejected


class Unavailable(Exception):
    """Redis is away, or did not confirm the write within `gateway.write_timeout_ms`: nothing may
    be reported stored. The client retries after `retry_after_s`; the dedup keeps one entry."""

    def __init__(self, detail: str, retry_after_s: float) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class GatewayContext:
    settings: Settings  # with its `gateway` section
    keys: Keys
    intake: Intake  # routes and contracts
    redis: aioredis.Redis  # a client for reads (decode_responses=False)
    # (topic, payload) through the shared group-commit write; raises Unavailable
    ingest: Callable[[str, bytes], Awaitable[IngestOutcome]]
