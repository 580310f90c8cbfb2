"""Deviation from an asset's own normal (`worker.detectors.deviation`): an exponentially weighted
mean and variance per asset and value, and a flag when |z| = |value - mean| / std exceeds `z_max`.

The first `warmup_samples` samples only learn (a plain running mean and variance, so the estimate
is sound when flagging starts). Then every sample is scored against the state before it, and `start`
is emitted when |z| > z_max, `ended` when |z| is back at or below `z_clear`. The update uses the
sample clipped to mean +/- z_max std, so one spike does not inflate the variance and blind the
detector for the samples after it; a lasting shift still moves the mean, and its anomaly ends once
the mean has followed. `min_std` floors the std of a very steady value.

State (4 slots): samples seen (capped at the warm-up), mean, variance, open.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from config.settings import DeviationRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors.base import Check, Indexed, Matrix, Round, Row, Vector
from workers.sample import Sample

NAME = "deviation"


class DeviationCheck(Check):
    detector: ClassVar[str] = NAME
    width: ClassVar[int] = 4
    initial: ClassVar[tuple[float, ...]] = (0.0, 0.0, 0.0, 0.0)
    open_slot: ClassVar[int] = 3

    def __init__(self, rule: DeviationRule) -> None:
        super().__init__(rule, rule.value)
        self._alpha = rule.alpha
        self._z_max = rule.z_max
        self._z_clear = rule.z_clear
        self._warmup = float(rule.warmup_samples)
        self._min_std = rule.min_std

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        n = st[at]
        mean = st[at + 1]
        var = st[at + 2]
        if n < self._warmup:
            n += 1.0
            diff = value - mean
            mean += diff / n
            # The running (population) variance, in the same form as the EWMA update below.
            st[at + 2] = (1.0 - 1.0 / n) * (var + diff * diff / n)
            st[at] = n
            st[at + 1] = mean
            return
        std = math.sqrt(var)
        if std < self._min_std:  # noqa: PLR1730 (an if is cheaper than max() on this path)
            std = self._min_std
        diff = value - mean
        if std > 0.0:
            z = diff / std
        elif diff:
            z = math.copysign(math.inf, diff)
        else:
            z = 0.0
        size = z if z >= 0.0 else -z
        if st[at + 3]:
            if size <= self._z_clear:
                st[at + 3] = 0.0
                out.append(self.event(Event.ENDED, sample, value, self._z_clear, z))
        elif size > self._z_max:
            st[at + 3] = 1.0
            out.append(self.event(Event.START, sample, value, self._z_max, z))
        if std > 0.0:
            limit = self._z_max * std
            if diff > limit:
                diff = limit
            elif diff < -limit:
                diff = -limit
        alpha = self._alpha
        st[at + 1] = mean + alpha * diff
        st[at + 2] = (1.0 - alpha) * (var + alpha * diff * diff)

    def feed_many(self, st: Matrix, rnd: Round, values: Vector | None, out: Indexed) -> None:
        # The same expressions as `feed`, in the same order, so the floats are the same.
        assert values is not None
        n = st[:, 0]
        mean = st[:, 1]
        var = st[:, 2]
        learning = n < self._warmup
        # Through `feed`: a sample that opens or ends an anomaly, and a zero std (z is then
        # infinite or 0, not a quotient).
        std = np.sqrt(var)
        std = np.where(std < self._min_std, self._min_std, std)
        diff = values - mean
        size = np.abs(diff / std)
        flagged = np.where(st[:, 3] != 0.0, size <= self._z_clear, size > self._z_max)
        special = ~learning & (flagged | ~(std > 0.0))
        scored = ~learning & ~special
        if learning.any():
            count = n[learning] + 1.0
            step = values[learning] - mean[learning]
            var[learning] = (1.0 - 1.0 / count) * (var[learning] + step * step / count)
            mean[learning] = mean[learning] + step / count
            n[learning] = count
        if scored.any():
            limit = self._z_max * std[scored]
            step = diff[scored]
            step = np.where(step > limit, limit, np.where(step < -limit, -limit, step))
            alpha = self._alpha
            var[scored] = (1.0 - alpha) * (var[scored] + alpha * step * step)
            mean[scored] = mean[scored] + alpha * step
        if special.any():
            self.feed_each(st, rnd, values, np.flatnonzero(special).tolist(), out)
