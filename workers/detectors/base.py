"""What every detector offers: a `Check` is one configured rule of one detector, fed one asset's
samples in order, with that asset's state.

A check keeps no state of its own. Its state lives in the asset's row, `width` floats starting at
offset `at` of the asset's row (NaN for "none"), laid out by `workers.state`: one flat row of
floats per asset keeps memory small, and a row is checkpointed with one `tobytes()`. Checks do no I/O, so they
are tested without Redis; the same samples in the same order always give the same events.

Two ways in, one result. `feed` takes one sample. `feed_many` takes a `Round`: one sample each of
many assets, their rows stacked in a matrix, and runs the common case column-wise (numpy; measured:
one numpy step over 500 samples costs about what one Python `feed` call costs). Whatever the
column-wise code does not reproduce itself, above all every sample that raises an event, goes
through `feed` one by one (`feed_each`), so `feed` stays the definition of a detector and events are
only ever built there. Float arithmetic is IEEE in both, in the same order, so the states are equal
bit for bit (`tests/unit/test_detectors.py` compares the two paths).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import ClassVar, TypeAlias, cast

import numpy as np
import numpy.typing as npt

from config.settings import DetectorRule
from workers.anomaly import AnomalyEvent, Event, format_number
from workers.sample import Sample

NAN = math.nan
# The state row of one asset: a view of its floats (`workers.rows`); generic only for the type
# checker.
Row: TypeAlias = "memoryview[float]"
# One float per sample of a round, and the round's rows (one per asset) as a matrix; a check sees
# only its own columns, a view: writing them writes the matrix.
Vector: TypeAlias = npt.NDArray[np.float64]
Matrix: TypeAlias = npt.NDArray[np.float64]
# Events of a round, each with the index of the sample that raised it.
Indexed: TypeAlias = list[tuple[int, AnomalyEvent]]


class SampleFailed(Exception):
    """A check raised on this sample: the batch is rolled back and the entry retried alone."""

    def __init__(self, sample: Sample, error: Exception) -> None:
        self.sample = sample
        self.error = error
        super().__init__(f"{type(error).__name__}: {error}")


class Round:
    """One sample each of distinct assets that share a plan: the next step of every one of them.
    The columns the checks read are built once per round, on first use."""

    __slots__ = ("_id_ms", "_id_seq", "_seq", "_time_s", "samples")

    def __init__(
        self, samples: Sequence[Sample], time_s: Vector | None = None, seq: Vector | None = None,
        id_ms: Vector | None = None, id_seq: Vector | None = None,
    ) -> None:  # fmt: skip
        """`samples` may be a lazy sequence (`workers.columns`): the columns given here are then
        never rebuilt from it."""
        self.samples = samples
        self._time_s = time_s
        self._seq = seq
        self._id_ms = id_ms
        self._id_seq = id_seq

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def time_s(self) -> Vector:
        if self._time_s is None:
            self._time_s = np.array([s.time_s for s in self.samples], dtype=np.float64)
        return self._time_s

    @property
    def seq(self) -> Vector:
        """`seq` as floats: exact below 2**53, which a check relying on it must test."""
        if self._seq is None:
            self._seq = np.array([float(s.seq) for s in self.samples], dtype=np.float64)
        return self._seq

    @property
    def id_ms(self) -> Vector:
        """The entry ids' millisecond parts (as `float(ms)` in `feed`)."""
        if self._id_ms is None:
            parts = [s.entry_id.partition("-") for s in self.samples]
            self._id_ms = np.array([float(ms) for ms, _, _ in parts], dtype=np.float64)
            self._id_seq = np.array([float(seq or 0) for _, _, seq in parts], dtype=np.float64)
        return self._id_ms

    @property
    def id_seq(self) -> Vector:
        self.id_ms  # noqa: B018 (computes both parts)
        assert self._id_seq is not None
        return self._id_seq


class Check:
    """One rule of one detector. Subclasses set `detector`, `width` and `initial`, and implement
    `feed`; a time-driven one sets `timed` and implements `sweep`."""

    detector: ClassVar[str]
    width: ClassVar[int]
    initial: ClassVar[tuple[float, ...]]
    timed: ClassVar[bool] = False
    # Offset of the 0/1 "anomaly open" flag in the check's slots.
    open_slot: ClassVar[int]

    def __init__(self, rule: DetectorRule, value: str | None) -> None:
        self.rule = rule
        # The value it reads, or None for a check of the whole asset (staleness, sequence gaps).
        self.value = value
        self.severity = rule.severity

    def matches(self, route: str, asset: str) -> bool:
        return (self.rule.route is None or self.rule.route == route) and fnmatchcase(
            asset, self.rule.assets
        )

    def layout(self) -> str:
        """What decides where this check's slots are: state saved under another layout is not
        restored. Thresholds and the like may change freely between runs."""
        return f"{self.detector}/{self.value}/{self.width}/{self.rule.route}/{self.rule.assets}"

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        """Advance the state with one sample (`value` is its value for this check, 0.0 for a
        check of the whole asset); append the events it causes."""
        raise NotImplementedError

    def feed_many(self, st: Matrix, rnd: Round, values: Vector | None, out: Indexed) -> None:
        """`feed` for every sample of `rnd` (`values`: this check's value of each, None for a
        check of the whole asset), on `st`, the round's rows restricted to this check's slots.
        This default takes them one by one; a detector overrides it with column-wise code."""
        self.feed_each(st, rnd, values, range(len(rnd)), out)

    def feed_each(
        self, st: Matrix, rnd: Round, values: Vector | None, index: Iterable[int], out: Indexed
    ) -> None:
        """`feed`, one sample at a time, for the samples `index` of the round."""
        events: list[AnomalyEvent] = []
        feed = self.feed
        for i in index:
            # A row of a round is contiguous: `feed` writes the round's matrix through the view.
            row = cast("Row", st[i].data)
            sample = rnd.samples[i]
            value = 0.0 if values is None else float(values[i])
            try:
                feed(row, 0, sample, value, events)
            except Exception as exc:
                raise SampleFailed(sample, exc) from exc
            if events:
                out.extend((i, event) for event in events)
                events.clear()

    def sweep(
        self, st: Row, at: int, asset: str, route: str, now_ms: int, out: list[AnomalyEvent]
    ) -> None:
        """Time-driven checks: advance the state to `now_ms` (stream time) with no sample."""

    def is_open(self, st: Row, at: int) -> bool:
        return st[at + self.open_slot] != 0.0

    def event(
        self, event: Event, sample: Sample, value: float, bound: float, score: float
    ) -> AnomalyEvent:
        return _event(self, event, sample.asset, sample.route, sample.entry_id, sample.ts,
                      value, bound, score)  # fmt: skip


def timed_event(
    check: Check, event: Event, *, asset: str, route: str, source_id: str, ts: float,
    value: float, bound: float, score: float,
) -> AnomalyEvent:  # fmt: skip
    """An event raised by the clock rather than by a sample; `source_id` is the asset's last
    entry and `ts` its device time."""
    return _event(check, event, asset, route, source_id, format_number(ts), value, bound, score)


def _event(
    check: Check, event: Event, asset: str, route: str, source_id: str, ts: str,
    value: float, bound: float, score: float,
) -> AnomalyEvent:  # fmt: skip
    return AnomalyEvent(
        event=event,
        asset=asset,
        route=route,
        detector=check.detector,
        value_name=check.value or "",
        value=value,
        bound=bound,
        score=score,
        ts=ts,
        source_id=source_id,
        severity=check.severity,
    )
