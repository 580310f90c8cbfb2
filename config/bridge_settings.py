"""Settings of the bridge: routes, contracts, batching, spool, limits and retention."""

from __future__ import annotations

import re
import string
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from config.sections import Name, Section
from config.topic_filters import filter_problem, partition_problems, route_filter


class BatchSettings(Section):
    max_size: int = Field(500, gt=0, le=100_000, description="Messages per Redis round trip.")
    max_bytes: int = Field(1_048_576, gt=0, description="Payload bytes per Redis round trip.")
    max_delay_ms: float = Field(
        5.0, ge=0, description="Longest a message waits for its batch to fill before it is written."
    )
    pipeline: int = Field(
        2,
        ge=1,
        le=8,
        description="Batches sent to Redis before the first one's reply, on one connection "
        "(replies come in order): the bridge packs the next batch while Redis runs the last. "
        "One joins a batch in flight once it is full or its oldest message is max_delay_ms old.",
    )


class SpoolSettings(Section):
    dir: str | None = Field(
        None,
        description="Directory of the on-disk spool used while Redis is away (store and forward); "
        "null disables it, and the bridge then holds its acks until Redis returns.",
    )
    max_bytes: int = Field(
        1_073_741_824, gt=0, description="Spool size bound; when full, the bridge stops acking."
    )
    segment_bytes: int = Field(
        16_777_216, gt=0, description="Size of one spool file before a new one is started."
    )


class ClockSettings(Section):
    max_past_s: float | None = Field(
        86_400.0, gt=0, description="Device timestamps older than this are dead-lettered (clock)."
    )
    max_future_s: float | None = Field(
        300.0, gt=0, description="Device timestamps further ahead are dead-lettered (clock)."
    )


class RateLimitSettings(Section):
    per_asset_hz: float | None = Field(
        None,
        gt=0,
        description="Sustained messages per second per asset; the excess is dead-"
        "lettered with reason rate. null: no limit.",
    )
    burst: int = Field(100, gt=0, description="Messages an asset may send at once above its rate.")


class RetentionSettings(Section):
    max_entries: int = Field(
        1_000_000, gt=0, description="Entries kept per telemetry stream (trimmed approximately)."
    )
    max_age_s: float | None = Field(
        None, gt=0, description="Entries older than this are trimmed; null: no age bound."
    )
    interval_s: float = Field(5.0, gt=0, description="How often the streams are trimmed.")


class ContractField(Section):
    type: Literal["number", "integer", "boolean", "string"] = Field(
        "number",
        description="JSON type of the value; numbers must be finite, integers within "
        "+/-(2**53 - 1) (exact as the float every value is stored and read as).",
    )
    unit: str | None = Field(None, description="Unit of the value, for people (e.g. degC, bar).")
    required: bool = Field(True, description="The value must be present in every message.")
    min: float | None = Field(None, description="Smallest accepted number.")
    max: float | None = Field(None, description="Largest accepted number.")
    enum: list[str] | None = Field(None, description="Accepted strings (type string only).")

    @model_validator(mode="after")
    def _consistent(self) -> ContractField:
        numeric = self.type in ("number", "integer")
        if (self.min is not None or self.max is not None) and not numeric:
            raise ValueError("min and max apply to number and integer fields only")
        if self.enum is not None and self.type != "string":
            raise ValueError("enum applies to string fields only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must be <= max")
        if self.type == "integer" and any(
            bound is not None and not float(bound).is_integer() for bound in (self.min, self.max)
        ):
            raise ValueError("min and max of an integer field must be whole numbers")
        return self


class ContractSettings(Section):
    values: dict[Name, ContractField] = Field(
        min_length=1, description="The payload's `values`, declared field by field."
    )
    allow_undeclared: bool = Field(
        False, description="Accept (and store) finite numbers under names not declared here."
    )


class RouteSettings(Section):
    name: Name = Field(description="Route name; part of the stream key and the `route` label.")
    topic: str = Field(
        description="Topic template; `{level}` names a level (subscribed as +), a final # is allowed."
    )
    contract: Name = Field(
        "telemetry",
        description="Payload contract: the built-in `telemetry`, or a name under bridge.contracts.",
    )
    qos: Literal[0, 1] = Field(1, description="Subscription QoS.")
    asset_level: str = Field("asset", description="Topic level that names the asset.")

    @field_validator("topic")
    @classmethod
    def _template(cls, value: str) -> str:
        levels = value.split("/")
        for index, level in enumerate(levels):
            if level == "#" and index != len(levels) - 1:
                raise ValueError("# is only allowed as the last level")
            if level == "+" or ("{" in level and not re.fullmatch(r"\{[a-z_][a-z0-9_]*\}", level)):
                raise ValueError(f"level {level!r}: name wildcard levels as {{name}}")
        return value

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(
            name for _, name, _, _ in string.Formatter().parse(self.topic) if name is not None
        )

    @model_validator(mode="after")
    def _asset_level_named(self) -> RouteSettings:
        if self.asset_level not in self.level_names:
            raise ValueError(f"asset_level {self.asset_level!r} is not a level of the topic")
        return self


