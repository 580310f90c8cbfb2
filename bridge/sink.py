"""The sink: batched appends to the telemetry and dead-letter streams, one round trip per batch.

A batch is written in one MULTI/EXEC so that it is applied whole or not at all; the caller
acknowledges the batch's messages only after `write` returns. Any Redis failure becomes
SinkUnavailable (retryable) and nothing of the batch may be acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from config.errors import ConfigError, ConfigProblem, SinkUnavailable
from config.settings import RedisSettings

log = logging.getLogger(__name__)

# Policies under which Redis may delete a stream to make room: every XADD would still succeed.
_EVICTING = {"allkeys-lru", "allkeys-lfu", "allkeys-random"}


@dataclass(frozen=True, slots=True)
class Append:
    """One XADD: a stream key and its flat field/value list."""

    stream: str
    fields: Sequence[bytes | str]


def redis_client(
    settings: RedisSettings, *, decode_responses: bool = False, client_name: str | None = None
) -> aioredis.Redis:
    """A client with short timeouts and no blind retries: the caller owns retry decisions.

    redis-py's defaults retry a timed-out write three times (measured: 14 s to fail one XADD to
    a stopped Redis, which it then applied anyway), so a retry here could duplicate a batch and
    would hide an outage from the caller's backoff, logs and metrics.
    """
    return aioredis.Redis.from_url(
        settings.url,
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password else None,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        decode_responses=decode_responses,
        client_name=client_name,
    )


class RedisSink:
    def __init__(self, settings: RedisSettings, stream_maxlen: int) -> None:
        self._redis = redis_client(settings)
        self._maxlen = str(stream_maxlen)

    async def check(self) -> None:
        """Ping, and refuse a Redis that would evict streams (ConfigError, not retried)."""
        try:
            await self._redis.ping()
            policy = (await self._redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except ResponseError as exc:
            # CONFIG may be denied to a least-privilege user; the operator owns the policy then.
            log.warning("cannot read maxmemory-policy, not checked", extra={"error": str(exc)})
            return
        except (RedisError, OSError) as exc:
            raise SinkUnavailable(f"redis: {exc}") from exc
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy in _EVICTING:
            raise ConfigError([ConfigProblem(
                "redis", f"maxmemory-policy is {policy}: Redis would silently evict telemetry "
                "streams; set it to noeviction (or a volatile-* policy)")])  # fmt: skip

    async def write(self, appends: Sequence[Append]) -> float:
        """Append every entry in one MULTI/EXEC; the seconds it took. Raises SinkUnavailable."""
        started = time.perf_counter()
        pipe = self._redis.pipeline(transaction=True)
        for append in appends:
            pipe.execute_command(
                "XADD", append.stream, "MAXLEN", "~", self._maxlen, "*", *append.fields
            )
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return time.perf_counter() - started

    async def close(self) -> None:
        await self._redis.aclose()
