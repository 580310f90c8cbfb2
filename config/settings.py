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


class ThresholdRule(Section):
    value: Name = Field(description="Value name in the payload's `values`.")
    min: float | None = Field(None, description="Flag values below this bound.")
    max: float | None = Field(None, description="Flag values above this bound.")
    severity: Literal["info", "warning", "critical"] = Field(
        "warning", description="Severity of the flag."
    )

    @model_validator(mode="after")
    def _some_bound(self) -> ThresholdRule:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError("min must be < max")
        return self


def _default_thresholds() -> list[ThresholdRule]:
    return [
        ThresholdRule(value="temperature", min=-20.0, max=90.0, severity="critical"),
        ThresholdRule(value="vibration", max=8.0),
    ]


class DetectorSettings(Section):
    threshold: list[ThresholdRule] = Field(
        default_factory=_default_thresholds, description="Static bounds per value name."
    )


class WorkerSettings(Section):
    group: Name = Field("workers", description="Consumer group name.")
    consumer: Name | None = Field(
        None, description="Consumer name; default host-pid, unique per process."
    )
    batch_size: int = Field(500, gt=0, description="Entries per XREADGROUP.")
    block_ms: int = Field(
        1000, gt=0, le=10_000, description="XREADGROUP BLOCK; short so shutdown is prompt."
    )
    detectors: DetectorSettings = Field(
        default_factory=DetectorSettings, description="Detector configuration."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics, /healthz, /readyz.")
    metrics_port: int = Field(9102, ge=0, le=65535, description="Port of the worker's HTTP server.")
    shutdown_grace_s: float = Field(10.0, gt=0, description="Time allowed to finish on SIGTERM.")


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
        0.001, ge=0, le=1, description="Chance per message of an out-of-range value."
    )
    seed: int = Field(1, description="Random seed, so a run can be repeated exactly.")
    client_id_prefix: Name = Field("iotbridge-sim", description="Client id prefix per connection.")
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics, /healthz, /readyz.")
    metrics_port: int = Field(
        9103, ge=0, le=65535, description="Port of the simulator's HTTP server."
    )


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
