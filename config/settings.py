"""The settings model: one Pydantic model for the whole YAML file (`config/settings.yaml`).

Every field has a default and a description; units are in the names. Unknown keys are errors.
Environment variables `IOTBRIDGE_<SECTION>__<KEY>` override the file (see `config.loader`).
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

# A topic level or a name that may become part of a Redis key or a metric label.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(Section):
    ca_file: str | None = Field(None, description="CA bundle that signed the server certificate.")
    cert_file: str | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: str | None = Field(None, description="Client private key for mutual TLS.")
    insecure_skip_verify: bool = Field(
        False, description="Accept any server certificate (tests only; never in a plant)."
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        return self


class MqttSettings(Section):
    url: str = Field(
        "mqtt://127.0.0.1:1883", description="Broker address: mqtt://host:port or mqtts:// for TLS."
    )
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    client_id: Name = Field(
        "iotbridge-bridge",
        description="Fixed client id of the bridge, so the broker keeps its session across restarts.",
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive interval.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Timeout of one connect attempt.")
    session_expiry_s: int = Field(
        7200,
        ge=0,
        description="MQTT 5 session expiry: how long the broker keeps the bridge's queue while it is "
        "away. At least the longest outage the plant tolerates.",
    )
    receive_maximum: int = Field(
        1000,
        gt=0,
        le=65535,
        description="MQTT 5 receive maximum: unacknowledged QoS 1 messages the broker may send.",
    )
    username: str | None = Field(None, description="Username, if the broker requires one.")
    password: SecretStr | None = Field(
        None, description="Password; set it with IOTBRIDGE_MQTT__PASSWORD, never in the file."
    )
    tls: TlsSettings = Field(default_factory=TlsSettings, description="TLS for mqtts:// URLs.")

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError("must look like mqtt://host:port or mqtts://host:port")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def tls_enabled(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"


class RedisSettings(Section):
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis address: redis://host:port/db (rediss:// TLS).",
    )
    key_prefix: Name = Field("iotbridge", description="Prefix of every key iotbridge writes.")
    username: str | None = Field(None, description="Redis ACL user name.")
    password: SecretStr | None = Field(
        None, description="Redis password; set it with IOTBRIDGE_REDIS__PASSWORD."
    )
    stream_shards: int = Field(
        1,
        ge=1,
        le=1024,
        description="Telemetry streams per route, split by asset (crc32); every sample of an asset "
        "lands in one shard. Fixed for the life of the data: bridges and workers must agree.",
    )
    socket_timeout_s: float = Field(
        2.0, gt=0, description="Timeout of one command; short, so a stalled Redis is noticed."
    )
    connect_timeout_s: float = Field(2.0, gt=0, description="Timeout of one connect attempt.")

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must look like redis://host:port/db")
        return value


class BackoffSettings(Section):
    initial_s: float = Field(0.2, gt=0, description="First retry delay after a failure.")
    max_s: float = Field(10.0, gt=0, description="Longest retry delay.")
    multiplier: float = Field(2.0, ge=1, description="Growth of the delay per failed attempt.")
    jitter: float = Field(0.2, ge=0, le=1, description="Random +/- fraction applied to each delay.")

    @model_validator(mode="after")
    def _ordered(self) -> BackoffSettings:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


class BatchSettings(Section):
    max_size: int = Field(500, gt=0, le=100_000, description="Messages per Redis round trip.")
    max_bytes: int = Field(1_048_576, gt=0, description="Payload bytes per Redis round trip.")
    max_delay_ms: float = Field(
        5.0, ge=0, description="Longest a message waits for its batch to fill before it is written."
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
        "number", description="JSON type of the value; numbers must be finite."
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
        return self


Severity = Literal["info", "warning", "critical"]


class DetectorRule(Section):
    """Where a rule applies. Per detector (and value), the first rule in the list that matches
    a sample's route and asset wins, so a specific pattern goes before a catch-all."""

    route: Name | None = Field(None, description="Route the rule applies to; null: every route.")
    assets: str = Field(
        "*", min_length=1, description="fnmatch pattern on the asset id (e.g. `oven-*`)."
    )
    severity: Severity = Field("warning", description="Severity of the events it raises.")


class ValueRule(DetectorRule):
    value: Name = Field(description="Value name in the payload's `values`.")


class ThresholdRule(ValueRule):
    min: float | None = Field(None, description="Flag values below this bound.")
    max: float | None = Field(None, description="Flag values above this bound.")
    hysteresis: float = Field(
        0.0,
        ge=0,
        description="Absolute margin, in the value's unit: a flagged value must come back this far "
        "inside the bound to end the anomaly, so a value hovering at a bound is one flag.",
    )

    @model_validator(mode="after")
    def _some_bound(self) -> ThresholdRule:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        if self.min is not None and self.max is not None:
            if self.min >= self.max:
                raise ValueError("min must be < max")
            if 2 * self.hysteresis >= self.max - self.min:
                raise ValueError("hysteresis must be less than half of max - min")
        return self


