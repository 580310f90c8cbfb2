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

import numpy as np

from config.settings import FlatlineRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors.base import NAN, Check, Indexed, Matrix, Round, Row, Vector
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

    def feed_many(self, st: Matrix, rnd: Round, values: Vector | None, out: Indexed) -> None:
        assert values is not None
        now = rnd.time_s
        same = np.abs(values - st[:, 0]) <= self._epsilon
        count = st[:, 1] + 1.0
        opened = st[:, 3] != 0.0
        due = count >= self._samples
        if self._duration is not None:
            due |= now - st[:, 2] >= self._duration
        # Through `feed`: a run that reaches its bound, and a change that ends an open one.
        special = np.where(same, ~opened & due, opened)
        run = same & ~special
        st[run, 1] = count[run]
        new = ~same & ~special
        st[new, 0] = values[new]
        st[new, 1] = 1.0
        st[new, 2] = now[new]
        if special.any():
            self.feed_each(st, rnd, values, np.flatnonzero(special).tolist(), out)
