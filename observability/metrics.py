"""Metric definitions: the one module that names metrics. Every process declares its set here.

Names start with `iotbridge_`, use base units (seconds, bytes) and counters end in `_total`.
Labels are bounded: route (configured names), reason (a fixed set), detector, severity, target.
Each set is built against an injectable registry, so tests use a fresh one.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    Metric,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

# `_created` series double every counter's series count and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

# Latency buckets from 0.5 ms to 10 s: a batch write is about a millisecond, an outage is seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

# The `route` label of a message that matched no route.
UNROUTED = "unrouted"


def _version() -> str:
    try:
        return version("iotbridge")
    except PackageNotFoundError:
        return "unknown"


def build_info(registry: CollectorRegistry, component: str) -> None:
    """`iotbridge_build_info{version, component} 1`."""
    Info("iotbridge_build", "Build of the running process.", registry=registry).info(
        {"version": _version(), "component": component}
    )


class Tally(Collector):
    """A labelled counter for per-message counts, without prometheus_client's lock per `inc`:
    the event loop is its only writer and the only reader (the /metrics server runs on the same
    loop). Measured: the locked counters and histograms took 18% of the bridge's CPU."""

    def __init__(self, name: str, doc: str, labels: list[str], registry: CollectorRegistry) -> None:
        self._name, self._doc, self._labels = name.removesuffix("_total"), doc, labels
        self.values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=self._labels)
        for labels, value in self.values.items():
            family.add_metric(list(labels), value)
        yield family


class BatchHistogram(Collector):
    """A histogram fed a batch at a time, on the event loop (see Tally)."""

    def __init__(
        self, name: str, doc: str, buckets: tuple[float, ...], registry: CollectorRegistry
    ) -> None:
        self._name, self._doc = name, doc
        self._bounds = list(buckets)
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self._bounds, self._counts
        total = 0.0
        for value in values:
            counts[bisect_left(bounds, value)] += 1
            total += value
        self._sum += total

    def collect(self) -> Iterator[Metric]:
        yield histogram_family(self._name, self._doc, self._bounds, self._counts, self._sum)


def histogram_family(
    name: str, doc: str, bounds: Sequence[float], counts: Sequence[int], sum_value: float
) -> HistogramMetricFamily:
    """A histogram from counts per bucket (`counts[i]`: values in bucket i, the last +Inf)."""
    cumulative, total = [], 0
    for bound, count in zip([*map(str, bounds), "+Inf"], counts, strict=True):
        total += count
        cumulative.append((bound, float(total)))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=sum_value)


def readiness_gauge(
    registry: CollectorRegistry, component: str, readiness: Callable[[], tuple[bool, str]]
) -> None:
    """`iotbridge_ready{component}`: 1 while /readyz would answer 200, read at scrape time."""
    gauge = Gauge(
        "iotbridge_ready",
        "1 while the process can do its job (what /readyz answers).",
        ["component"],
        registry=registry,
    )
    gauge.labels(component).set_function(lambda: float(readiness()[0]))