class DeviationRule(ValueRule):
    alpha: float = Field(
        0.02,
        gt=0,
        le=1,
        description="EWMA weight of a new sample (about 2/alpha samples of memory).",
    )
    z_max: float = Field(6.0, gt=0, description="Flag when |value - mean| / std exceeds this.")
    z_clear: float = Field(3.0, ge=0, description="End the anomaly when |z| is back at or below.")
    warmup_samples: int = Field(
        30, ge=2, description="Samples per asset and value before anything is flagged."
    )
    min_std: float = Field(
        0.0, ge=0, description="Floor of the std, so a very steady value does not flag noise."
    )

    @model_validator(mode="after")
    def _clear_below_max(self) -> DeviationRule:
        if self.z_clear >= self.z_max:
            raise ValueError("z_clear must be < z_max")
        return self


class RateRule(ValueRule):
    max_per_s: float = Field(gt=0, description="Flag when |dv/dt| (device time) exceeds this.")
    min_dt_s: float = Field(
        1.0,
        gt=0,
        description="Floor of dt: at high sample rates, sample noise must not read as a fast change.",
    )


class FlatlineRule(ValueRule):
    epsilon: float = Field(1e-9, ge=0, description="Largest change that still counts as unchanged.")
    samples: int = Field(30, ge=2, description="Flag after this many unchanged samples ...")
    duration_s: float | None = Field(
        None,
        gt=0,
        description="... or after this long unchanged (device time); null: samples only.",
    )


class StalenessRule(DetectorRule):
    silent_s: float = Field(
        60.0, gt=0, description="Flag an asset that sent nothing for this long (stream time)."
    )


class SequenceGapRule(DetectorRule):
    reorder_window: int = Field(
        8,
        ge=1,
        le=52,
        description="A missing seq is lost once a seq this far above it arrived; until then a "
        "late sample fills the hole. A seq this far behind the highest is a device restart.",
    )


def _default_classes() -> dict[AssetClassName, float]:
    return {"motor": 0.4, "pump": 0.3, "press": 0.2, "oven": 0.1}


def _default_thresholds() -> list[ThresholdRule]:
    return [
        ThresholdRule(
            value="temperature", min=-20.0, max=90.0, hysteresis=1.0, severity="critical"
        ),
        ThresholdRule(value="vibration", max=8.0, hysteresis=0.2),
    ]


def _default_deviation() -> list[DeviationRule]:
    return [
        DeviationRule(value="temperature", min_std=0.2),
        DeviationRule(value="vibration", min_std=0.05),
        DeviationRule(value="pressure", min_std=0.05),
    ]


def _default_rate() -> list[RateRule]:
    return [
        RateRule(value="temperature", max_per_s=10.0),
        RateRule(value="vibration", max_per_s=3.0),
        RateRule(value="pressure", max_per_s=1.5),
    ]


def _default_flatline() -> list[FlatlineRule]:
    return [FlatlineRule(value=name) for name in ("temperature", "vibration", "pressure")]


class DetectorSettings(Section):
    threshold: list[ThresholdRule] = Field(
        default_factory=_default_thresholds, description="Static bounds, with hysteresis."
    )
    deviation: list[DeviationRule] = Field(
        default_factory=_default_deviation, description="EWMA mean and variance: flag |z| > z_max."
    )
    rate: list[RateRule] = Field(
        default_factory=_default_rate, description="Rate of change: flag |dv/dt| > max_per_s."
    )
    flatline: list[FlatlineRule] = Field(
        default_factory=_default_flatline, description="A value stuck at one reading."
    )
    staleness: list[StalenessRule] = Field(
        default_factory=lambda: [StalenessRule()], description="An asset gone silent."
    )
    sequence_gap: list[SequenceGapRule] = Field(
        default_factory=lambda: [SequenceGapRule(severity="info")],
        description="`seq` jumps: samples lost before the broker (a restart to 0 is not a gap).",
    )
    tick_s: float = Field(
        1.0, gt=0, le=60, description="How often time-driven detectors (staleness) are checked."
    )


