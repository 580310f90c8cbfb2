"""Static bounds with hysteresis (`worker.detectors.threshold`).

The first sample beyond `max` (or below `min`) emits `start`; the anomaly stays open, silently,
until a sample comes back `hysteresis` inside the bound, which emits `ended`. So a value hovering
at a bound is one flag, not one per crossing. A jump from above max straight to below min ends the
first anomaly and starts another, because the crossed bound, and so the cause, changed. A bound
itself is inside the range. Samples without the rule's value leave its state alone.

State (1 slot): the bound the value is beyond, NaN while in range.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from config.settings import ThresholdRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors.base import NAN, Check, Indexed, Matrix, Round, Row, Vector
from workers.sample import Sample

NAME = "threshold"


class ThresholdCheck(Check):
    detector: ClassVar[str] = NAME
    width: ClassVar[int] = 1
    initial: ClassVar[tuple[float, ...]] = (NAN,)

    def __init__(self, rule: ThresholdRule) -> None:
        super().__init__(rule, rule.value)
        self._max = math.inf if rule.max is None else rule.max
        self._min = -math.inf if rule.min is None else rule.min
        self._hysteresis = rule.hysteresis

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        crossed = st[at]
        if value > self._max:
            beyond = self._max
        elif value < self._min:
            beyond = self._min
        else:
            beyond = NAN
        # x != x is the NaN test (NaN: none); faster than math.isnan on this per-sample path.
        if crossed != crossed:  # noqa: PLR0124 (NaN test) in range until now
            if beyond == beyond:  # noqa: PLR0124 (NaN test)
                st[at] = beyond
                out.append(self.event(Event.START, sample, value, beyond, value))
            return
        if beyond == crossed:
            return
        if beyond == beyond:  # noqa: PLR0124 (NaN test) straight across, beyond the other bound
            out.append(self.event(Event.ENDED, sample, value, crossed, value))
            st[at] = beyond
            out.append(self.event(Event.START, sample, value, beyond, value))
            return
        back = (
            value <= crossed - self._hysteresis
            if crossed == self._max
            else value >= crossed + self._hysteresis
        )
        if back:
            st[at] = NAN
            out.append(self.event(Event.ENDED, sample, value, crossed, value))

    def feed_many(self, st: Matrix, rnd: Round, values: Vector | None, out: Indexed) -> None:
        # A sample that raises no event changes nothing: only those that do go through `feed`.
        assert values is not None
        crossed = st[:, 0]
        beyond = np.where(
            values > self._max, self._max, np.where(values < self._min, self._min, NAN)
        )
        hit = ~np.isnan(beyond)
        back = np.where(
            crossed == self._max,
            values <= crossed - self._hysteresis,
            values >= crossed + self._hysteresis,
        )
        # NaN (in range until now) compares unequal to any bound: closed and beyond is an event.
        changed = np.where(hit, beyond != crossed, back)
        if changed.any():
            self.feed_each(st, rnd, values, np.flatnonzero(changed).tolist(), out)

    def is_open(self, st: Row, at: int) -> bool:
        return st[at] == st[at]  # not NaN
