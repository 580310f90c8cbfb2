"""The anomaly record contract: how one detector event is laid out in the anomaly stream.

An anomaly entry has the fields `event` (`start` or `ended`), `asset`, `route`, `detector`,
`value_name`, `value`, `bound` (the bound that was crossed), `ts` (device time of the sample, epoch
seconds, exactly as the bridge wrote it), `source_id` (the telemetry entry that caused the event)
and `severity`. `source_id` ties every event to one input entry, so a reader can tell a redelivered
duplicate from a new flag.
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
    ts: str
    source_id: str
    severity: str

    def to_fields(self) -> dict[str, str]:
        """The stream entry fields of this event."""
        return {
            "event": self.event.value,
            "asset": self.asset,
            "route": self.route,
            "detector": self.detector,
            "value_name": self.value_name,
            "value": format_number(self.value),
            "bound": format_number(self.bound),
            "ts": self.ts,
            "source_id": self.source_id,
            "severity": self.severity,
        }
