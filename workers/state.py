"""Per-asset detector state of one telemetry stream (one shard of one route), its checkpoint, and
the rollback of a batch whose outputs could not be written.

Which checks apply to an asset is decided once, on its first sample: per detector and value, the
first rule matching the route and the asset id (`Engine.plan`). The asset's state is one flat
`array('d')` row holding every applied check's slots. A batch records the row of each asset it
touches before touching it; after the batch's transaction the touched rows are the checkpoint (one
Redis hash per stream, field `a.<asset>` = the row's bytes in base64, plus `meta`) and the images
are dropped, or, if the transaction failed, the images are put back, so entries delivered again
meet the state they met the first time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt
from pybase64 import b64encode_as_string

from config.keys import Keys
from workers.anomaly import AnomalyEvent, Event
from workers.columns import Columns
from workers.detectors.base import Check, Matrix, Row, SampleFailed
from workers.rounds import Keyed, run_columns, run_round
from workers.rows import AssetState, Table
from workers.sample import Sample

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
META_FIELD = "meta"
ASSET_PREFIX = "a."
_ROW_ITEM_BYTES = 8
# Below about this many assets a round costs more column-wise (about 160 µs a round of numpy
# calls with the default rules) than sample by sample (4.4 µs a sample). Measured with the default
# rules, per sample: rounds of 24 assets 7.8 against 4.4 µs, of 32 6.3 against 4.4, of 64 3.6.
COLUMNS_FROM = 48
# A row kept with the others of its table (`ShardState._image`), not as its own bytes; never a
# row's bytes (a multiple of 8 long).
_IMAGED = b"\0"


# Rows of one table kept in one copy: (table, row indexes, their values).
_Kept: TypeAlias = tuple[Table, npt.NDArray[np.intp], Matrix]


def _order(key: Keyed) -> tuple[int, int, int]:
    return key[0], key[1], key[2]


@dataclass(frozen=True, slots=True)
class Shard:
    """One telemetry stream of a group's work: the unit of ownership (lease) and of checkpoints."""

    route: str
    index: int
    stream: str
    lease: str
    checkpoint: str


def shards_of(keys: Keys, group: str, routes: Sequence[str]) -> list[Shard]:
    return [
        Shard(
            route=route,
            index=index,
            stream=keys.telemetry(route, index),
            lease=keys.worker_lease(group, route, index),
            checkpoint=keys.worker_checkpoint(group, route, index),
        )
        for route in routes
        for index in range(keys.shards)
    ]


Feed = Callable[[Row, int, Sample, float, list[AnomalyEvent]], None]


class Plan:
    """The checks applied to an asset, each with the offset of its slots in the asset's row.

    For the per-sample loop the checks are grouped by the value they read (one dict lookup per
    value, not per check) and their `feed` methods bound once (measured: a third of the loop's
    own time went to looking them up per sample)."""

    __slots__ = ("by_value", "checks", "initial", "order", "timed", "whole", "width")

    def __init__(self, checks: Sequence[Check]) -> None:
        placed: list[tuple[Check, int]] = []
        initial: list[float] = []
        for check in checks:
            placed.append((check, len(initial)))
            initial.extend(check.initial)
        self.checks = tuple(placed)
        by_value: dict[str, list[tuple[Feed, int]]] = {}
        for check, at in placed:
            if check.value is not None:
                by_value.setdefault(check.value, []).append((check.feed, at))
        self.by_value = tuple((name, tuple(feeds)) for name, feeds in by_value.items())
        self.whole = tuple((check.feed, at) for check, at in placed if check.value is None)
        # The checks in the order `feed` runs them, for the column-wise path (`workers.rounds`).
        self.order = tuple(
            [
                (check, at)
                for name, _ in self.by_value
                for check, at in placed
                if check.value == name
            ]
            + [(check, at) for check, at in placed if check.value is None]
        )
        self.timed = tuple((check, at) for check, at in placed if check.timed)
        self.initial = initial
        self.width = len(initial)


