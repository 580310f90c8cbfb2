"""The settings model: one Pydantic model for the whole YAML file (`config/settings.yaml`).

Every field has a default and a description; units are in the names. Unknown keys are errors.
Environment variables `IOTBRIDGE_<SECTION>__<KEY>` override the file (see `config.loader`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from config.bridge_settings import (
    BatchSettings,
    BridgeSettings,
    ClockSettings,
    ContractField,
    ContractSettings,
    RateLimitSettings,
    RetentionSettings,
    RouteSettings,
    SpoolSettings,
)
from config.detector_settings import (
    DetectorRule,
    DetectorSettings,
    DeviationRule,
    FlatlineRule,
    RateRule,
    SequenceGapRule,
    Severity,
    StalenessRule,
    ThresholdRule,
)
from config.gateway_settings import GatewaySettings
from config.sections import NAME_PATTERN, Name, Section
from config.sparkplug_settings import SparkplugSettings

# The whole model is importable from here; its sections live in the modules above.
__all__ = [
    "NAME_PATTERN", "AssetClassName", "BackoffSettings", "BatchSettings", "BridgeSettings",
    "BrokerSettings", "ClockSettings", "ContractField", "ContractSettings", "DetectorRule",
    "DetectorSettings", "DeviationRule", "FlatlineRule", "GatewaySettings", "HttpSettings", "HttpTlsSettings",
    "LoggingSettings", "MqttSettings", "Name", "RateLimitSettings", "RateRule", "RedisSettings",
    "RetentionSettings", "RouteSettings", "Section", "SequenceGapRule", "Settings", "Severity",
    "SimulatorSettings", "SparkplugSettings", "SpoolSettings", "StalenessRule", "ThresholdRule",
    "TlsSettings", "WorkerSettings",
]  # fmt: skip


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
        # At most the dedup ring (1,024 seqs per asset): a redelivery after a crash is then always
        # inside it, so it is recognised rather than written again as unverifiable.
        le=1024,
        description="MQTT 5 receive maximum: unacknowledged QoS 1 messages the broker may send "
        "(at most 1,024, the dedup window per asset).",
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


class DurabilitySettings(Section):
    replicas: int = Field(
        0,
        ge=0,
        le=16,
        description="Replicas that must confirm a write (WAIT, on the connection that wrote it) "
        "before the bridge acknowledges its messages or a worker counts its batch as done; 0: "
        "acknowledged once the master has it (a failover can lose the last writes).",
    )
    timeout_ms: int = Field(
        1000,
        ge=1,
        le=600_000,
        description="Longest wait for the replicas; a write they do not confirm in time is not "
        "acknowledged and is written again (dedup keeps one copy).",
    )
    fsync: bool = Field(
        False,
        description="Also wait until the master and the replicas have the write in their "
        "append-only file (WAITAOF, Redis 7.2+; refused at start by an older server).",
    )


class RedisSettings(Section):
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis address: redis://host:port/db (rediss:// TLS); with cluster, one or "
        "more seed nodes: redis://host1:port1,host2:port2/0.",
    )
    cluster: bool = Field(
        False,
        description="Redis Cluster: keys carry a hash tag per shard, each atomic step goes to "
        "the master of its slot, readers read across shards.",
    )
    durability: DurabilitySettings = Field(
        default_factory=DurabilitySettings, description="Replication required before an ack."
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
    tls: TlsSettings = Field(default_factory=TlsSettings, description="TLS for rediss:// URLs.")

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must look like redis://host:port/db")
        return value

    @model_validator(mode="after")
    def _cluster_url(self) -> RedisSettings:
        if "," in urlsplit(self.url).netloc and not self.cluster:
            raise ValueError("url names several nodes: set cluster: true, or name one Redis")
        if self.cluster:
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                raise ValueError("cluster needs redis:// or rediss:// seed nodes, not unix://")
            if parts.path.strip("/") not in ("", "0"):
                raise ValueError("a Redis Cluster has database 0 only: end the url with /0")
        return self

    def seeds(self) -> list[tuple[str, int]]:
        """The (host, port) of every node the url names (one, unless a cluster's seed list)."""
        netloc = urlsplit(self.url).netloc.rpartition("@")[2]
        seeds = []
        for node in netloc.split(","):
            if node.startswith("["):  # [IPv6]:port
                host, _, rest = node[1:].partition("]")
                port = rest.lstrip(":")
            else:
                host, _, port = node.partition(":")
            seeds.append((host or "127.0.0.1", int(port or 6379)))
        return seeds

    def node_url(self, host: str, port: int) -> str:
        """The url of one node of the cluster: the seed url's scheme, another address."""
        parts = urlsplit(self.url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{parts.scheme}://{userinfo}{at}{netloc}/0"

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> RedisSettings:
        # TLS files beside a plaintext URL would send the password in the clear while the file
        # reads as if the link were encrypted: refuse rather than ignore them.
        if self.tls != TlsSettings() and not self.tls_enabled:
            raise ValueError("tls is set but url is not rediss://: use rediss://host:port/db")
        return self

    @property
    def tls_enabled(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of redis-py's `Redis.from_url`, sync or asyncio: credentials,
        timeouts and, for rediss://, TLS. Every Redis client iotbridge builds starts from these."""
        options: dict[str, Any] = {
            "username": self.username,
            "password": self.password.get_secret_value() if self.password else None,
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.connect_timeout_s,
        }
        if self.tls_enabled:
            # Only the TLS connection class accepts ssl_* arguments; redis-py rejects them otherwise.
            tls = self.tls
            options |= {
                "ssl_ca_certs": tls.ca_file,
                "ssl_certfile": tls.cert_file,
                "ssl_keyfile": tls.key_file,
                "ssl_cert_reqs": "none" if tls.insecure_skip_verify else "required",
                "ssl_check_hostname": not tls.insecure_skip_verify,
            }
        return options


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


def _default_classes() -> dict[AssetClassName, float]:
    return {"motor": 0.4, "pump": 0.3, "press": 0.2, "oven": 0.1}


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
    max_outstanding: int = Field(
        50_000,
        gt=0,
        description="Unacknowledged QoS 1 publishes per process, over all its connections: with "
        "max_in_flight, what bounds the memory a slow broker costs.",
    )
    max_lag_s: float = Field(
        2.0,
        gt=0,
        description="A scheduled message not sent this long after it was due is skipped (counted "
        "as behind_schedule), never queued.",
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
    protocol: Literal["json", "sparkplug"] = Field(
        "json",
        description="json: the route's JSON payloads; sparkplug: Sparkplug B edge nodes, one per "
        "connection, each asset a device (simulators/sparkplug.py).",
    )
    sparkplug_group: Name = Field(
        "sim", description="Sparkplug group id of the simulated edge nodes (protocol sparkplug)."
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


class HttpTlsSettings(Section):
    cert_file: str | None = Field(
        None,
        description="Server certificate (PEM, intermediates after it); with key_file set the "
        "HTTP server speaks HTTPS only.",
    )
    key_file: str | None = Field(None, description="Private key of cert_file (PEM).")
    client_ca_file: str | None = Field(
        None,
        description="CA bundle for client certificates: when set, a client without a certificate "
        "it signed is refused (mutual TLS).",
    )

    @model_validator(mode="after")
    def _complete(self) -> HttpTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file and key_file")
        return self


class HttpSettings(Section):
    """Access to /metrics, /healthz and /readyz, the same for every process."""

    username: str | None = Field(
        None, description="User name that /metrics requires (HTTP basic auth) with password."
    )
    password: SecretStr | None = Field(
        None,
        description="Password of /metrics; set it with IOTBRIDGE_HTTP__PASSWORD, never in the file.",
    )
    tls: HttpTlsSettings = Field(
        default_factory=HttpTlsSettings, description="HTTPS for /metrics, /healthz and /readyz."
    )

    @model_validator(mode="after")
    def _credentials_together(self) -> HttpSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password must be set together")
        if self.username is not None and (not self.username or ":" in self.username):
            raise ValueError("username must be non-empty and without ':' (RFC 7617)")
        if self.password is not None and not self.password.get_secret_value():
            raise ValueError("password must not be empty")
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.password is not None


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
    http: HttpSettings = Field(
        default_factory=HttpSettings,
        description="Basic auth and TLS of every process's /metrics, /healthz and /readyz.",
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")
    sparkplug: SparkplugSettings = Field(
        default_factory=SparkplugSettings, description="The Sparkplug B host application."
    )
    gateway: GatewaySettings = Field(
        default_factory=GatewaySettings, description="The HTTP ingest gateway and admin API."
    )

    @model_validator(mode="after")
    def _sparkplug_route_free(self) -> Settings:
        """The host's entries take the route `sparkplug`; a bridge route may not share it, nor
        subscribe to spBv1.0/ (its JSON contracts would dead-letter every Sparkplug message)."""
        if not self.sparkplug.enabled:
            return self
        for index, route in enumerate(self.bridge.routes):
            if route.name == "sparkplug":
                raise ValueError(
                    f"sparkplug.enabled: bridge.routes.{index}.name 'sparkplug' is the Sparkplug "
                    "host's route; rename the route"
                )
            if route.topic.split("/")[0] == "spBv1.0":
                raise ValueError(
                    f"sparkplug.enabled: bridge.routes.{index}.topic {route.topic!r} takes "
                    "Sparkplug topics, which the Sparkplug host reads; remove the route"
                )
        return self

    @property
    def telemetry_routes(self) -> list[str]:
        """Every route with telemetry streams: the bridge's, and `sparkplug` when enabled."""
        names = [route.name for route in self.bridge.routes]
        return [*names, "sparkplug"] if self.sparkplug.enabled else names

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
