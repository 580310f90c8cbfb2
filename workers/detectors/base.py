"""What every detector offers: a `Check` is one configured rule of one detector, fed one asset's
samples in order, with that asset's state.

A check keeps no state of its own. Its state lives in the asset's row, `width` floats starting at
offset `at` of an `array('d')` (NaN for "none"), laid out by `workers.state`: one flat row per
asset keeps memory small, and a row is checkpointed with one `tobytes()`. Checks do no I/O, so they
are tested without Redis; the same samples in the same order always give the same events.
"""

from __future__ import annotations

import math
from array import array
from fnmatch import fnmatchcase
from typing import ClassVar, TypeAlias

from config.settings import DetectorRule
from workers.anomaly import AnomalyEvent, Event, format_number
from workers.sample import Sample

NAN = math.nan
# The state row of one asset (array("d"); generic only for the type checker).
Row: TypeAlias = "array[float]"


def new_row(initial: list[float]) -> Row:
    return array("d", initial)


def row_from(data: bytes) -> Row:
    row = array("d")
    row.frombytes(data)
    return row


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
