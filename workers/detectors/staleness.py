"""An asset gone silent (`worker.detectors.staleness`): no entry for longer than `silent_s`.

Silence is measured in stream time, the Redis clock in entry ids, not device time, so a device
with a wrong clock is judged fairly. `sweep` runs on a timer, so the flag is raised with no
incoming message; the worker passes the stream's time, which is Redis' clock while the worker is
caught up and the id of the last entry processed while it replays a backlog (a backlog must not
make every asset look silent). `start` names the asset's last entry; `ended` is emitted by the
first entry after the silence. Score and value: seconds of silence.

State (4 slots): the last entry's id (milliseconds and sequence parts; NaN before any), its device
time, open.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from config.settings import StalenessRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors.base import NAN, Check, Indexed, Matrix, Round, Row, Vector, timed_event
from workers.sample import Sample

NAME = "staleness"


class StalenessCheck(Check):
    detector: ClassVar[str] = NAME
    width: ClassVar[int] = 4
    initial: ClassVar[tuple[float, ...]] = (NAN, 0.0, NAN, 0.0)
    timed: ClassVar[bool] = True
    open_slot: ClassVar[int] = 3

    def __init__(self, rule: StalenessRule) -> None:
        super().__init__(rule, None)
        self._silent_ms = rule.silent_s * 1000.0
        self._silent_s = rule.silent_s

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        ms, _, seq = sample.entry_id.partition("-")
        now_ms = float(ms)
        if st[at + 3]:
            st[at + 3] = 0.0
            silent = (now_ms - st[at]) / 1000.0
            out.append(self.event(Event.ENDED, sample, silent, self._silent_s, silent))
        st[at] = now_ms
        st[at + 1] = float(seq or 0)
        st[at + 2] = sample.time_s

    def feed_many(self, st: Matrix, rnd: Round, values: Vector | None, out: Indexed) -> None:
        # Only the first sample after a silence raises an event: it goes through `feed`.
        plain = st[:, 3] == 0.0
        st[plain, 0] = rnd.id_ms[plain]
        st[plain, 1] = rnd.id_seq[plain]
        st[plain, 2] = rnd.time_s[plain]
        if not plain.all():
            self.feed_each(st, rnd, values, np.flatnonzero(~plain).tolist(), out)

    def sweep(
        self, st: Row, at: int, asset: str, route: str, now_ms: int, out: list[AnomalyEvent]
    ) -> None:
        last = st[at]
        if st[at + 3] or not now_ms - last > self._silent_ms:  # also False while last is NaN
            return
        st[at + 3] = 1.0
        silent = (now_ms - last) / 1000.0
        source_id = f"{int(last)}-{int(st[at + 1])}"
        out.append(
            timed_event(self, Event.START, asset=asset, route=route, source_id=source_id,
                        ts=st[at + 2], value=silent, bound=self._silent_s, score=silent)
        )  # fmt: skip
