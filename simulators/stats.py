"""Publish outcomes of a run, shared by the publishing thread and every paho network thread.

Counts add up: sent = acked + failed after publish (rejected, unacked) + still outstanding.
Failures before publish (not_connected, queue_full, error) are never counted as sent.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from typing import Any

from observability.metrics import SimulatorMetrics

# Latencies kept for the report's quantiles: a uniform sample of at most this many (Algorithm R),
# so memory stays flat however long the run (100K msg/s for an hour is 360M acks).
RESERVOIR_SIZE = 100_000
# Failure kinds of messages that were sent: the broker refused them, or no ack came in time.
SETTLED_FAILURES = ("rejected", "unacked")


class PublishStats:
    """Thread-safe counters and ack latencies; also feeds the Prometheus metrics."""

    def __init__(self, metrics: SimulatorMetrics, reservoir_size: int = RESERVOIR_SIZE) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._reservoir_size = reservoir_size
        self._rng = random.Random(0)  # only picks which latencies to keep
        self._latencies: list[float] = []
        self._latency_count = 0
        self.sent = 0
        self.acked = 0
        self.anomalies = 0
        self.failed: dict[str, int] = {}
        # Called (from a paho thread) when a settled message leaves nothing outstanding. Unset
        # while publishing: the count touches zero after most acks then, which nobody waits for.
        self.on_idle: Callable[[], None] | None = None

    @property
    def outstanding(self) -> int:
        """Sent and not yet settled (acknowledged, rejected or given up as unacked)."""
        with self._lock:
            return self._outstanding()

    def _outstanding(self) -> int:  # the caller holds the lock
        settled_failures = sum(self.failed.get(kind, 0) for kind in SETTLED_FAILURES)
        return self.sent - self.acked - settled_failures

    def record_sent(self, anomaly: bool) -> None:
        with self._lock:
            self.sent += 1
            self.anomalies += anomaly
        self._metrics.sent.inc()

    def record_acked(self, latency_s: float | None) -> None:
        """An acknowledgement (QoS 1) or a write to the socket (QoS 0: latency None)."""
        with self._lock:
            self.acked += 1
            if latency_s is not None:
                self._keep_latency(latency_s)
            idle = self._outstanding() == 0
        self._metrics.acked.inc()
        if latency_s is not None:
            self._metrics.publish_latency.observe(latency_s)
        self._notify_idle(idle)

    def record_failed(self, kind: str, count: int = 1) -> None:
        if count <= 0:
            return
        with self._lock:
            self.failed[kind] = self.failed.get(kind, 0) + count
            idle = kind in SETTLED_FAILURES and self._outstanding() == 0
        self._metrics.failed.labels(kind=kind).inc(count)
        self._notify_idle(idle)

    def _notify_idle(self, idle: bool) -> None:
        on_idle = self.on_idle
        if idle and on_idle is not None:
            on_idle()

    def _keep_latency(self, latency_s: float) -> None:
        self._latency_count += 1
        if len(self._latencies) < self._reservoir_size:
            self._latencies.append(latency_s)
            return
        slot = self._rng.randrange(self._latency_count)
        if slot < self._reservoir_size:
            self._latencies[slot] = latency_s

    def latency_quantiles(self) -> dict[str, float | None]:
        """p50 and p99 of the publish-to-ack latency in seconds (nearest rank); None without acks."""
        with self._lock:
            ordered = sorted(self._latencies)
        if not ordered:
            return {"p50": None, "p99": None}

        def rank(q: float) -> float:
            return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 6)

        return {"p50": rank(0.50), "p99": rank(0.99)}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            failed = dict(sorted(self.failed.items()))
            return {
                "sent": self.sent,
                "acked": self.acked,
                "failed": sum(failed.values()),
                "failed_by_kind": failed,
                "anomalies_injected": self.anomalies,
            }
