"""Publish outcomes of one engine (one thread: no locks), and their sum over processes.

Counts add up: sent = acked + failed after publish (rejected, unacked) + outstanding, and
sent - extras_sent + skipped = scheduled: every scheduled message is either handed to the
connection or skipped for a reason (`skipped`). Skips for behind_schedule, not_connected and error
are failures too (`failed`, and the `iotbridge_simulator_messages_failed_total{kind}` metric); a stop
and an injected dropout (silenced) are the run's own doing. An extra (a fault's duplicate or bad
copy) that cannot be sent is a failure, not a skip: it was never scheduled.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any

from observability.metrics import LATENCY_BUCKETS

# Latencies kept for the report's quantiles: a uniform sample of at most this many per engine
# (Algorithm R), so memory stays flat however long the run.
RESERVOIR_SIZE = 50_000
# Failure kinds of messages that were sent: the broker refused them, or no ack came in time.
SETTLED_FAILURES = ("rejected", "unacked")
# Skips of scheduled messages that are failures: the simulator could not keep its schedule.
SKIP_FAILURES = ("behind_schedule", "not_connected", "error")


class PublishStats:
    """Counters, a latency reservoir and histogram buckets, written by the engine thread only."""

    def __init__(self, reservoir_size: int = RESERVOIR_SIZE, seed: int = 0) -> None:
        self._reservoir_size = reservoir_size
        self._rng = random.Random(seed)  # only picks which latencies to keep
        self.latencies: list[float] = []
        self.latency_count = 0
        self.latency_sum = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sent = 0
        self.acked = 0
        self.failed: dict[str, int] = {}
        self.faults: dict[str, int] = {}
        self.anomalies: dict[str, int] = {}
        self.skipped: dict[str, int] = {}  # scheduled messages not sent, by reason
        self.extras_sent = 0  # sent beyond the schedule: a fault's duplicate or bad copy

    @property
    def outstanding(self) -> int:
        """Sent and not yet settled (acknowledged, rejected or given up as unacked)."""
        settled = sum(self.failed.get(kind, 0) for kind in SETTLED_FAILURES)
        return self.sent - self.acked - settled

    def fail(self, kind: str, count: int = 1) -> None:
        if count > 0:
            self.failed[kind] = self.failed.get(kind, 0) + count

    def skip(self, reason: str, count: int = 1) -> None:
        """`count` scheduled messages not sent, for `reason`."""
        if count > 0:
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            if reason in SKIP_FAILURES:
                self.fail(reason, count)

    def fault(self, kind: str) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + 1

    def observe(self, latency_s: float) -> None:
        self.latency_count += 1
        self.latency_sum += latency_s
        self.buckets[bisect_left(LATENCY_BUCKETS, latency_s)] += 1
        if len(self.latencies) < self._reservoir_size:
            self.latencies.append(latency_s)
            return
        slot = self._rng.randrange(self.latency_count)
        if slot < self._reservoir_size:
            self.latencies[slot] = latency_s

    def snapshot(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "failed_by_kind": dict(self.failed),
            "faults": dict(self.faults),
            "anomalies": dict(self.anomalies),
            "silenced": self.skipped.get("silenced", 0),
            "skipped": dict(self.skipped),
            "extras_sent": self.extras_sent,
            "latency_buckets": list(self.buckets),
            "latency_sum": self.latency_sum,
        }


def quantiles(latencies: Iterable[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max of the publish-to-ack latency in seconds (nearest rank)."""
    ordered = sorted(latencies)
    if not ordered:
        return {"p50": None, "p90": None, "p99": None, "max": None}

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 6)

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": round(ordered[-1], 6)}


def add_counts(into: dict[str, int], counts: Mapping[str, int]) -> None:
    for kind, count in counts.items():
        into[kind] = into.get(kind, 0) + count


class Totals:
    """The latest snapshot of every engine, summed on demand (the app's one view of the run)."""

    def __init__(self) -> None:
        self.shards: dict[int, dict[str, Any]] = {}

    def update(self, shard: int, snapshot: Mapping[str, Any]) -> None:
        self.shards[shard] = dict(snapshot)

    def total(self, name: str) -> int:
        return sum(int(s.get(name, 0)) for s in self.shards.values())

    def kinds(self, name: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards.values():
            add_counts(out, s.get(name, {}))
        return dict(sorted(out.items()))

    def buckets(self) -> tuple[list[int], float]:
        counts = [0] * (len(LATENCY_BUCKETS) + 1)
        total = 0.0
        for s in self.shards.values():
            for i, count in enumerate(s.get("latency_buckets", ())):
                counts[i] += count
            total += float(s.get("latency_sum", 0.0))
        return counts, total

    @property
    def failed(self) -> int:
        return sum(self.kinds("failed_by_kind").values())

    @property
    def outstanding(self) -> int:
        settled = sum(self.kinds("failed_by_kind").get(k, 0) for k in SETTLED_FAILURES)
        return self.total("sent") - self.total("acked") - settled
