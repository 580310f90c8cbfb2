"""A batch of new entries decoded column by column: `decode_columns` turns the flat field lists of
one XREADGROUP reply into one list or float64 array per field the detectors read (asset, seq, ts
and every value), with no `Sample` per entry; a `Sample` is made only for the few entries that go
through `Check.feed` one by one (`Columns.sample`).

It applies only when every entry of the batch has the same layout of fields and every field the
detectors read is well-formed; for anything else it answers None and the batch is decoded entry
by entry (`workers.sample.decode_entry`), which finds and names the problem. The numbers are the
same either way: each text goes through `float` (and seq through `int`), as there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any, TypeVar, overload

import numpy as np

from workers.detectors.base import Vector
from workers.sample import Fields, Layout, Sample, layout_of
from workers.streams import NewEntries

# Below this many entries the per-entry path costs less than the column set-up.
COLUMNS_FROM = 32
T = TypeVar("T", str, bytes)


class Columns:
    """The fields of `len(ids)` entries of one route, position by position."""

    __slots__ = ("_id_ms", "_id_seq", "_seq", "assets", "ids", "route", "seq_text", "time_s",
                 "ts", "values")  # fmt: skip

    def __init__(
        self, route: str, ids: list[str], assets: list[str], seq_text: Sequence[str | bytes],
        ts: Sequence[str | bytes], time_s: Vector, values: dict[str, Vector],
    ) -> None:  # fmt: skip
        self.route = route
        self.ids = ids
        self.assets = assets
        # As read: text, or the bytes of a reply read without decoding (decoded when needed).
        self.seq_text = seq_text
        self.ts = ts
        self.time_s = time_s
        # Every value the layout carries: each entry of the batch has it.
        self.values = values
        self._seq: Vector | None = None
        self._id_ms: Vector | None = None
        self._id_seq: Vector | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def seq(self) -> Vector:
        """seq as floats (`float(int(text))`: the digits only, so `float(text)` is the same)."""
        if self._seq is None:
            self._seq = np.fromiter(map(float, self.seq_text), np.float64, len(self.ids))
        return self._seq

    @property
    def id_ms(self) -> Vector:
        """The entry ids' millisecond parts (as `float(ms)` in `feed`)."""
        if self._id_ms is None:
            parts = "-".join(self.ids).split("-")
            self._id_ms = np.fromiter(map(float, parts[0::2]), np.float64, len(self.ids))
            self._id_seq = np.fromiter(map(float, parts[1::2]), np.float64, len(self.ids))
        return self._id_ms

    @property
    def id_seq(self) -> Vector:
        self.id_ms  # noqa: B018 (computes both parts)
        assert self._id_seq is not None
        return self._id_seq

    def sample(self, pos: int) -> Sample:
        """The entry at `pos` as `decode_entry` decodes it."""
        values = {name: float(column[pos]) for name, column in self.values.items()}
        ts = self.ts[pos]
        return Sample(self.ids[pos], self.route, self.assets[pos], int(self.seq_text[pos]),
                      ts if isinstance(ts, str) else ts.decode(), float(self.time_s[pos]),
                      values)  # fmt: skip


class Picked(Sequence[Sample]):
    """The samples of `columns` at `positions`, each made when asked for."""

    __slots__ = ("_columns", "_positions")

    def __init__(self, columns: Columns, positions: Sequence[int]) -> None:
        self._columns = columns
        self._positions = positions

    def __len__(self) -> int:
        return len(self._positions)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Sample]: ...
    def __getitem__(self, index: int | slice) -> Sample | Sequence[Sample]:
        if isinstance(index, slice):
            return [self._columns.sample(pos) for pos in self._positions[index]]
        return self._columns.sample(self._positions[index])

    def __iter__(self) -> Iterator[Sample]:
        return map(self._columns.sample, self._positions)


def decode_columns(route: str, entries: Sequence[tuple[str, Fields | None]]) -> Columns | None:
    """`entries` (flat field lists, as `workers.streams.read_new` answers, decoded or not) as
    columns, or None where the batch must be decoded entry by entry (see the module's docstring).
    Of a reply not decoded, the ids and assets are decoded here; the numbers are parsed from the
    bytes (`float(b"1.5")` is `float("1.5")`)."""
    if isinstance(entries, NewEntries):
        return _columns(route, entries.raw, b"")
    return _columns(route, entries, "")


def _columns(route: str, entries: Sequence[tuple[T, Any]], empty: T) -> Columns | None:
    found = _one_layout(entries)
    if found is None:
        return None
    flat, width, (at_asset, at_seq, at_ts, at_values) = found
    n = len(entries)
    assets = flat[at_asset::width]
    seq_text = flat[at_seq::width]
    digits = empty.join(seq_text)
    if not (all(assets) and all(seq_text) and digits.isascii() and digits.isdigit()):
        return None
    ts = flat[at_ts::width]
    try:
        time_s = np.fromiter(map(float, ts), np.float64, n)
        values = {name: np.fromiter(map(float, flat[at::width]), np.float64, n)
                  for name, at in at_values}  # fmt: skip
    except ValueError:
        return None
    if not np.isfinite(time_s).all() or not all(np.isfinite(v).all() for v in values.values()):
        return None
    entry_ids = [entry_id for entry_id, _ in entries]
    if isinstance(empty, bytes):
        # Of a reply not decoded, the ids and assets are kept as text.
        try:
            ids, names = list(map(bytes.decode, entry_ids)), list(map(bytes.decode, assets))
        except UnicodeDecodeError:
            return None  # entry by entry, where decoding fails as it does for a decoded reply
    else:
        ids, names = entry_ids, assets
    return Columns(route, ids, names, seq_text, ts, time_s, values)


def _one_layout(entries: Sequence[tuple[T, Any]]) -> tuple[list[T], int, Layout] | None:
    """Every entry's fields in one flat list, the fields per entry and their layout, if every
    entry has the same field names in the same order and the layout is one the fast paths
    decode; else None."""
    n = len(entries)
    first = entries[0][1] if n >= COLUMNS_FROM else None
    if not isinstance(first, list):
        return None
    width = len(first)
    names = first[0::2]
    try:
        layout = layout_of(tuple(n if isinstance(n, str) else n.decode() for n in names))
    except UnicodeDecodeError:
        return None
    if layout[0] < 0:
        return None
    try:
        flat: list[T] = list(chain.from_iterable(fields for _, fields in entries))
    except TypeError:  # an entry without fields
        return None
    if len(flat) != width * n or flat[0::2] != names * n:
        return None
    return flat, width, layout
