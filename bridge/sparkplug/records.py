"""What the Sparkplug host hands the write path: telemetry entries, state events, refusals.

An entry is one telemetry record (`bridge.record`) of one asset at one metric timestamp:

- `asset`: `<group>/<node>` or `<group>/<node>/<device>`, escaped (`bridge.sparkplug.names`);
- `seq`: a counter per asset, one more per entry, never reset (not by the 0-255 wrap, not by a
  rebirth), so the write path's `(asset, seq)` dedup sees every entry as new;
- `ts`: the metric's timestamp (else the payload's, else the host's receive time), epoch seconds;
- `v.<value name>` per number (integers exact, booleans 1.0 / 0.0, DateTime as epoch ms) and
  `s.<value name>` per String, Text, UUID, NaN or infinity;
- `sp.type` (NBIRTH, NDATA, DBIRTH, DDATA), `sp.seq` (the wire seq), `sp.bdseq` (the session's
  bdSeq), `sp.historical` = 1 for is_historical values, `sp.null` (comma-separated value names of
  is_null metrics).

Metrics of one message with different timestamps, or historical beside current ones, become one
entry per (timestamp, historical).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from bridge.record import Reason, text_field, value_field
from bridge.sparkplug.payload import Value
from bridge.sparkplug.publish import Publication

Number = int | float


@dataclass(frozen=True, slots=True)
class Entry:
    asset: str
    seq: int
    ts: float
    values: dict[str, Number]
    texts: dict[str, str]
    extra: dict[str, str]

    def fields(self) -> dict[str, str]:
        """The entry's record fields, as `bridge.record` lays them out (the intake adds
        `topic`, `route` and `rx`)."""
        fields = {"asset": self.asset, "seq": str(self.seq), "ts": repr(self.ts)}
        for name, number in self.values.items():
            fields[value_field(name)] = str(number) if isinstance(number, int) else repr(number)
        for name, text in self.texts.items():
            fields[text_field(name)] = text
        fields.update(self.extra)
        return fields


@dataclass(frozen=True, slots=True)
class Event:
    """An asset going online (a birth) or offline (a death), with the metrics now stale."""

    asset: str
    online: bool
    ts: float
    cause: str  # the message type: NBIRTH, DBIRTH, NDEATH, DDEATH
    bd_seq: int | None
    stale: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A message, or one metric of it, that was not written; reason is a dead-letter reason."""

    topic: str
    reason: Reason
    detail: str
    metric: str | None = None


@dataclass(slots=True)
class Outcome:
    """Everything one call of the host produced, in order."""

    entries: list[Entry] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    commands: list[Publication] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    missing: int = 0  # seqs skipped after the reorder timeout: messages never received
    unplaced: int = 0  # messages behind the expected seq, or duplicates: nothing written
    unknown: int = 0  # DATA before its birth or with an unknown alias: nothing written
    rebirths_suppressed: int = 0  # requests not sent: one went out within the interval

    def extend(self, other: Outcome) -> None:
        self.entries += other.entries
        self.events += other.events
        self.commands += other.commands
        self.refusals += other.refusals
        self.missing += other.missing
        self.unplaced += other.unplaced
        self.unknown += other.unknown
        self.rebirths_suppressed += other.rebirths_suppressed


class Counters:
    """The next entry seq per asset. The host keeps these in memory only: before an asset's first
    entry after a start, the write path should `resume` it from the dedup high-water mark, or a
    restarted bridge's first entries would reuse seqs its dedup has seen."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def take(self, asset: str) -> int:
        seq = self._next.get(asset, 0)
        self._next[asset] = seq + 1
        return seq

    def resume(self, asset: str, last_seq: int) -> None:
        """Continue after `last_seq` (never goes back)."""
        self._next[asset] = max(self._next.get(asset, 0), last_seq + 1)

    def known(self, asset: str) -> bool:
        return asset in self._next


@dataclass(frozen=True, slots=True)
class Sample:
    """One metric value ready for an entry: value None for is_null."""

    name: str  # the escaped value name
    value: Value | None
    timestamp_ms: int
    historical: bool


def build_entries(
    asset: str, samples: Iterable[Sample], base: dict[str, str], counters: Counters
) -> list[Entry]:
    """One entry per (timestamp, historical) of the samples, in the order they first appear;
    `base` holds the extra fields every entry of the message shares."""
    groups: dict[tuple[int, bool], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.timestamp_ms, sample.historical), []).append(sample)
    entries = []
    for (timestamp_ms, historical), group in groups.items():
        values: dict[str, Number] = {}
        texts: dict[str, str] = {}
        nulls: list[str] = []
        for sample in group:
            _place(sample, values, texts, nulls)
        extra = dict(base)
        if historical:
            extra["sp.historical"] = "1"
        if nulls:
            extra["sp.null"] = ",".join(nulls)
        seq = counters.take(asset)
        entries.append(Entry(asset, seq, timestamp_ms / 1000, values, texts, extra))
    return entries


def _place(
    sample: Sample, values: dict[str, Number], texts: dict[str, str], nulls: list[str]
) -> None:
    value = sample.value
    if value is None:
        nulls.append(sample.name)
    elif isinstance(value, str):
        texts[sample.name] = value
    elif isinstance(value, bool):
        values[sample.name] = 1.0 if value else 0.0
    elif isinstance(value, float) and not math.isfinite(value):
        # Readers parse every v. field as a finite float (bridge.record); keep the reading as text.
        texts[sample.name] = repr(value)
    else:
        values[sample.name] = value
