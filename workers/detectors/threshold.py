"""Static bounds per value name (`worker.detectors.threshold`).

Per asset and rule: the first sample outside [min, max] emits `start`; samples that stay outside
emit nothing, so a value hovering above a bound is one anomaly, not one per sample; the first sample
back inside emits `ended`. A jump from above max straight to below min ends the first anomaly and
starts another, because the crossed bound, and so the cause, changed. A bound is inside the range.
Samples without the rule's value leave its state alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from config.settings import ThresholdRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors import Sample

NAME = "threshold"


def crossed_bound(rule: ThresholdRule, value: float) -> float | None:
    """The bound `value` lies beyond, or None when it is within the rule's range."""
    if rule.max is not None and value > rule.max:
        return rule.max
    if rule.min is not None and value < rule.min:
        return rule.min
    return None


class ThresholdDetector:
    """Pure state machine: feed samples, get events. State is only kept for values out of range,
    so memory grows with the anomalies in progress, not with the fleet."""

    def __init__(self, rules: Sequence[ThresholdRule]) -> None:
        self._rules = tuple(rules)
        # (asset, rule index) -> the bound its value is beyond.
        self._crossed: dict[tuple[str, int], float] = {}
        self._saved: dict[tuple[str, int], float] = {}

    @property
    def name(self) -> str:
        return NAME

    @property
    def active(self) -> int:
        """Anomalies in progress."""
        return len(self._crossed)

    def feed(self, sample: Sample) -> list[AnomalyEvent]:
        events: list[AnomalyEvent] = []
        for index, rule in enumerate(self._rules):
            value = sample.values.get(rule.value)
            if value is None:
                continue
            key = (sample.asset, index)
            previous = self._crossed.get(key)
            crossed = crossed_bound(rule, value)
            if crossed == previous:
                continue
            if previous is not None:
                del self._crossed[key]
                events.append(self._event(Event.ENDED, sample, rule, value, previous))
            if crossed is not None:
                self._crossed[key] = crossed
                events.append(self._event(Event.START, sample, rule, value, crossed))
        return events

    def checkpoint(self) -> None:
        self._saved = dict(self._crossed)

    def rollback(self) -> None:
        self._crossed = dict(self._saved)

    def _event(
        self, event: Event, sample: Sample, rule: ThresholdRule, value: float, bound: float
    ) -> AnomalyEvent:
        return AnomalyEvent(
            event=event,
            asset=sample.asset,
            route=sample.route,
            detector=NAME,
            value_name=rule.value,
            value=value,
            bound=bound,
            ts=sample.ts,
            source_id=sample.entry_id,
            severity=rule.severity,
        )