class WorkerSettings(Section):
    group: Name = Field("workers", description="Consumer group name.")
    consumer: Name | None = Field(
        None, description="Consumer name; default host-pid, unique per process."
    )
    batch_size: int = Field(500, gt=0, description="Entries per XREADGROUP, per stream.")
    block_ms: int = Field(
        1000, gt=0, le=10_000, description="XREADGROUP BLOCK; short so shutdown is prompt."
    )
    claim_idle_ms: int = Field(
        30_000,
        gt=0,
        description="Pending entries idle this long are claimed again with XAUTOCLAIM (retries of "
        "failed entries, entries a lost owner left behind).",
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        description="An entry whose processing failed on its this-many-th delivery (or delivered "
        "more often) goes to the worker dead-letter stream.",
    )
    lease_ttl_ms: int = Field(
        10_000,
        ge=300,
        description="Shard lease time to live: a crashed worker's shards are free after this; "
        "leases and membership are renewed every third of it.",
    )
    dedup_ttl_s: float = Field(
        3600.0, gt=0, description="How long an emitted anomaly's dedup key stops a re-emission."
    )
    detectors: DetectorSettings = Field(
        default_factory=DetectorSettings, description="Detector configuration."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics, /healthz, /readyz.")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Port of the worker's HTTP server.")
    shutdown_grace_s: float = Field(10.0, gt=0, description="Time allowed to finish on SIGTERM.")


AssetClassName = Literal["motor", "pump", "press", "oven"]


class SimulatorSettings(Section):
    assets: int = Field(1000, gt=0, le=100_000, description="Virtual assets.")
    rate_hz: float = Field(1.0, gt=0, description="Messages per second per asset.")
    duration_s: float = Field(60.0, gt=0, description="Run time.")
    qos: Literal[0, 1] = Field(1, description="Publish QoS.")
    sites: int = Field(2, gt=0, description="Sites the assets are spread over.")
    lines: int = Field(4, gt=0, description="Lines per site.")
    assets_per_connection: int = Field(
        250, gt=0, description="Assets multiplexed over one MQTT connection."
    )
    max_in_flight: int = Field(
        1000, gt=0, description="Unacknowledged QoS 1 publishes per connection."
    )
    anomaly_rate: float = Field(
        0.001,
        ge=0,
        le=1,
        description="Chance per message of a one-sample out-of-range value (beside a scenario's "
        "injections).",
    )
    seed: int = Field(1, description="Random seed, so a run can be repeated exactly.")
    client_id_prefix: Name = Field("iotbridge-sim", description="Client id prefix per connection.")
    classes: dict[AssetClassName, Annotated[float, Field(ge=0)]] = Field(
        default_factory=_default_classes,
        min_length=1,
        description="Share of the fleet per asset class (motor, pump, press, oven); normalised.",
    )
    jitter: float = Field(
        0.1,
        ge=0,
        le=0.45,
        description="Random +/- fraction of the publish interval applied to each message's time.",
    )
    processes: int = Field(
        1, ge=1, le=64, description="Publishing processes the fleet is split over (one core each)."
    )
    connect_rate_per_s: float = Field(
        1000.0,
        gt=0,
        description="Connections opened per second over all processes: a connect storm costs the "
        "broker far more memory than the same connections opened at a steady rate.",
    )
    ack_timeout_s: float = Field(
        10.0, gt=0, description="After the run, how long to wait for outstanding PUBACKs."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics, /healthz, /readyz.")
    metrics_port: int = Field(
        9103, ge=0, le=65535, description="Port of the simulator's HTTP server."
    )

    @model_validator(mode="after")
    def _some_class(self) -> SimulatorSettings:
        if sum(self.classes.values()) <= 0:
            raise ValueError("classes: at least one share must be > 0")
        return self


class BrokerSettings(Section):
    host: str = Field("127.0.0.1", description="Listen address of the embedded broker.")
    port: int = Field(1883, ge=1, le=65535, description="Listen port of the embedded broker.")
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics, /healthz, /readyz.")
    metrics_port: int = Field(9104, ge=0, le=65535, description="Port of the broker's HTTP server.")


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["text", "json"] = Field("text", description="text or JSON lines.")


class Settings(BaseSettings):
    """The whole settings file; environment `IOTBRIDGE_<SECTION>__<KEY>` overrides it."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="IOTBRIDGE_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="The MQTT broker.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="The Redis server.")
    backoff: BackoffSettings = Field(
        default_factory=BackoffSettings, description="Reconnect backoff for MQTT and Redis."
    )
    bridge: BridgeSettings = Field(default_factory=BridgeSettings, description="The bridge.")
    worker: WorkerSettings = Field(default_factory=WorkerSettings, description="The workers.")
    simulator: SimulatorSettings = Field(
        default_factory=SimulatorSettings, description="The fleet simulator."
    )
    broker: BrokerSettings = Field(
        default_factory=BrokerSettings, description="The embedded broker."
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file (passed as init kwargs by config.loader).
        return (env_settings, init_settings)
