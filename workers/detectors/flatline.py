"""A value stuck at one reading (`worker.detectors.flatline`): a frozen sensor or a stale cache
upstream keeps sending the same number.

A run is the samples within `epsilon` of the run's first value. `start` when the run reaches
`samples` samples, or lasts `duration_s` of device time if set; `ended` on the first sample that
leaves it (that sample starts a new run). Score and bound are samples, or seconds when the
duration triggered.

State (4 slots): the run's first value (NaN before any sample), its length, its first device time,
open.
"""

from __future__ import annotations

from typing import ClassVar

from config.settings import FlatlineRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors.base import NAN, Check, Row
from workers.sample import Sample

NAME = "flatline"


class FlatlineCheck(Check):
    detector: ClassVar[str] = NAME
    width: ClassVar[int] = 4
    initial: ClassVar[tuple[float, ...]] = (NAN, 0.0, NAN, 0.0)
    open_slot: ClassVar[int] = 3

    def __init__(self, rule: FlatlineRule) -> None:
        super().__init__(rule, rule.value)
        self._epsilon = rule.epsilon
        self._samples = float(rule.samples)
        self._duration = rule.duration_s

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        if abs(value - st[at]) <= self._epsilon:  # False while the first value is NaN
            count = st[at + 1] + 1.0
            st[at + 1] = count
            if st[at + 3]:
                return
            if count >= self._samples:
                st[at + 3] = 1.0
                out.append(self.event(Event.START, sample, value, self._samples, count))
                return
            lasted = sample.time_s - st[at + 2]
            if self._duration is not None and lasted >= self._duration:
                st[at + 3] = 1.0
                out.append(self.event(Event.START, sample, value, self._duration, lasted))
            return
        if st[at + 3]:
            st[at + 3] = 0.0
            out.append(self.event(Event.ENDED, sample, value, self._samples, st[at + 1]))
        st[at] = value
        st[at + 1] = 1.0
        st[at + 2] = sample.time_s