class Engine:
    """The configured checks, and the plan of each asset (shared by assets that match alike)."""

    def __init__(self, checks: Sequence[Check], columns_from: int = COLUMNS_FROM) -> None:
        """`columns_from`: the fewest assets of one plan in a round that run column-wise."""
        self.checks = tuple(checks)
        self.columns_from = columns_from
        self._plans: dict[tuple[int, ...], Plan] = {}
        layout = "|".join(check.layout() for check in self.checks)
        # Saved rows are only restored under the same layout; thresholds may change freely.
        self.layout = hashlib.sha256(layout.encode()).hexdigest()[:16]

    def plan(self, route: str, asset: str) -> Plan:
        taken: set[tuple[str, str | None]] = set()
        chosen: list[int] = []
        for index, check in enumerate(self.checks):
            key = (check.detector, check.value)
            if key not in taken and check.matches(route, asset):
                taken.add(key)
                chosen.append(index)
        signature = tuple(chosen)
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plans[signature] = Plan([self.checks[i] for i in chosen])
        return plan


def _rounds(names: Sequence[str], states: Sequence[AssetState]) -> list[dict[Plan, list[int]]]:
    """The positions of round k (the k-th entry of each asset), by plan."""
    first = states[0].plan
    if len(set(names)) == len(names) and all(s.plan is first for s in states):
        # The usual batch of a large fleet: one round, one plan.
        return [{first: list(range(len(names)))}]
    seen: dict[str, int] = {}
    rounds: list[dict[Plan, list[int]]] = []
    for pos, asset in enumerate(names):
        k = seen.get(asset, 0)
        seen[asset] = k + 1
        if k == len(rounds):
            rounds.append({})
        rounds[k].setdefault(states[pos].plan, []).append(pos)
    return rounds