class BridgeMetrics:
    """Counters add up: received = forwarded + rejected + duplicates + skipped + dropped
    (+ in flight)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        build_info(registry, "bridge")
        self.received = Tally(
            "iotbridge_bridge_messages_received_total",
            "Messages received from MQTT.",
            ["route"],
            registry,
        )
        self.forwarded = Counter(
            "iotbridge_bridge_messages_forwarded_total",
            "Messages written to a telemetry stream and acknowledged.",
            ["route"],
            registry=registry,
        )
        self.rejected = Counter(
            "iotbridge_bridge_messages_rejected_total",
            "Messages written to the dead-letter stream and acknowledged.",
            ["route", "reason"],
            registry=registry,
        )
        self.duplicates = Counter(
            "iotbridge_bridge_messages_duplicate_total",
            "Redelivered messages recognised by (asset, seq) and acknowledged without a write.",
            ["route"],
            registry=registry,
        )
        self.unverified = Counter(
            "iotbridge_bridge_dedup_unverified_total",
            "Messages written although older than the dedup window (1,024 seqs below the asset's "
            "highest), so not checked for redelivery; also counted as forwarded.",
            ["route"],
            registry=registry,
        )
        self.skipped = Counter(
            "iotbridge_bridge_messages_skipped_total",
            "Retained messages acknowledged without a write (bridge.retained: skip).",
            ["route"],
            registry=registry,
        )
        self.dropped = Counter(
            "iotbridge_bridge_messages_dropped_total",
            "QoS 0 messages dropped while the sink was unavailable and in-flight was full.",
            ["route"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "iotbridge_bridge_batch_size_messages",
            "Messages per Redis round trip.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.xadd_duration = Histogram(
            "iotbridge_bridge_xadd_duration_seconds",
            "Duration of one batched write to Redis.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.receive_to_ack = BatchHistogram(
            "iotbridge_bridge_receive_to_ack_seconds",
            "From a message's arrival at the bridge to its acknowledgement after the write.",
            LATENCY_BUCKETS,
            registry,
        )
        self.publish_to_write = BatchHistogram(
            "iotbridge_bridge_publish_to_write_seconds",
            "From the device's timestamp to the write that stored the message (includes clock "
            "skew between device and bridge).",
            LATENCY_BUCKETS,
            registry,
        )
        self.in_flight = Gauge(
            "iotbridge_bridge_in_flight_messages",
            "Messages received and not yet acknowledged.",
            registry=registry,
        )
        self.oldest_unacked_age = Gauge(
            "iotbridge_bridge_oldest_unacked_age_seconds",
            "Age of the oldest message received and not yet acknowledged.",
            registry=registry,
        )
        self.connected = Gauge(
            "iotbridge_bridge_connected",
            "1 while the connection to the target is up.",
            ["target"],
            registry=registry,
        )
        self.session_present = Gauge(
            "iotbridge_bridge_mqtt_session_present",
            "1 when the broker resumed the bridge's persistent session.",
            registry=registry,
        )
        self.reconnects = Counter(
            "iotbridge_bridge_reconnects_total",
            "Connection attempts after a failure, by target.",
            ["target"],
            registry=registry,
        )
        self.spool_bytes = Gauge(
            "iotbridge_bridge_spool_bytes",
            "Bytes in the on-disk spool.",
            registry=registry,
        )
        self.spool_entries = Gauge(
            "iotbridge_bridge_spool_entries",
            "Messages in the on-disk spool.",
            registry=registry,
        )
        self.spool_max_bytes = Gauge(
            "iotbridge_bridge_spool_max_bytes",
            "The spool's bound (bridge.spool.max_bytes).",
            registry=registry,
        )
        self.spool_full = Counter(
            "iotbridge_bridge_spool_full_total",
            "Batches that found the spool full, so their acks were held.",
            registry=registry,
        )
        self.stream_entries = Gauge(
            "iotbridge_bridge_stream_entries",
            "Entries in a telemetry stream.",
            ["route"],
            registry=registry,
        )
        self.stream_fill_ratio = Gauge(
            "iotbridge_bridge_stream_fill_ratio",
            "Entries in a telemetry stream over its retention.max_entries.",
            ["route"],
            registry=registry,
        )
        self.write_errors = Counter(
            "iotbridge_bridge_write_errors_total",
            "Failed batch writes to Redis, by kind.",
            ["kind"],
            registry=registry,
        )
        # Session partitions (bridge.partitions); the label is a configured partition name.
        self.partitions_owned = Gauge(
            "iotbridge_bridge_partitions_owned",
            "Session partitions this bridge holds the lease of.",
            registry=registry,
        )
        self.lease_changes = Counter(
            "iotbridge_bridge_partition_lease_changes_total",
            "Partition leases acquired, released (handed over, shut down) and lost (lapsed).",
            ["change"],
            registry=registry,
        )
        self.partition_in_flight = Gauge(
            "iotbridge_bridge_partition_in_flight_messages",
            "Messages of a partition received and not yet acknowledged.",
            ["partition"],
            registry=registry,
        )
        self.acks_fenced = Counter(
            "iotbridge_bridge_acks_fenced_total",
            "Messages not acknowledged because their partition's lease had lapsed (the new "
            "owner receives them again from the broker).",
            registry=registry,
        )


class SparkplugMetrics:
    """The Sparkplug B host (`bridge.sparkplug.session`): messages by type, what became entries,
    births, deaths, sequence gaps, rebirth requests and the metrics now stale."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "iotbridge_sparkplug_messages_received_total",
            "Sparkplug messages received, by message type (NBIRTH ... DDEATH, STATE, invalid).",
            ["type"],
            registry=registry,
        )
        self.entries = Counter(
            "iotbridge_sparkplug_entries_written_total",
            "Telemetry entries written to the sparkplug route's streams (deaths included).",
            registry=registry,
        )
        self.duplicates = Counter(
            "iotbridge_sparkplug_entries_duplicate_total",
            "Entries the dedup recognised as written already.",
            registry=registry,
        )
        self.rejected = Counter(
            "iotbridge_sparkplug_messages_rejected_total",
            "Messages or metrics written to the dead-letter stream, by reason.",
            ["reason"],
            registry=registry,
        )
        self.dropped = Counter(
            "iotbridge_sparkplug_messages_dropped_total",
            "QoS 0 messages dropped because the host's queue was full (Redis unavailable).",
            registry=registry,
        )
        self.births = Counter(
            "iotbridge_sparkplug_births_total",
            "NBIRTH (level node) and DBIRTH (level device) accepted.",
            ["level"],
            registry=registry,
        )
        self.deaths = Counter(
            "iotbridge_sparkplug_deaths_total",
            "Edge nodes (NDEATH with the session's bdSeq) and devices (DDEATH or their node's "
            "death) marked offline, by level.",
            ["level"],
            registry=registry,
        )
        self.rebirth_requests = Counter(
            "iotbridge_sparkplug_rebirth_requests_total",
            "Rebirth requests (NCMD Node Control/Rebirth) published.",
            registry=registry,
        )
        self.rebirths_suppressed = Counter(
            "iotbridge_sparkplug_rebirth_requests_suppressed_total",
            "Rebirth requests not sent: one went to the node within rebirth_min_interval_s.",
            registry=registry,
        )
        self.gaps = Counter(
            "iotbridge_sparkplug_seq_gaps_total",
            "Sequence numbers never received within the reorder timeout.",
            registry=registry,
        )
        self.unknown = Counter(
            "iotbridge_sparkplug_unknown_total",
            "DATA before its birth or with an alias no birth declared: nothing written.",
            registry=registry,
        )
        self.unplaced = Counter(
            "iotbridge_sparkplug_unplaced_total",
            "Messages behind the expected seq, or repeated: nothing written.",
            registry=registry,
        )
        self.online = Gauge(
            "iotbridge_sparkplug_online",
            "Edge nodes (level node) and devices (level device) online.",
            ["level"],
            registry=registry,
        )
        self.stale_metrics = Gauge(
            "iotbridge_sparkplug_stale_metrics",
            "Metrics of offline edge nodes and devices (stale since their death).",
            registry=registry,
        )
        self.connected = Gauge(
            "iotbridge_sparkplug_connected",
            "1 while the host's MQTT connection is up and its STATE birth published.",
            registry=registry,
        )
        self.reconnects = Counter(
            "iotbridge_sparkplug_reconnects_total",
            "Connection attempts of the host after a failure, by target (mqtt, redis).",
            ["target"],
            registry=registry,
        )
        for level in ("node", "device"):
            self.births.labels(level)
            self.deaths.labels(level)
            self.online.labels(level)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        build_info(registry, "worker")
        self.processed = Counter(
            "iotbridge_worker_entries_processed_total",
            "Entries run through the detectors.",
            ["route"],
            registry=registry,
        )
        self.acked = Counter(
            "iotbridge_worker_entries_acked_total",
            "Entries acknowledged after their outputs.",
            ["route"],
            registry=registry,
        )
        self.anomalies = Counter(
            "iotbridge_worker_anomalies_total",
            "Anomaly events written.",
            ["route", "detector", "severity"],
            registry=registry,
        )
        self.lag = Gauge(
            "iotbridge_worker_consumer_lag_entries",
            "Entries of the route's streams not yet delivered to the group (XINFO GROUPS; every "
            "worker of the group reports the same value: aggregate with max).",
            ["route", "group"],
            registry=registry,
        )
        self.pending = Gauge(
            "iotbridge_worker_pending_entries",
            "Entries delivered to the group and not acked (XINFO GROUPS; the same on every worker "
            "of the group).",
            ["route", "group"],
            registry=registry,
        )
        self.batch_duration = Histogram(
            "iotbridge_worker_batch_duration_seconds",
            "Read, detect, write and ack of one batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.open_anomalies = Gauge(
            "iotbridge_worker_open_anomalies",
            "Anomalies started and not yet ended, in the shards this worker owns.",
            ["route", "detector"],
            registry=registry,
        )
        self.claimed = Counter(
            "iotbridge_worker_entries_claimed_total",
            "Pending entries claimed with XAUTOCLAIM (retries, and a lost owner's entries).",
            ["route"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "iotbridge_worker_entries_dead_lettered_total",
            "Entries written to the worker dead-letter stream and acked, by reason "
            "(malformed: never valid; poison: processing failed max_deliveries times).",
            ["route", "reason"],
            registry=registry,
        )
        self.shards_owned = Gauge(
            "iotbridge_worker_shards_owned",
            "Telemetry streams (route and shard) whose lease this worker holds.",
            registry=registry,
        )
        self.shard_changes = Counter(
            "iotbridge_worker_shard_changes_total",
            "Shard leases acquired, released (balance, shutdown) and lost (taken or expired).",
            ["change"],
            registry=registry,
        )
        self.checkpoint_age = Gauge(
            "iotbridge_worker_checkpoint_age_seconds",
            "Age of the oldest checkpoint among owned shards with entries waiting (0 when caught up).",
            registry=registry,
        )
        self.publish_to_flag = Histogram(
            "iotbridge_worker_publish_to_flag_seconds",
            "From an entry's device timestamp to the write of the anomaly it caused (includes clock "
            "skew between device and worker; timer-driven staleness events are not counted).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.state_assets = Gauge(
            "iotbridge_worker_state_assets",
            "Assets with detector state in the shards this worker owns.",
            registry=registry,
        )
        self.connected = Gauge(
            "iotbridge_worker_connected",
            "1 while the connection to the target is up.",
            ["target"],
            registry=registry,
        )
        self.reconnects = Counter(
            "iotbridge_worker_reconnects_total",
            "Connection attempts after a failure, by target.",
            ["target"],
            registry=registry,
        )


class SimulatorMetrics(Collector):
    """The simulator's metrics, read at scrape time from plain numbers the app sets from its
    processes' progress reports (cumulative, twice a second): the publishing threads never touch
    a metric, and the counts of several processes are summed once, here."""

    def __init__(self, registry: CollectorRegistry) -> None:
        build_info(registry, "simulator")
        self.sent = 0
        self.acked = 0
        self.failed: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.anomalies: dict[str, int] = {}
        self.connections = 0
        self.assets = 0
        self.processes = 0
        self.outstanding = 0
        self.target_rate = 0.0
        self.latency_buckets: list[int] = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "iotbridge_simulator_messages_sent", "Messages handed to the MQTT client.", self.sent
        )
        yield CounterMetricFamily(
            "iotbridge_simulator_messages_acked",
            "QoS 1 messages acknowledged by the broker (QoS 0: written to the socket).",
            self.acked,
        )
        yield _labelled(
            "iotbridge_simulator_messages_failed", "Publishes that failed, by kind.", self.failed
        )
        yield _labelled(
            "iotbridge_simulator_faults_injected",
            "Deliberately faulty messages sent (malformed, duplicate, restart, ...), by kind.",
            self.faults,
        )
        yield _labelled(
            "iotbridge_simulator_anomalies_injected",
            "Injected anomalies started (spike, drift, stuck, dropout, out_of_range), by kind.",
            self.anomalies,
        )
        for name, doc, value in (
            ("connections", "MQTT connections currently up.", self.connections),
            ("assets", "Virtual assets in the fleet.", self.assets),
            ("processes", "Publishing processes.", self.processes),
            ("outstanding_messages", "Sent, not yet acknowledged.", self.outstanding),
            ("target_rate_messages_per_second", "Scheduled rate of the whole fleet.",
             self.target_rate),
        ):  # fmt: skip
            yield GaugeMetricFamily(f"iotbridge_simulator_{name}", doc, value=value)
        yield histogram_family(
            "iotbridge_simulator_publish_ack_seconds",
            "QoS 1 publish to PUBACK round trip.",
            LATENCY_BUCKETS,
            self.latency_buckets,
            self.latency_sum,
        )


