"""Samples lost upstream of the broker (`worker.detectors.sequence_gap`): holes in an asset's `seq`.

Small reordering is not loss: a missing seq is declared lost only once a seq `reorder_window` or
more above it has arrived (at once, if the jump itself goes that far); until then a late sample
fills its hole. When a hole is declared, the rest of its run is declared with it,
so a burst of lost samples is one event whose score is the burst's size. A seq further back than the
window is a device restart (a reset to 0, say): the tracking starts over, nothing is lost.
A duplicate changes nothing.

`start` on the sample that reveals a loss (score: samples lost); `ended` on the next sample that
reveals none (score: samples lost in the episode). Value: the sample's seq.

State (4 slots): highest seq seen (NaN before any), a bit mask of the window (bit i: seq high - i
arrived; 52 bits fit a double exactly), open, samples lost in the open episode.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from config.settings import SequenceGapRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors.base import NAN, Check, Indexed, Matrix, Round, Row, Vector
from workers.sample import Sample

NAME = "sequence_gap"
# Below this a seq and the one after it are both exact as floats.
_EXACT = float(2**52)


class SequenceGapCheck(Check):
    detector: ClassVar[str] = NAME
    width: ClassVar[int] = 4
    initial: ClassVar[tuple[float, ...]] = (NAN, 0.0, 0.0, 0.0)
    open_slot: ClassVar[int] = 2

    def __init__(self, rule: SequenceGapRule) -> None:
        super().__init__(rule, None)
        self._window = rule.reorder_window
        self._full = (1 << rule.reorder_window) - 1
        self._full_f = float(self._full)

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        seq = sample.seq
        high_f = st[at]
        if high_f != high_f:  # noqa: PLR0124 (NaN: the first sample; everything before counts as seen)
            st[at] = seq
            st[at + 1] = self._full
            return
        high = int(high_f)
        if seq == high:
            return
        lost = 0
        if seq > high:
            st[at] = seq
            lost, mask = self._advance(int(st[at + 1]), seq - high)
            st[at + 1] = mask
        elif high - seq < self._window:
            bit = 1 << (high - seq)
            mask = int(st[at + 1])
            if mask & bit:
                return  # a duplicate
            st[at + 1] = mask | bit  # a late sample fills its hole
        else:  # far behind the window: the device restarted
            st[at] = seq
            st[at + 1] = self._full
        self._episode(st, at, sample, lost, out)

    def feed_many(self, st: Matrix, rnd: Round, values: Vector | None, out: Indexed) -> None:
        # Column-wise only the usual step: the next seq, nothing missing, no episode open; it
        # moves the highest seq up and leaves the window full. Anything else goes through `feed`.
        seq = rnd.seq
        plain = (
            (seq == st[:, 0] + 1.0)
            & (st[:, 1] == self._full_f)
            & (st[:, 2] == 0.0)
            & (seq < _EXACT)
        )
        st[plain, 0] = seq[plain]
        if not plain.all():
            self.feed_each(st, rnd, values, np.flatnonzero(~plain).tolist(), out)

    def _advance(self, mask: int, shift: int) -> tuple[int, int]:
        """Move the window up by `shift`: (samples declared lost, new mask)."""
        window = self._window
        if shift >= window:
            # Every old bit leaves, and the skipped seqs more than a window back leave with them.
            lost = window - mask.bit_count() + shift - window
            mask = 1
        else:
            lost = shift - (mask >> (window - shift)).bit_count()
            mask = ((mask << shift) | 1) & self._full
        if lost:
            # The rest of the run the declared hole belongs to goes too: one burst, one event.
            top = window - mask.bit_length()
            lost += top
            mask |= self._full ^ ((1 << mask.bit_length()) - 1)
        return lost, mask

    def _episode(
        self, st: Row, at: int, sample: Sample, lost: int, out: list[AnomalyEvent]
    ) -> None:
        seq = float(sample.seq)
        if lost:
            st[at + 3] += lost
            if not st[at + 2]:
                st[at + 2] = 1.0
                out.append(self.event(Event.START, sample, seq, self._window, float(lost)))
        elif st[at + 2]:
            out.append(self.event(Event.ENDED, sample, seq, self._window, st[at + 3]))
            st[at + 2] = 0.0
            st[at + 3] = 0.0
