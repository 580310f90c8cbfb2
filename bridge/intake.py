"""Intake: what a received message becomes in Redis, decided synchronously in the MQTT callback.

route -> size -> JSON and schema -> identity -> clock window -> per-asset rate limit. A message
that passes becomes a telemetry append with its dedup identity; one that fails becomes a dead
letter with its reason; a retained message under the `skip` policy becomes nothing at all (it is
acknowledged and counted). No Redis key, field name or metric label is built from a raw level.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

from bridge.contracts import Sample, build_contracts
from bridge.record import Reason, text_field, value_field
from bridge.routing import Route, RouteTable
from bridge.sink import Append, Dedup
from bridge.source import Inbound
from config.errors import PayloadRejected
from config.keys import Keys
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


@lru_cache(maxsize=4096)
def _name(field: str) -> bytes:
    """Field names recur in every entry: encode each once."""
    return field.encode()


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
        self._streams = {r.name: keys.telemetry(r.name) for r in self.routes.routes}
        self._dedup_keys = {r.name: keys.dedup(r.name) for r in self.routes.routes}
        self._buckets = TokenBuckets(settings.rate_limit)
        self._contracts = build_contracts(settings.contracts)

    @property
    def route_names(self) -> list[str]:
        return list(self._streams)

    @property
    def write_keys(self) -> list[str]:
        """Every key an append from this intake may name: the sink's fixed key table."""
        return [self._keys.dead_letters, *self._streams.values(), *self._dedup_keys.values()]

    def classify(self, inbound: Inbound) -> Pending:
        matched = self.routes.match(inbound.topic) if inbound.topic is not None else None
        if matched is None:
            detail = "no route matches the topic" if inbound.topic is not None else "not UTF-8"
            return self.dead_letter(inbound, UNROUTED, Reason.TOPIC, detail)
        route, levels = matched
        if inbound.retain and self._settings.retained == "skip":
            return Pending(inbound, route.name, None, None)
        try:
            sample = self._contracts[route.settings.contract].validate(
                inbound.payload,
                levels[route.settings.asset_level],
                self._settings.max_payload_bytes,
            )
            self._check_clock(sample, inbound.received_wall)
            self._check_rate(route.name, sample.asset, inbound.received)
        except PayloadRejected as exc:
            return self.dead_letter(inbound, route.name, Reason(exc.reason), exc.detail)
        append = self._telemetry(inbound, route, levels, sample)
        return Pending(inbound, route.name, append, None, sample.ts)

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

    def _telemetry(
        self, inbound: Inbound, route: Route, levels: dict[str, str], sample: Sample
    ) -> Append:
        # Bytes throughout: the sink packs them into RESP without encoding anything again.
        fields: list[bytes] = [
            b"asset", sample.asset.encode(), b"seq", b"%d" % sample.seq, b"ts", repr(sample.ts).encode(),
            b"topic", inbound.raw_topic, b"route", route.name.encode(),
            b"rx", repr(inbound.received_wall).encode(),
        ]  # fmt: skip
        for level, value in levels.items():
            if level != route.settings.asset_level:
                fields += [_name(level), value.encode()]
        if inbound.retain:
            fields += [b"retained", b"1"]
        for name, reading in sample.values.items():
            fields += [_name(value_field(name)), repr(reading).encode()]
        for name, text in sample.texts.items():
            fields += [_name(text_field(name)), text.encode()]
        dedup = None
        if self._settings.dedup:
            dedup = Dedup(self._dedup_keys[route.name], sample.asset, sample.seq, sample.ts)
        return Append(self._streams[route.name], fields, dedup)

    def dead_letter(self, inbound: Inbound, route: str, reason: Reason, detail: str) -> Pending:
        cap = self._settings.dlq_payload_bytes
        fields: list[bytes | str] = [
            "topic", inbound.raw_topic, "route", route, "reason", reason.value, "error", detail[:500],
            "rx", repr(inbound.received_wall), "size", str(len(inbound.payload)),
            "payload", inbound.payload[:cap],
        ]  # fmt: skip
        return Pending(inbound, route, Append(self._keys.dead_letters, fields), reason)
