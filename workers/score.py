"""Scoring: the anomaly stream against the simulator's ground truth.

For each anomaly kind the simulator injects (spike, drift, stuck, dropout, out_of_range):
- recall: injected events with at least one flag, from any detector, on the same asset (and value)
  inside the event's window, stretched by the kind's grace (a drift is flagged once it has drifted
  far enough, a dropout once the asset has been silent long enough);
- precision: of the flags that match this kind's events or come from the detectors that answer
  this kind without matching any event, the share that match; a flag during a deliberate fault on
  the same asset (a restart, out-of-order or duplicate messages, a skewed clock) is excused;
- detection latency: first matching flag's write time minus the event's first sample time;
- publish-to-flag: for every matching flag raised by a sample, its write time (the anomaly entry's
  id) minus the device time of that sample (staleness is raised by a timer, not a sample).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.record import entry_ms

# Detectors that answer each kind: their flags count towards that kind's precision.
DETECTORS = {
    "spike": {"threshold", "rate", "deviation"},
    "out_of_range": {"threshold"},
    "drift": {"deviation", "threshold"},
    "stuck": {"flatline"},
    "dropout": {"staleness", "sequence_gap"},
}
# Seconds after an event's last sample in which a flag still belongs to it.
GRACE_S = {"spike": 10.0, "out_of_range": 10.0, "stuck": 15.0, "drift": 60.0, "dropout": 120.0}
# Value-less detectors: a flag about the asset as a whole.
ASSET_WIDE = {"staleness", "sequence_gap"}
FAULT_EXCUSE_S = 30.0


@dataclass(frozen=True, slots=True)
class Truth:
    kind: str
    asset: str
    value: str | None
    start: float
    end: float
    category: str


@dataclass(frozen=True, slots=True)
class Flag:
    asset: str
    detector: str
    value: str | None
    ts: float  # device time of the sample that raised it
    written: float  # epoch seconds, from the anomaly entry's id


def read_truth(path: Path) -> list[Truth]:
    truths = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else None
        if record is None or record.get("start") is None:
            continue  # a window with no message in it (never reached)
        truths.append(Truth(record["kind"], record["asset"], record.get("value"), float(record["start"]),
                            float(record.get("end") or record["start"]), record.get("category", "anomaly")))  # fmt: skip
    return truths


def flags_from(entries: Iterable[tuple[str, dict[str, str]]]) -> Iterator[Flag]:
    """`start` events from anomaly stream entries (id, fields)."""
    for entry_id, fields in entries:
        if fields.get("event", "start") != "start":
            continue
        value = fields.get("value_name") or None
        yield Flag(fields["asset"], fields["detector"], value, float(fields["ts"]),
                   entry_ms(entry_id) / 1000)  # fmt: skip


def _matches(flag: Flag, truth: Truth) -> bool:
    if flag.asset != truth.asset or truth.kind not in GRACE_S:
        return False
    if flag.detector not in ASSET_WIDE and truth.value is not None and flag.value != truth.value:
        return False
    return truth.start - 2.0 <= flag.ts <= truth.end + GRACE_S[truth.kind]


def _excused(flag: Flag, faults: list[Truth]) -> bool:
    return any(
        f.asset == flag.asset and f.start - 2.0 <= flag.ts <= f.end + FAULT_EXCUSE_S for f in faults
    )


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 4)


def score(truths: list[Truth], flags: list[Flag]) -> dict[str, Any]:
    """Per kind: events, detected, recall, flags, false flags, precision, latencies."""
    anomalies = [t for t in truths if t.category == "anomaly"]
    faults = [t for t in truths if t.category != "anomaly"]
    matched: dict[int, list[Flag]] = {
        i: [f for f in flags if _matches(f, t)] for i, t in enumerate(anomalies)
    }
    matching_flags = {id(f) for found in matched.values() for f in found}
    false_flags = [f for f in flags if id(f) not in matching_flags and not _excused(f, faults)]
    report: dict[str, Any] = {}
    for kind, detectors in DETECTORS.items():
        events = [i for i, t in enumerate(anomalies) if t.kind == kind]
        if not events:
            continue
        detected = [i for i in events if matched[i]]
        good = {id(f) for i in events for f in matched[i]}
        wrong = [f for f in false_flags if f.detector in detectors]
        latency = [min(f.written for f in matched[i]) - anomalies[i].start for i in detected]
        report[kind] = {
            "events": len(events),
            "detected": len(detected),
            "recall": round(len(detected) / len(events), 4),
            "flags": len(good),
            "false_flags": len(wrong),
            "precision": round(len(good) / (len(good) + len(wrong)), 4) if good or wrong else None,
            "detection_latency_s": {
                "p50": _percentile(latency, 0.5),
                "p99": _percentile(latency, 0.99),
            },
        }
    publish_to_flag = [
        f.written - f.ts for found in matched.values() for f in found if f.detector != "staleness"
    ]
    report["publish_to_flag_s"] = {
        "p50": _percentile(publish_to_flag, 0.5),
        "p99": _percentile(publish_to_flag, 0.99),
    }
    report["false_flags_total"] = len(false_flags)
    report["flags_total"] = len(flags)
    return report
