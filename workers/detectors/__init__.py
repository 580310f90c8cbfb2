"""What every detector consumes and offers: a decoded `Sample` in, `AnomalyEvent`s out.

Detectors are plain objects with no I/O, so they are tested without Redis. A detector keeps state
per asset; the consumer calls `checkpoint()` before a batch and `rollback()` when the batch's
outputs could not be written, because those entries will be delivered again and must meet the state
they met the first time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from bridge.record import Reason, decode_values
from config.errors import PayloadRejected
from workers.anomaly import AnomalyEvent

# Enough of a bad field to recognise it in a dead letter, not enough to flood the stream.
_MAX_QUOTED = 64


@dataclass(frozen=True, slots=True)
class Sample:
    """One telemetry entry, checked and decoded."""

    entry_id: str
    route: str
    asset: str
    seq: int
    ts: str
    values: dict[str, float]


class Detector(Protocol):
    @property
    def name(self) -> str:
        """The `detector` field of its events and the `detector` metric label."""
        ...

    def feed(self, sample: Sample) -> list[AnomalyEvent]:
        """Advance the state with one sample; the events it causes, in order."""
        ...

    def checkpoint(self) -> None:
        """Remember the current state (the start of a batch)."""
        ...

    def rollback(self) -> None:
        """Return to the state of the last checkpoint."""
        ...


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "..."


def _quoted(text: str) -> str:
    return repr(_cut(text))


def _required(fields: Mapping[str, str], name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise PayloadRejected(Reason.SCHEMA, f"missing field {name!r}")
    if not value:
        raise PayloadRejected(Reason.SCHEMA, f"empty field {name!r}")
    return value


def decode_entry(route: str, entry_id: str, fields: Mapping[str, str] | None) -> Sample:
    """A telemetry entry (layout of `bridge.record`) as a `Sample`; `PayloadRejected` if malformed.

    `route` is the configured route of the stream the entry came from, not the entry's own `route`
    field, so labels and outputs only ever carry configured names.
    """
    if not fields:
        # XREADGROUP returns a pending entry without fields when it was trimmed or deleted.
        raise PayloadRejected(Reason.SCHEMA, "entry no longer in the stream")
    asset = _required(fields, "asset")
    seq_text = _required(fields, "seq")
    ts = _required(fields, "ts")
    try:
        seq = int(seq_text)
    except ValueError:
        seq = -1
    if seq < 0:
        raise PayloadRejected(Reason.SCHEMA, f"seq is not an integer >= 0: {_quoted(seq_text)}")
    try:
        ts_value = float(ts)
    except ValueError:
        ts_value = math.nan
    if not math.isfinite(ts_value):
        raise PayloadRejected(Reason.SCHEMA, f"ts is not a finite number: {_quoted(ts)}")
    try:
        values = decode_values(fields)
    except ValueError as exc:
        raise PayloadRejected(Reason.SCHEMA, f"a value is not a number: {_cut(str(exc))}") from exc
    for name, value in values.items():
        if not math.isfinite(value):
            raise PayloadRejected(Reason.SCHEMA, f"value {name!r} is not finite: {value}")
    return Sample(entry_id=entry_id, route=route, asset=asset, seq=seq, ts=ts, values=values)
