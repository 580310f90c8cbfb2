"""Rate of change (`worker.detectors.rate`): |dv/dt| between an asset's consecutive samples, with
dt from device time, above `max_per_s`.

dt is floored at `min_dt_s`, so at high sample rates the noise between two close samples does not
read as a fast change. A sample whose device time is not after the previous one (reordered,
repeated, or a device clock reset) gives no rate and becomes the new reference. `start` when the
rate exceeds the bound; `ended` on the first rate back within it (a spike up and straight back down
is one anomaly: both steps are fast).

State (3 slots): previous value, previous device time (NaN before the first sample), open.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from config.settings import RateRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors.base import NAN, Check, Indexed, Matrix, Round, Row, Vector
from workers.sample import Sample

NAME = "rate"


class RateCheck(Check):
    detector: ClassVar[str] = NAME
    width: ClassVar[int] = 3
    initial: ClassVar[tuple[float, ...]] = (NAN, NAN, 0.0)
    open_slot: ClassVar[int] = 2

    def __init__(self, rule: RateRule) -> None:
        super().__init__(rule, rule.value)
        self._max = rule.max_per_s
        self._min_dt = rule.min_dt_s

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        now = sample.time_s
        dt = now - st[at + 1]  # NaN before the first sample
        previous = st[at]
        st[at] = value
        st[at + 1] = now
        if not dt > 0.0:
            return
        rate = (value - previous) / (dt if dt > self._min_dt else self._min_dt)
        if st[at + 2]:
            if abs(rate) <= self._max:
                st[at + 2] = 0.0
                out.append(self.event(Event.ENDED, sample, value, self._max, rate))
        elif abs(rate) > self._max:
            st[at + 2] = 1.0
            out.append(self.event(Event.START, sample, value, self._max, rate))

    def feed_many(self, st: Matrix, rnd: Round, values: Vector | None, out: Indexed) -> None:
        assert values is not None
        now = rnd.time_s
        dt = now - st[:, 1]
        rate = np.abs((values - st[:, 0]) / np.where(dt > self._min_dt, dt, self._min_dt))
        flagged = np.where(st[:, 2] != 0.0, rate <= self._max, rate > self._max)
        special = (dt > 0.0) & flagged
        plain = ~special
        st[plain, 0] = values[plain]
        st[plain, 1] = now[plain]
        if special.any():
            self.feed_each(st, rnd, values, np.flatnonzero(special).tolist(), out)