class PartitionSettings(Section):
    name: Name = Field(
        description="Partition name; its MQTT session's client id is <mqtt.client_id>-<name>."
    )
    filters: list[str] = Field(
        min_length=1,
        description="MQTT topic filters (+ and # allowed, no $share) within the route table; "
        "the partition's session subscribes to them, narrowed to each route they overlap.",
    )

    @field_validator("filters")
    @classmethod
    def _valid_filters(cls, filters: list[str]) -> list[str]:
        for topic_filter in filters:
            problem = filter_problem(topic_filter)
            if problem:
                raise ValueError(f"{topic_filter!r}: {problem}")
        return filters


def _default_routes() -> list[RouteSettings]:
    return [RouteSettings(name="telemetry", topic="plant/{site}/{line}/{asset}/telemetry")]


class BridgeSettings(Section):
    routes: list[RouteSettings] = Field(
        default_factory=_default_routes, min_length=1, description="Ordered route table."
    )
    contracts: dict[Name, ContractSettings] = Field(
        default_factory=dict,
        description="Contracts declared in YAML: ts, seq and asset as in `telemetry`, with typed "
        "values.",
    )
    shared_group: Name | None = Field(
        None, description="Subscribe as $share/<group>/... so several bridges split the load."
    )
    partition_coverage: Literal["complete", "declared"] = Field(
        "complete",
        description="complete: refuse partitions that leave topics of a route to no partition. "
        "declared: the partitions' filters are the plant's topic space (its sites, lines); the "
        "route topics outside them are not subscribed, and the bridge names them at start.",
    )
    partition_lease_ttl_s: float = Field(
        10.0,
        ge=1.0,
        description="Lease of a partition: renewed every third of it; a crashed bridge's "
        "partitions are taken over after it.",
    )
    partitions: list[PartitionSettings] = Field(
        default_factory=list,
        description="Session partitions: each is one persistent MQTT session, owned by one bridge "
        "of the fleet at a time through a lease in Redis. Empty: one session with every route's "
        "filter, no lease (a single bridge).",
    )
    max_payload_bytes: int = Field(
        65_536, gt=0, description="Larger payloads are dead-lettered (reason size) unparsed."
    )
    dlq_payload_bytes: int = Field(
        4096, gt=0, description="Raw payload bytes kept in a dead letter; the rest is cut."
    )
    dedup: bool = Field(
        True, description="Drop redelivered messages by (asset, seq) in the same step as the write."
    )
    retained: Literal["skip", "tag"] = Field(
        "skip",
        description="Retained messages: skip (acknowledge, count, never store stale values as "
        "fresh) or tag (store them with a retained=1 field).",
    )
    clock: ClockSettings = Field(
        default_factory=ClockSettings, description="Window of accepted device timestamps."
    )
    rate_limit: RateLimitSettings = Field(
        default_factory=RateLimitSettings, description="Per-asset token bucket."
    )
    spool: SpoolSettings = Field(
        default_factory=SpoolSettings, description="Store and forward while Redis is away."
    )
    retention: RetentionSettings = Field(
        default_factory=RetentionSettings,
        description="Stream bounds; never trims an entry still pending in a consumer group.",
    )
    max_in_flight: int = Field(
        2000, gt=0, description="Messages received but not yet acknowledged before reading pauses."
    )
    max_unacked_age_s: float = Field(
        30.0, gt=0, description="/readyz fails when the oldest unacknowledged message is older."
    )
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Write batching.")
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics, /healthz, /readyz.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Port of the bridge's HTTP server.")
    shutdown_grace_s: float = Field(10.0, gt=0, description="Time allowed to drain on SIGTERM.")

    @field_validator("partitions")
    @classmethod
    def _partitions_split_the_routes(
        cls, partitions: list[PartitionSettings], info: ValidationInfo
    ) -> list[PartitionSettings]:
        routes = info.data.get("routes")
        if routes is None or not partitions:
            return partitions
        coverage = info.data.get("partition_coverage", "complete")
        problems = partition_problems(
            [(p.name, p.filters) for p in partitions],
            [(r.name, route_filter(r.topic)) for r in routes],
            complete=coverage == "complete",
        )
        if problems:
            raise ValueError("; ".join(problems))
        return partitions

    @model_validator(mode="after")
    def _unique_routes(self) -> BridgeSettings:
        names = [route.name for route in self.routes]
        if len(names) != len(set(names)):
            raise ValueError("route names must be unique")
        if "telemetry" in self.contracts:
            raise ValueError("contracts: `telemetry` is the built-in contract's name")
        for route in self.routes:
            if route.contract != "telemetry" and route.contract not in self.contracts:
                raise ValueError(f"route {route.name}: no contract named {route.contract!r}")
        if self.partitions and self.shared_group:
            raise ValueError("partitions and shared_group exclude each other: a partition's "
                             "session is its own subscriber")  # fmt: skip
        return self
