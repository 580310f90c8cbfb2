"""Batches decoded column-wise (`workers.columns`) against entry by entry: the same samples, the
same events, state and checkpoint, the same dead letters; and the state of batches sent but not
yet known to be written (`ShardState.seal`, `rollback_all`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, cast

import pytest

from config.settings import DetectorSettings, FlatlineRule, SequenceGapRule, StalenessRule
from workers import columns
from workers.anomaly import AnomalyEvent
from workers.columns import decode_columns
from workers.detectors import build_checks
from workers.processing import MALFORMED, Delivery, process, sweep
from workers.sample import decode_entry
from workers.state import Engine, Shard, ShardState
from workers.streams import Entry, NewEntries

SHARD = Shard("telemetry", 0, "p:tel:telemetry", "p:lease", "p:state")
SETTINGS = DetectorSettings(
    flatline=[FlatlineRule(value="vibration", samples=20, duration_s=25.0)],
    staleness=[StalenessRule(silent_s=2.0)],
    sequence_gap=[SequenceGapRule(reorder_window=5)],
)


def flat(asset: str, seq: int, ts: float, **values: float | str) -> list[str]:
    """An entry's fields as the flat list XREADGROUP answers, in the bridge's layout."""
    fields = ["asset", asset, "seq", str(seq), "ts", repr(ts), "topic", f"p/{asset}/telemetry",
              "route", "telemetry", "rx", repr(ts + 0.01), "site", "s1", "line", "l1"]  # fmt: skip
    for name, value in values.items():
        fields += [f"v.{name}", value if isinstance(value, str) else repr(value)]
    return fields


def fleet(seed: int, assets: int, steps: int) -> list[Entry]:
    """Entries of a fleet with every kind of anomaly (spikes, stuck readings, seq jumps, repeats
    and restarts, device time going back), some assets more than once in a row of entries."""
    rng = random.Random(seed)
    out: list[Entry] = []
    for step in range(steps):
        for a in rng.sample(range(assets), assets):
            kind = rng.random()
            seq = max(0, step + (rng.randrange(-12, 30) if kind < 0.02 else 0))
            ts = 1_700_000_000.0 + step + (rng.uniform(-3, 0) if kind > 0.99 else rng.random() / 3)
            values = {
                "temperature": 50 + 5 * rng.gauss(0, 1) + (60 if 0.02 < kind < 0.04 else 0),
                "vibration": 2.0 if a % 7 == 0 and step % 40 < 35 else rng.gauss(2, 0.2),
                "pressure": rng.gauss(4, 0.1) + (30 * rng.random() if kind > 0.985 else 0),
            }
            n = len(out)
            out.append((f"{1_700_000_000_000 + 1000 * step + n % 997}-{n % 3}",
                        flat(f"a{a}", seq, ts, **values)))  # fmt: skip
    return out


def as_read(entries: list[Entry]) -> NewEntries:
    """`entries` as a reply read without decoding holds them."""
    return NewEntries([(i.encode(), [f.encode() for f in cast("list[str]", fields)])
                       for i, fields in entries])  # fmt: skip


def run(entries: list[Entry], batch: int, read: bool = False) -> tuple[list[Any], dict[str, bytes]]:
    """Every batch through `process` and committed: (each batch's outputs, the final rows);
    `read`: each batch as a reply read without decoding holds it."""
    state = ShardState(SHARD, Engine(build_checks(SETTINGS)))
    seen: list[Any] = []
    for start in range(0, len(entries), batch):
        part = entries[start : start + batch]
        result = process([Delivery(state, as_read(part) if read else part)], 3, {})
        out = result.outputs
        events = [event for _, event in out.events]
        seen.append((events, out.acks, out.checkpoints, out.dead_letters, out.processed))
        state.committed(events, *out.positions[SHARD])
        if start % (5 * batch) == 0:  # every asset silent for 2.5 s: staleness
            timed, _ = sweep([(state, state.watermark_ms + 2500)])
            stale = [event for _, event in timed.events]
            seen.append((stale, timed.checkpoints))
            state.committed(stale, state.last_id, state.watermark_ms)
    return seen, {asset: state.assets[asset].row.tobytes() for asset in sorted(state.assets)}


@pytest.mark.parametrize("read", [False, True], ids=["text", "bytes"])
@pytest.mark.parametrize("batch", [40, 500])
def test_batches_decoded_column_wise_give_what_entry_by_entry_gives(
    batch: int, read: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    entries = fleet(seed=5, assets=120, steps=60)
    assert decode_columns("telemetry", entries[:batch]) is not None
    assert decode_columns("telemetry", as_read(entries[:batch])) is not None
    got = run(entries, batch, read)
    monkeypatch.setattr(columns, "COLUMNS_FROM", 10**9)  # entry by entry only
    assert decode_columns("telemetry", entries[:batch]) is None
    assert decode_columns("telemetry", as_read(entries[:batch])) is None
    expected = run(entries, batch)
    kinds = {(e.detector, e.event.value) for outputs in expected[0] for e in outputs[0]}
    assert len(kinds) == 12  # every detector opened and ended anomalies
    assert got == expected


@pytest.mark.parametrize("read", [False, True], ids=["text", "bytes"])
def test_a_batch_decoded_column_wise_holds_the_samples_decode_entry_makes(read: bool) -> None:
    entries = fleet(seed=2, assets=50, steps=2)
    batch = decode_columns("telemetry", as_read(entries) if read else entries)
    assert batch is not None
    assert len(batch) == 100
    expected = [decode_entry("telemetry", entry_id, fields) for entry_id, fields in entries]
    assert [batch.sample(pos) for pos in range(100)] == expected


@pytest.mark.parametrize(
    ("asset", "seq", "ts", "temperature"),
    [
        ("", "7", "1700000000.5", "20.5"),  # no asset
        ("a", "-7", "1700000000.5", "20.5"),  # negative seq
        ("a", "7.5", "1700000000.5", "20.5"),  # not an integer
        ("a", " 7", "1700000000.5", "20.5"),  # int() takes it; the entry-by-entry path decides
        ("a", "7", "soon", "20.5"),
        ("a", "7", "inf", "20.5"),
        ("a", "7", "1700000000.5", "nan"),
        ("a", "7", "1700000000.5", "hot"),
    ],
)
@pytest.mark.parametrize("read", [False, True], ids=["text", "bytes"])
def test_a_batch_with_one_entry_out_of_the_ordinary_goes_entry_by_entry(
    asset: str, seq: str, ts: str, temperature: str, read: bool
) -> None:
    entries = fleet(seed=1, assets=40, steps=1)
    odd = flat("x", 0, 1.0, temperature=1.0, vibration=1.0, pressure=1.0)
    odd[1], odd[3], odd[5], odd[17] = asset, seq, ts, temperature
    entries[17] = ("9-9", odd)
    batch: Sequence[Entry] = as_read(entries) if read else entries
    assert decode_columns("telemetry", batch) is None
    result = process([Delivery(ShardState(SHARD, Engine(build_checks(SETTINGS))), batch)], 3, {})
    # Whatever entry-by-entry decoding makes of it, the other 39 entries are processed.
    assert result.outputs.processed["telemetry"] in (39, 40)
    assert len(result.outputs.acks[SHARD]) == 40
    letters = [letter for _, reason, letter in result.outputs.dead_letters if reason == MALFORMED]
    assert [letter["source_id"] for letter in letters] == (
        [] if result.outputs.processed["telemetry"] == 40 else ["9-9"]
    )


def test_a_batch_of_several_layouts_or_without_fields_goes_entry_by_entry() -> None:
    entries = fleet(seed=1, assets=40, steps=1)
    other = list(entries)
    other[3] = ("9-9", flat("x", 0, 1.0, temperature=1.0))  # fewer values
    assert decode_columns("telemetry", other) is None
    swapped = list(entries)
    fields = list(swapped[3][1] or [])
    fields[0:4] = fields[2:4] + fields[0:2]  # same names, another order
    swapped[3] = ("9-9", fields)
    assert decode_columns("telemetry", swapped) is None
    trimmed: list[Entry] = [*entries[:3], ("9-9", None), *entries[4:]]
    assert decode_columns("telemetry", trimmed) is None
    assert decode_columns("telemetry", entries[: columns.COLUMNS_FROM - 1]) is None


def rows(state: ShardState) -> dict[str, bytes]:
    return {asset: state.assets[asset].row.tobytes() for asset in sorted(state.assets)}


def test_batches_sent_and_not_written_roll_back_to_the_last_written() -> None:
    entries = fleet(seed=4, assets=60, steps=6)
    state = ShardState(SHARD, Engine(build_checks(SETTINGS)))
    events: list[AnomalyEvent] = []
    first = process([Delivery(state, entries[:120])], 3, {}).outputs
    state.committed([e for _, e in first.events], *first.positions[SHARD])
    written = rows(state)
    # Two batches on top, the first sent (sealed), the second processed: neither written.
    process([Delivery(state, entries[120:240])], 3, {})
    state.seal()
    process([Delivery(state, [*entries[240:300], ("9-9", flat("new", 0, 1.0, temperature=1.0,
                                                          vibration=1.0, pressure=1.0))])], 3, {})  # fmt: skip
    assert "new" in state.assets
    assert rows(state) != written
    state.rollback_all()
    assert rows(state) == written
    assert "new" not in state.assets
    # Sent and written, then the next one not: back to the state after the written one.
    second = process([Delivery(state, entries[120:240])], 3, {}).outputs
    state.seal()
    after_second = rows(state)
    process([Delivery(state, entries[240:360])], 3, {})
    state.committed(events, *second.positions[SHARD])
    state.rollback()
    assert rows(state) == after_second


def test_assets_no_check_applies_to_are_kept_and_checkpointed_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entries = fleet(seed=6, assets=40, steps=3)

    def outputs() -> Any:
        state = ShardState(SHARD, Engine([]))
        out = process([Delivery(state, entries)], 3, {}).outputs
        return out.acks, out.checkpoints, out.processed, sorted(state.assets)

    got = outputs()
    monkeypatch.setattr(columns, "COLUMNS_FROM", 10**9)
    assert got == outputs()
    assert len(got[1][SHARD]) == 41  # every asset and the meta field
