"""Recording what the broker acknowledged, per asset, compactly (see `simulators.acked` for
the file it becomes and how the audit reads it).

While running, an asset costs three array slots: its acks arrive in seq order on one connection,
so each extends the asset's open range; anything else (a gap after a failed publish, an
out-of-order message, a restart) closes it into a short per-asset list. This module is imported
by every engine process, so it imports nothing heavy (no Redis client).

Messages sent and given up without a PUBACK (the connection dropped, or the drain timed out) are
kept apart as `unconfirmed`: the broker may have accepted them all the same, so the audit must
neither count them as acknowledged nor call them unexpected when they reach the stream.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TextIO

from simulators.fleet import asset_id

FORMAT = "iotbridge-acked/1"


class AckLog:
    """Acknowledged `(asset, epoch, seq)` of one process's assets (local indices 0..n-1)."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self._epoch = array("H", bytes(2 * count))
        self._start = array("q", bytes(8 * count))
        self._end = array("q", bytes(8 * count))  # exclusive; start == end: no open range
        self._closed: dict[int, list[tuple[int, int, int]]] = {}
        self.epoch_starts: dict[int, list[float]] = {}
        self.bad: dict[int, list[tuple[int, int]]] = {}
        self.unconfirmed: dict[int, list[tuple[int, int]]] = {}

    def add(self, local: int, epoch: int, seq: int) -> None:
        if self._end[local] == seq and self._epoch[local] == epoch:
            self._end[local] = seq + 1
            return
        if self._end[local] > self._start[local]:
            self._closed.setdefault(local, []).append(
                (self._epoch[local], self._start[local], self._end[local] - 1)
            )
        self._epoch[local], self._start[local], self._end[local] = epoch, seq, seq + 1

    def add_bad(self, local: int, epoch: int, seq: int) -> None:
        self.bad.setdefault(local, []).append((epoch, seq))

    def add_unconfirmed(self, local: int, epoch: int, seq: int) -> None:
        self.unconfirmed.setdefault(local, []).append((epoch, seq))

    def restarted(self, local: int, ts: float) -> None:
        self.epoch_starts.setdefault(local, []).append(ts)

    def ranges(self, local: int) -> list[tuple[int, int, int]]:
        """Merged (epoch, first, last) ranges of an asset, ascending."""
        runs = list(self._closed.get(local, ()))
        if self._end[local] > self._start[local]:
            runs.append((self._epoch[local], self._start[local], self._end[local] - 1))
        merged: list[tuple[int, int, int]] = []
        for epoch, first, last in sorted(runs):
            if merged and merged[-1][0] == epoch and first <= merged[-1][2] + 1:
                if last > merged[-1][2]:
                    merged[-1] = (epoch, merged[-1][1], last)
            else:
                merged.append((epoch, first, last))
        return merged

    def records(self) -> Iterator[dict[str, Any]]:
        for local in range(len(self._end)):
            ranges = self.ranges(local)
            bad = self.bad.get(local)
            unconfirmed = self.unconfirmed.get(local)
            if not ranges and not bad and not unconfirmed:
                continue
            record: dict[str, Any] = {
                "asset": asset_id(self.first + local),
                "acked": [list(r) for r in ranges],
            }
            if local in self.epoch_starts:
                record["epochs"] = self.epoch_starts[local]
            if bad:
                record["bad"] = [list(b) for b in sorted(set(bad))]
            if unconfirmed:
                record["unconfirmed"] = [list(r) for r in _runs(unconfirmed)]
            yield record


def _runs(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(epoch, seq) pairs as merged (epoch, first, last) ranges, ascending."""
    runs: list[tuple[int, int, int]] = []
    for epoch, seq in sorted(set(pairs)):
        if runs and runs[-1][0] == epoch and runs[-1][2] + 1 == seq:
            runs[-1] = (epoch, runs[-1][1], seq)
        else:
            runs.append((epoch, seq, seq))
    return runs


def write_records(out: TextIO, records: Iterable[Mapping[str, Any]]) -> int:
    lines = 0
    for record in records:
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
        lines += 1
    return lines
