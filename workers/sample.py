"""A telemetry entry read back for the detectors: `decode_entry` checks the layout of
`bridge.record` and returns a `Sample`, or raises `PayloadRejected` for an entry that can never be
processed (it is dead-lettered at once, without retries).

Decoding is on the hot path (every entry), so the common case runs one straight pass and only a
failing entry goes through the slower checks that name the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from bridge.record import Reason, decode_values
from config.errors import PayloadRejected

# Enough of a bad field to recognise it in a dead letter, not enough to flood the stream.
_MAX_QUOTED = 64


@dataclass(slots=True)
class Sample:
    """One telemetry entry, checked and decoded. `ts` is the device time as the bridge wrote it
    (so events repeat it exactly), `time_s` the same as a float."""

    entry_id: str
    route: str
    asset: str
    seq: int
    ts: str
    time_s: float
    values: dict[str, float]


def decode_entry(route: str, entry_id: str, fields: Mapping[str, str] | None) -> Sample:
    """A telemetry entry (layout of `bridge.record`) as a `Sample`; `PayloadRejected` if malformed.

    `route` is the configured route of the stream the entry came from, not the entry's own `route`
    field, so labels and outputs only ever carry configured names.
    """
    if not fields:
        # A pending entry comes back without fields when it was trimmed or deleted.
        raise PayloadRejected(Reason.SCHEMA, "entry no longer in the stream")
    try:
        asset = fields["asset"]
        seq = int(fields["seq"])
        ts = fields["ts"]
        time_s = float(ts)
        values = decode_values(fields)
    except (KeyError, ValueError):
        _explain(fields)
    if not asset or seq < 0 or not math.isfinite(time_s):
        _explain(fields)
    for name, value in values.items():
        if not math.isfinite(value):
            raise PayloadRejected(Reason.SCHEMA, f"value {name!r} is not finite: {value}")
    return Sample(entry_id, route, asset, seq, ts, time_s, values)


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


def _explain(fields: Mapping[str, str]) -> NoReturn:
    """Raise `PayloadRejected` naming the first problem of an entry the fast path refused."""
    _required(fields, "asset")
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
        decode_values(fields)
    except ValueError as exc:
        raise PayloadRejected(Reason.SCHEMA, f"a value is not a number: {_cut(str(exc))}") from exc
    raise PayloadRejected(Reason.SCHEMA, "malformed entry")
