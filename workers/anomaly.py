"""The anomaly record contract: how one detector event is laid out in the anomaly stream.

An anomaly entry has the fields `event` (`start` or `ended`), `asset`, `route`, `detector`,
`value_name` (empty for detectors of the whole asset: staleness, sequence_gap), `value`, `bound` (the
limit the detector compares with), `score` (what it compared: the value itself, |z|, dv/dt,
unchanged samples or seconds, silent seconds, lost samples), `ts` (device time of the sample, epoch
seconds, as the bridge wrote it), `stream` and `source_id` (the telemetry entry that caused the
event) and `severity`. `stream` and `source_id` tie every event to one input entry, so a reader can
tell a redelivered duplicate from a new flag; the worker also writes each event at most once
(see `workers.outputs`). A dashboard shows open anomalies as `start`s without a later `ended` for
the same (asset, route, detector, value_name).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Event(StrEnum):
    """Whether an anomaly begins or ends with this sample."""

    START = "start"
    ENDED = "ended"


def format_number(value: float) -> str:
    """`repr` is the shortest text that reads back as the same float, so values round-trip."""
    return repr(float(value))


@dataclass(frozen=True, slots=True)
class AnomalyEvent:
    event: Event
    asset: str
    route: str
    detector: str
    value_name: str
    value: float
    bound: float
    score: float
    ts: str
    source_id: str
    severity: str

    def to_fields(self, stream: str) -> dict[str, str]:
        """The stream entry fields of this event; `stream` holds the source entry."""
        return {
            "event": self.event.value,
            "asset": self.asset,
            "route": self.route,
            "detector": self.detector,
            "value_name": self.value_name,
            "value": format_number(self.value),
            "bound": format_number(self.bound),
            "score": format_number(self.score),
            "ts": self.ts,
            "stream": stream,
            "source_id": self.source_id,
            "severity": self.severity,
        }