def _labelled(name: str, doc: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["kind"])
    for kind, count in sorted(counts.items()):
        family.add_metric([kind], count)
    return family


class BrokerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        build_info(registry, "broker")
        self.up = Gauge(
            "iotbridge_broker_listening",
            "1 while the embedded broker accepts connections.",
            registry=registry,
        )
        self.clients_connected = Gauge(
            "iotbridge_broker_clients_connected",
            "MQTT clients currently connected.",
            registry=registry,
        )
        self.sessions = Gauge(
            "iotbridge_broker_sessions",
            "Sessions the broker holds: connected clients and disconnected persistent sessions.",
            registry=registry,
        )
        self.queued_messages = Gauge(
            "iotbridge_broker_queued_messages",
            "QoS 1 messages held for disconnected persistent sessions.",
            registry=registry,
        )


class GatewayMetrics:
    """Counters add up, per ingest request: requests = stored + duplicate + rejected + refused
    (refused: every status but 200 and 422; an NDJSON request counts each line's outcome)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        build_info(registry, "gateway")
        self.requests = Counter(
            "iotbridge_gateway_requests_total",
            "HTTP requests answered, by endpoint (ingest, bulk, admin, other) and status code.",
            ["endpoint", "status"],
            registry=registry,
        )
        self.messages = Counter(
            "iotbridge_gateway_messages_total",
            "Messages received over HTTP by outcome: stored (a telemetry entry), duplicate "
            "(recognised by the dedup, not stored again), rejected (dead-lettered).",
            ["route", "outcome"],
            registry=registry,
        )
        self.rejected = Counter(
            "iotbridge_gateway_messages_rejected_total",
            "Messages dead-lettered by the gateway, by reason.",
            ["route", "reason"],
            registry=registry,
        )
        self.duration = Histogram(
            "iotbridge_gateway_request_duration_seconds",
            "Time from a request's arrival to its answer, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "iotbridge_gateway_batch_size",
            "Messages per group-commit write to Redis.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.write_duration = Histogram(
            "iotbridge_gateway_write_duration_seconds",
            "Duration of one group-commit write (EVALSHA round trip).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.pending = Gauge(
            "iotbridge_gateway_pending_messages",
            "Messages waiting for their group-commit write (bounded by gateway.max_pending).",
            registry=registry,
        )
        self.write_errors = Counter(
            "iotbridge_gateway_write_errors_total",
            "Group-commit writes that failed (Redis away or too slow): their requests got 503.",
            registry=registry,
        )
        self.auth_failures = Counter(
            "iotbridge_gateway_auth_failures_total",
            "Requests refused for their token: 401 (missing or unknown) or 403 (wrong asset).",
            ["status"],
            registry=registry,
        )
        self.connected = Gauge(
            "iotbridge_gateway_redis_connected",
            "1 while the last write to Redis succeeded.",
            registry=registry,
        )
