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
from typing import NoReturn, TypeAlias

from bridge.record import VALUE_PREFIX, Reason, decode_values
from config.errors import PayloadRejected

# Enough of a bad field to recognise it in a dead letter, not enough to flood the stream.
_MAX_QUOTED = 64
_PREFIX_LEN = len(VALUE_PREFIX)
# An entry's fields: a mapping, or the flat [name, value, ...] list Redis answers.
Fields: TypeAlias = Mapping[str, str] | list[str]
# Positions in the flat list of asset, seq, ts and each value (name, position); -1: not there.
Layout: TypeAlias = tuple[int, int, int, tuple[tuple[str, int], ...]]
# The layouts seen; bounded, as field names come from the devices.
_layouts: dict[tuple[str, ...], Layout] = {}
_MAX_LAYOUTS = 1024
isfinite = math.isfinite


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


def decode_entry(route: str, entry_id: str, fields: Fields | None) -> Sample:
    """A telemetry entry (layout of `bridge.record`) as a `Sample`; `PayloadRejected` if malformed.

    `fields` is a mapping, or the flat `[name, value, ...]` list of a raw XREADGROUP reply.
    `route` is the configured route of the stream the entry came from, not the entry's own `route`
    field, so labels and outputs only ever carry configured names.
    """
    if not fields:
        # A pending entry comes back without fields when it was trimmed or deleted.
        raise PayloadRejected(Reason.SCHEMA, "entry no longer in the stream")
    if isinstance(fields, list):
        sample = _decode_flat(route, entry_id, fields)
        if sample is not None:
            return sample
        fields = as_mapping(fields)
    try:
        asset = fields["asset"]
        seq = int(fields["seq"])
        ts = fields["ts"]
        time_s = float(ts)
        values = decode_values(fields)
    except (KeyError, ValueError):
        _explain(fields)
    if not asset or seq < 0 or not isfinite(time_s):
        _explain(fields)
    for name, value in values.items():
        if not isfinite(value):
            raise PayloadRejected(Reason.SCHEMA, f"value {name!r} is not finite: {value}")
    return Sample(entry_id, route, asset, seq, ts, time_s, values)


def as_mapping(fields: Fields) -> Mapping[str, str]:
    """The fields as a mapping (of a flat list, the last of a repeated name wins, as in a dict)."""
    if isinstance(fields, list):
        return dict(zip(fields[0::2], fields[1::2], strict=False))
    return fields


def _decode_flat(route: str, entry_id: str, flat: list[str]) -> Sample | None:
    """The common case straight from the flat list, by the positions of its field layout; None
    for anything unusual, which the mapping path then decodes or explains."""
    at_asset, at_seq, at_ts, at_values = layout_of(tuple(flat[0::2]))
    if at_asset < 0:
        return None
    try:
        seq = int(flat[at_seq])
        ts = flat[at_ts]
        time_s = float(ts)
        values = {name: float(flat[at]) for name, at in at_values}
    except ValueError:
        return None
    asset = flat[at_asset]
    if not asset or seq < 0 or not isfinite(time_s + sum(values.values())):
        return None
    return Sample(entry_id, route, asset, seq, ts, time_s, values)


def layout_of(names: tuple[str, ...]) -> Layout:
    """Where the fields named `names` (in the order of a flat list) are; asset -1: not a layout
    the fast paths decode."""
    layout = _layouts.get(names)
    return _layout(names) if layout is None else layout


def _layout(names: tuple[str, ...]) -> Layout:
    """Where a layout's fields are in the flat list; the entries of a route come in a handful of
    layouts, so each is looked at once (measured: scanning every field name of every entry was
    a third of the decoding time)."""
    if len(_layouts) >= _MAX_LAYOUTS:
        _layouts.clear()
    at = {name: 2 * i + 1 for i, name in enumerate(names)}  # a repeated name: the last wins
    values = tuple(
        (name[_PREFIX_LEN:], i) for name, i in at.items() if name[:_PREFIX_LEN] == VALUE_PREFIX
    )
    if "asset" in at and "seq" in at and "ts" in at:
        layout = (at["asset"], at["seq"], at["ts"], values)
    else:
        layout = (-1, -1, -1, ())
    _layouts[names] = layout
    return layout


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
