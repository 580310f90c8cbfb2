"""Device tokens: `Authorization: Bearer ibt_<id>_<secret>`, each bound to an asset id or an
fnmatch pattern of them (`press-*` for a gateway device forwarding for many).

Redis keeps one hash field per token, `<id>` -> JSON with the SHA-256 of the secret (the secret
itself is printed once, by `iotbridge token create`, and never stored). The secret is 256 random
bits, so a fast hash is enough: nothing can be guessed from it. A request's token is looked up by
its id in a copy of the hash the gateway reloads every `refresh_s` (no Redis round trip per
request; a revoked token stops working within that time) and checked with a constant-time
comparison. An id not in the copy is looked up in Redis once, so a new token works at once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

log = logging.getLogger(__name__)

PREFIX = "ibt"
_TOKEN = re.compile(r"^ibt_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    asset: str  # an asset id or an fnmatch pattern of them
    sha256: str  # of the secret, hex
    created: float  # epoch seconds

    def allows(self, asset: str) -> bool:
        return fnmatch.fnmatchcase(asset, self.asset)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(asset: str) -> tuple[str, TokenRecord]:
    """A new token (the only time its secret exists in clear) and what Redis keeps of it."""
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    record = TokenRecord(token_id, asset, _digest(secret), round(time.time(), 3))
    return f"{PREFIX}_{token_id}_{secret}", record


def encode(record: TokenRecord) -> str:
    fields = asdict(record)
    del fields["id"]
    return json.dumps(fields, sort_keys=True)


def decode(token_id: str, raw: bytes | str) -> TokenRecord:
    fields = json.loads(raw)
    return TokenRecord(token_id, str(fields["asset"]), str(fields["sha256"]),
                       float(fields["created"]))  # fmt: skip


class TokenStore:
    """Checks bearer tokens against the hash in Redis, through a periodically reloaded copy."""

    MAX_MISSES = 10_000  # ids looked up and not found, remembered until the next reload

    def __init__(self, redis: aioredis.Redis, key: str, refresh_s: float = 5.0) -> None:
        self._redis = redis
        self._key = key
        self._refresh_s = refresh_s
        self._records: dict[str, TokenRecord] = {}
        self._loaded_at = float("-inf")
        self._misses: OrderedDict[str, None] = OrderedDict()

    async def reload(self) -> None:
        raw = await self._redis.hgetall(self._key)
        records = {}
        for token_id, value in raw.items():
            key = token_id.decode() if isinstance(token_id, bytes) else str(token_id)
            try:
                records[key] = decode(key, value)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed token record", extra={"token_id": key})
        self._records = records
        self._misses.clear()
        self._loaded_at = time.monotonic()

    async def _record(self, token_id: str) -> TokenRecord | None:
        if time.monotonic() - self._loaded_at >= self._refresh_s:
            # Marked first: the requests arriving during the reload use the copy, not a reload
            # each of their own.
            self._loaded_at = time.monotonic()
            try:
                await self.reload()
            except (RedisError, RedisClusterException, OSError) as exc:
                # The copy still holds: tokens keep working through a Redis outage.
                log.warning("cannot reload device tokens", extra={"error": str(exc)})
        record = self._records.get(token_id)
        if record is not None or token_id in self._misses:
            return record
        try:
            raw = await self._redis.hget(self._key, token_id)
        except (RedisError, RedisClusterException, OSError):
            return None
        if raw is None:
            self._misses[token_id] = None
            if len(self._misses) > self.MAX_MISSES:
                self._misses.popitem(last=False)
            return None
        record = decode(token_id, raw)
        self._records[token_id] = record
        return record

    async def check(self, token: str) -> TokenRecord | None:
        """The record of a valid token, or None (malformed, unknown, revoked, wrong secret)."""
        match = _TOKEN.match(token)
        if match is None:
            return None
        token_id, secret = match.groups()
        record = await self._record(token_id)
        if record is None:
            return None
        if not hmac.compare_digest(_digest(secret), record.sha256):
            return None
        return record


class FailureThrottle:
    """Slows a client down after repeated failed token checks: past `allowed` failures each
    failing answer waits `penalty_s`, doubling per further failure up to 8x. A success clears it.
    Bounded: the least recently failing clients are forgotten first."""

    MAX_CLIENTS = 10_000

    def __init__(self, allowed: int, penalty_s: float) -> None:
        self._allowed = allowed
        self._penalty_s = penalty_s
        self._failures: OrderedDict[str, int] = OrderedDict()

    def failed(self, client: str) -> float:
        """Record a failure; the delay (seconds) to impose on this answer."""
        count = self._failures.pop(client, 0) + 1
        self._failures[client] = count
        if len(self._failures) > self.MAX_CLIENTS:
            self._failures.popitem(last=False)
        over = count - self._allowed
        return 0.0 if over <= 0 else self._penalty_s * min(8, 2 ** (over - 1))

    def succeeded(self, client: str) -> None:
        if self._failures:
            self._failures.pop(client, None)
