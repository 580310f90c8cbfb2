"""Intake: what a received message becomes in Redis, decided synchronously in the MQTT callback.

route -> size -> JSON and schema -> identity -> clock window -> per-asset rate limit. A message
that passes becomes a telemetry append with its dedup identity; one that fails becomes a dead
letter with its reason; a retained message under the `skip` policy becomes nothing at all (it is
acknowledged and counted). No Redis key, field name or metric label is built from a raw level.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from bridge.contracts import Contract, Sample, build_contracts
from bridge.record import Reason, text_field, value_field
from bridge.routing import RouteTable
from bridge.sink import Append, Dedup, bulk
from bridge.source import Inbound
from config.errors import PayloadRejected
from config.keys import Keys, shard_of
from config.settings import BridgeSettings, RateLimitSettings
from observability.metrics import UNROUTED


@dataclass(slots=True)
class Pending:
    """A received message and what it becomes in Redis (None: acknowledged without a write)."""

    inbound: Inbound
    route: str
    append: Append | None
    reason: Reason | None
    device_ts: float | None = None  # the payload's ts, for the publish-to-write latency
    error: str = ""  # a dead letter's `error` field


@dataclass(frozen=True, slots=True)
class _Target:
    """What a topic's messages share, worked out once per topic: the route, the contract and
    asset they are checked against, and the packed fields, stream and dedup key of an entry."""

    route: str
    contract: Contract
    asset: str
    static: bytes  # asset, topic, route and the other named levels, packed
    count: int  # bulk strings in an entry without its values
    stream: str
    dedup_key: str | None
    asset_bulk: bytes


@lru_cache(maxsize=4096)
def _bulk_name(field: str) -> bytes:
    """Field names recur in every entry: pack each once."""
    return bulk(field.encode())


@lru_cache(maxsize=4096)
def _value_name(name: str) -> bytes:
    """`v.<name>` packed; names come from payloads, so the cache is bounded."""
    return bulk(value_field(name).encode())


_RETAINED = bulk(b"retained") + bulk(b"1")

# A reading packed with its field name (`v.<name>` and the value's repr, two RESP bulk strings):
# a float's repr costs 0.2-0.4 us and its packing as much again, and sensor readings recur (a
# quantised signal, a few decimals), so each pair is made once. Bounded: past the bound a pair not
# yet seen is packed each time, as before; values that never recur cost one dict miss.
_READINGS: dict[tuple[str, float], bytes] = {}
_READINGS_MAX = 65_536


def _reading(name: str, reading: float) -> bytes:
    text = repr(reading).encode()
    packed = b"%b$%d\r\n%b\r\n" % (_value_name(name), len(text), text)
    # Not 0.0: -0.0 is equal to it and would read back as "0.0".
    if reading and len(_READINGS) < _READINGS_MAX:
        _READINGS[name, reading] = packed
    return packed


class TokenBuckets:
    """One token bucket per asset, refilled at `per_asset_hz` up to `burst`.

    Buckets live in an LRU of bounded size: an asset that has been quiet long enough to be evicted
    has a full bucket anyway, so eviction never changes a decision.
    """

    MAX_ASSETS = 500_000

    def __init__(self, settings: RateLimitSettings) -> None:
        self._rate = settings.per_asset_hz
        self._burst = float(settings.burst)
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def allow(self, route: str, asset: str, now: float) -> bool:
        if self._rate is None:
            return True
        key = (route, asset)
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.MAX_ASSETS:
            self._buckets.popitem(last=False)
        return allowed


class Intake:
    def __init__(self, settings: BridgeSettings, keys: Keys) -> None:
        self._settings = settings
        self._keys = keys
        self.routes = RouteTable(settings.routes)
        self._shards = keys.shards
        self._streams = {r.name: keys.telemetry_streams(r.name) for r in self.routes.routes}
        self._dedup_keys = {
            r.name: [keys.dedup(r.name, shard) for shard in range(keys.shards)]
            for r in self.routes.routes
        }
        self._route_field = {
            r.name: bulk(b"route") + bulk(r.name.encode()) for r in self.routes.routes
        }
        self._buckets = TokenBuckets(settings.rate_limit)
        self._contracts = build_contracts(settings.contracts)
        # Bounded like the route table's topic cache: one entry per topic seen.
        self._target = lru_cache(maxsize=200_000)(self._target_uncached)
        self._skip_retained = settings.retained == "skip"
        self._max_bytes = settings.max_payload_bytes
        clock = settings.clock
        self._max_past_s = math.inf if clock.max_past_s is None else clock.max_past_s
        self._max_future_s = math.inf if clock.max_future_s is None else clock.max_future_s
        self._rate_limited = settings.rate_limit.per_asset_hz is not None
        self._rx_wall = -1.0  # the receive time whose `rx` field is packed in _rx_field
        self._rx_field = b""

    @property
    def route_names(self) -> list[str]:
        return list(self._streams)

    @property
    def write_keys(self) -> list[str]:
        """Every key an append from this intake may name: the sink's fixed key table."""
        streams = [key for keys in self._streams.values() for key in keys]
        dedup = [key for keys in self._dedup_keys.values() for key in keys]
        return [self._keys.dead_letters, *streams, *dedup]

    def classify(self, inbound: Inbound) -> Pending:
        topic = inbound.topic
        if topic is None or (target := self._target(topic)) is None:
            detail = "no route matches the topic" if topic is not None else "not UTF-8"
            return self.dead_letter(inbound, UNROUTED, Reason.TOPIC, detail)
        if inbound.retain and self._skip_retained:
            return Pending(inbound, target.route, None, None)
        try:
            sample = target.contract.validate(inbound.payload, target.asset, self._max_bytes)
            # The window's bounds compared here, the message built only when one is crossed;
            # unbounded sides are infinite. With the rate limit off (the default) no call.
            now = inbound.received_wall
            if not now - self._max_past_s <= sample.ts <= now + self._max_future_s:
                self._check_clock(sample, now)
            if self._rate_limited:
                self._check_rate(target.route, sample.asset, inbound.received)
        except PayloadRejected as exc:
            return self.dead_letter(inbound, target.route, Reason(exc.reason), exc.detail)
        append = self._telemetry(inbound, target, sample)
        return Pending(inbound, target.route, append, None, sample.ts)

    def _check_rate(self, route: str, asset: str, now: float) -> None:
        if not self._buckets.allow(route, asset, now):
            limit = self._settings.rate_limit.per_asset_hz
            raise PayloadRejected(Reason.RATE, f"asset over {limit} msg/s")

    def _check_clock(self, sample: Sample, now: float) -> None:
        clock = self._settings.clock
        if clock.max_past_s is not None and sample.ts < now - clock.max_past_s:
            raise PayloadRejected(
                Reason.CLOCK, f"ts {sample.ts:.3f} is {now - sample.ts:.0f} s in the past"
            )
        if clock.max_future_s is not None and sample.ts > now + clock.max_future_s:
            raise PayloadRejected(
                Reason.CLOCK, f"ts {sample.ts:.3f} is {sample.ts - now:.0f} s in the future"
            )

    def _telemetry(self, inbound: Inbound, target: _Target, sample: Sample) -> Append:
        # RESP, built once here: the sink sends these bytes as they are. What depends only on
        # the topic (asset, topic, route, levels, stream, dedup key) is packed once per topic,
        # and seq and ts once per message, for the entry and for the dedup script alike.
        count = target.count
        if inbound.received_wall != self._rx_wall:
            # The messages of one read share their receive time: its repr (0.4 us) is made once.
            self._rx_wall = inbound.received_wall
            rx = repr(self._rx_wall).encode()
            self._rx_field = b"$2\r\nrx\r\n$%d\r\n%b\r\n" % (len(rx), rx)
        seq, ts = b"%d" % sample.seq, repr(sample.ts).encode()
        seq, ts = b"$%d\r\n%b\r\n" % (len(seq), seq), b"$%d\r\n%b\r\n" % (len(ts), ts)
        parts = [b"%b$3\r\nseq\r\n%b$2\r\nts\r\n%b%b" % (target.static, seq, ts, self._rx_field)]
        if inbound.retain:
            parts.append(_RETAINED)
            count += 2
        readings = _READINGS
        for name, reading in sample.values.items():
            parts.append(readings.get((name, reading)) or _reading(name, reading))
        for name, text_value in sample.texts.items():
            parts += [_bulk_name(text_field(name)), bulk(text_value.encode())]
        count += 2 * (len(sample.values) + len(sample.texts))
        dedup = None
        if target.dedup_key is not None:
            dedup = Dedup(target.dedup_key, sample.asset, sample.seq, sample.ts,
                          target.asset_bulk + seq + ts)  # fmt: skip
        return Append(target.stream, count, b"".join(parts), dedup)

    def _target_uncached(self, topic: str) -> _Target | None:
        """What a topic's messages share; None when no route matches it."""
        matched = self.routes.match(topic)
        if matched is None:
            return None
        route, levels = matched
        asset = levels[route.settings.asset_level]
        parts = [
            bulk(b"asset"), bulk(asset.encode()), bulk(b"topic"), bulk(topic.encode()),
            self._route_field[route.name],
        ]  # fmt: skip
        count = 12  # asset, topic, route, and seq, ts, rx: field and value each
        for level, value in levels.items():
            if level != route.settings.asset_level:
                parts += [_bulk_name(level), bulk(value.encode())]
                count += 2
        shard = shard_of(asset, self._shards)
        dedup = self._dedup_keys[route.name][shard] if self._settings.dedup else None
        stream = self._streams[route.name][shard]
        contract = self._contracts[route.settings.contract]
        return _Target(route.name, contract, asset, b"".join(parts), count, stream, dedup,
                       bulk(asset.encode()))  # fmt: skip

    def dead_letter(self, inbound: Inbound, route: str, reason: Reason, detail: str) -> Pending:
        cap = self._settings.dlq_payload_bytes
        error = detail[:500]
        fields: list[bytes | str] = [
            "topic", inbound.raw_topic, "route", route, "reason", reason.value, "error", error,
            "rx", repr(inbound.received_wall), "size", str(len(inbound.payload)),
            "payload", inbound.payload[:cap],
        ]  # fmt: skip
        return Pending(inbound, route, Append.of(self._keys.dead_letters, fields), reason,
                       error=error)  # fmt: skip