class ShardState:
    """The state of every asset of one shard, owned by this worker while it holds the lease."""

    def __init__(self, shard: Shard, engine: Engine) -> None:
        self.shard = shard
        self._engine = engine
        self.assets: dict[str, AssetState] = {}
        self._tables: dict[Plan, Table] = {}
        # The last entry reflected in the state, and the stream time it reached (entry id ms).
        self.last_id = "0-0"
        self.watermark_ms = 0
        # Anomalies open in the committed state, by detector.
        self.open: Counter[str] = Counter()
        # Rows as they were before the current batch touched them (None: new in this batch;
        # _IMAGED: kept in `_images`, with the other rows of its table kept in one step).
        self._before: dict[str, bytes | None] = {}
        self._images: list[_Kept] = []
        # The same of the batches sent and not yet known to be written, oldest first.
        self._sent: list[tuple[dict[str, bytes | None], list[_Kept]]] = []

    def feed(self, sample: Sample, out: list[AnomalyEvent]) -> None:
        """Run one sample through its asset's checks; its events are appended to `out`."""
        asset = sample.asset
        state = self.assets.get(asset)
        if state is None:
            state = self._add(asset)
        elif asset not in self._before:
            self._before[asset] = state.row.tobytes()
        row = state.row
        plan = state.plan
        values = sample.values
        for name, feeds in plan.by_value:
            value = values.get(name)
            if value is not None:
                for feed, at in feeds:
                    feed(row, at, sample, value, out)
        for feed, at in plan.whole:
            feed(row, at, sample, 0.0, out)

    def feed_batch(self, samples: Sequence[Sample], out: list[AnomalyEvent]) -> None:
        """`feed` each of `samples`, in order: the same state and the same events in the same
        order. The batch is cut in rounds (round k: the k-th sample of each asset in it); the
        assets of a round that share a plan run column-wise when there are enough of them
        (`workers.rounds`). A check that raises names its sample (`SampleFailed`)."""
        assets = self.assets
        before = self._before
        seen: dict[str, int] = {}
        rounds: list[dict[Plan, list[int]]] = []
        for pos, sample in enumerate(samples):
            asset = sample.asset
            state = assets.get(asset)
            if state is None:
                state = self._add(asset)
            elif asset not in before:
                before[asset] = state.row.tobytes()
            k = seen.get(asset, 0)
            seen[asset] = k + 1
            if k == len(rounds):
                rounds.append({})
            rounds[k].setdefault(state.plan, []).append(pos)
        keyed: list[Keyed] = []
        for groups in rounds:
            for plan, positions in groups.items():
                if len(positions) >= self._engine.columns_from and plan.order:
                    states = [assets[samples[pos].asset] for pos in positions]
                    done = len(keyed)
                    try:
                        run_round(plan, self._tables[plan], states, samples, positions, keyed)
                        continue
                    except SampleFailed:
                        raise
                    except Exception:
                        # The rows are written back only at the round's end: they are as before.
                        log.exception("column-wise round failed, running it sample by sample")
                        del keyed[done:]
                for pos in positions:
                    events: list[AnomalyEvent] = []
                    try:
                        self.feed(samples[pos], events)
                    except Exception as exc:
                        raise SampleFailed(samples[pos], exc) from exc
                    keyed.extend((pos, 0, n, event) for n, event in enumerate(events))
        if keyed:
            keyed.sort(key=_order)
            out.extend(key[3] for key in keyed)

    def feed_columns(self, batch: Columns, out: list[AnomalyEvent]) -> None:
        """`feed_batch` for a batch decoded column-wise (`workers.columns`): the same state and
        the same events in the same order, with a `Sample` made only for an entry that goes
        through `Check.feed` by itself."""
        assets = self.assets
        names = batch.assets
        try:
            placed = [assets[asset] for asset in names]
        except KeyError:
            # A new asset may come twice in the batch: added once.
            placed = [assets.get(asset) or self._add(asset) for asset in names]
        rounds = _rounds(names, placed)
        rows = self._image(names, placed, whole=len(rounds) == 1 and len(rounds[0]) == 1)
        keyed: list[Keyed] = []
        for groups in rounds:
            for plan, positions in groups.items():
                if not plan.checks:
                    continue  # an asset no check applies to: nothing to run
                if len(positions) >= self._engine.columns_from and plan.order:
                    done = len(keyed)
                    try:
                        run_columns(plan, self._tables[plan], [placed[p] for p in positions],
                                    batch, positions, keyed, rows)  # fmt: skip
                        continue
                    except SampleFailed:
                        raise
                    except Exception:
                        log.exception("column-wise round failed, running it sample by sample")
                        del keyed[done:]
                for pos in positions:
                    sample = batch.sample(pos)
                    events: list[AnomalyEvent] = []
                    try:
                        self.feed(sample, events)
                    except Exception as exc:
                        raise SampleFailed(sample, exc) from exc
                    keyed.extend((pos, 0, n, event) for n, event in enumerate(events))
        if keyed:
            keyed.sort(key=_order)
            out.extend(key[3] for key in keyed)

    def _image(
        self, names: Sequence[str], states: Sequence[AssetState], whole: bool = False
    ) -> npt.NDArray[np.intp] | None:
        """Keep the rows of the assets `names` (their `states`) not yet kept in this batch, one
        copy per table, for a rollback (one numpy step, not a `tobytes()` per asset). `whole`:
        the assets are distinct and of one plan; then, if none was kept yet (the usual batch),
        their rows are gathered once, for this and for their round: returned."""
        before = self._before
        if whole and not before:
            table = states[0].table
            rows = np.fromiter([state.index for state in states], np.intp, len(states))
            self._images.append((table, rows, table.data[rows]))
            self._before = dict.fromkeys(names, _IMAGED)
            return rows
        fresh = {asset: state for asset, state in zip(names, states, strict=True)
                 if asset not in before}  # fmt: skip
        if not fresh:
            return None
        by_table: dict[Table, list[int]] = {}
        for state in fresh.values():
            by_table.setdefault(state.table, []).append(state.index)
        for table, indexes in by_table.items():
            rows = np.fromiter(indexes, np.intp, len(indexes))
            self._images.append((table, rows, table.data[rows]))
        before.update(dict.fromkeys(fresh, _IMAGED))
        return None

    def sweep(self, now_ms: int, out: list[AnomalyEvent]) -> None:
        """Run the time-driven checks of every asset at stream time `now_ms`."""
        route = self.shard.route
        for asset, state in self.assets.items():
            for check, at in state.plan.timed:
                before = len(out)
                image = state.row.tobytes()
                check.sweep(state.row, at, asset, route, now_ms, out)
                if len(out) != before:
                    self._before.setdefault(asset, image)

    def _add(self, asset: str) -> AssetState:
        plan = self._engine.plan(self.shard.route, asset)
        state = self.assets[asset] = self._table(plan).add(plan, plan.initial)
        self._before[asset] = None
        return state

    def _table(self, plan: Plan) -> Table:
        table = self._tables.get(plan)
        if table is None:
            table = self._tables[plan] = Table(plan.width)
        return table

    def checkpoint_fields(self, last_id: str, watermark_ms: int) -> dict[str, str]:
        """The checkpoint of the current batch: the rows it touched, and where it got to."""
        assets = self.assets
        # pybase64 reads the row in place: no bytes copy of it, and no decode of the text.
        fields = {ASSET_PREFIX + asset: b64encode_as_string(assets[asset].row)
                  for asset in self._before}  # fmt: skip
        meta = {"v": CHECKPOINT_VERSION, "layout": self._engine.layout, "last_id": last_id,
                "watermark_ms": watermark_ms}  # fmt: skip
        fields[META_FIELD] = json.dumps(meta, separators=(",", ":"))
        return fields

    def committed(self, events: Sequence[AnomalyEvent], last_id: str, watermark_ms: int) -> None:
        """The oldest batch not yet written (the one sent first, else the current one) was
        written: its state is the checkpoint now."""
        if self._sent:
            del self._sent[0]
        else:
            self._before.clear()
            self._images.clear()
        self.last_id = last_id
        self.watermark_ms = max(self.watermark_ms, watermark_ms)
        for event in events:
            self.open[event.detector] += 1 if event.event is Event.START else -1

    def seal(self) -> None:
        """The current batch is on its way to Redis: its kept rows are set apart until its outcome
        is known (`committed`, `rollback_all`), and the next batch keeps its own."""
        self._sent.append((self._before, self._images))
        self._before = {}
        self._images = []

    def rollback(self) -> None:
        """The current batch is not written: back to the state before it."""
        self._restore(self._before, self._images)
        self._before = {}
        self._images = []

    def rollback_all(self) -> None:
        """No batch not yet written will be: back to the state of the last one written."""
        self.rollback()
        while self._sent:
            self._restore(*self._sent.pop())

    def _restore(self, before: dict[str, bytes | None], images: list[_Kept]) -> None:
        # Each row was kept once, before the batch first touched it: the order does not matter.
        for table, rows, kept in images:
            table.data[rows] = kept
        for asset, image in before.items():
            state = self.assets[asset]
            if image is None:
                del self.assets[asset]
                state.table.remove(state)
            elif image is not _IMAGED:
                state.table.load(state, image)

    def restore(self, fields: Mapping[str, str]) -> None:
        """Load a checkpoint read with HGETALL (empty: a shard never checkpointed)."""
        meta = json.loads(fields[META_FIELD]) if META_FIELD in fields else {}
        self.last_id = str(meta.get("last_id", "0-0"))
        self.watermark_ms = int(meta.get("watermark_ms", 0))
        if meta and (meta.get("v"), meta.get("layout")) != (
            CHECKPOINT_VERSION,
            self._engine.layout,
        ):
            log.warning(
                "checkpoint saved under other detector rules, starting this shard's state afresh",
                extra={"stream": self.shard.stream, "last_id": self.last_id},
            )
            return
        skipped = 0
        for field, encoded in fields.items():
            if not field.startswith(ASSET_PREFIX):
                continue
            asset = field[len(ASSET_PREFIX) :]
            plan = self._engine.plan(self.shard.route, asset)
            data = base64.b64decode(encoded)
            if len(data) != plan.width * _ROW_ITEM_BYTES:
                skipped += 1
                continue
            state = self.assets[asset] = self._table(plan).add(plan, data)
            for check, at in plan.checks:
                if check.is_open(state.row, at):
                    self.open[check.detector] += 1
        if skipped:
            log.warning("checkpoint rows of the wrong size ignored", extra={"count": skipped})
