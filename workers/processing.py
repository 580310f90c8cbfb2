"""One batch through the detectors, without I/O: entries in, `Outputs` out.

Per entry, in order:
- a new entry (first delivery) at or before the shard's checkpoint is already in the state (the
  group was recreated under a kept checkpoint, or a batch read ahead was replayed from the pending
  list meanwhile): acked, not processed again;
- an entry delivered more than `max_deliveries` times is poison: dead-lettered and acked unread
  (a worker that crashes on it never gets to fail it; Redis' delivery count survives restarts);
- an entry that is not a valid record is dead-lettered and acked at once: it can never succeed;
- otherwise its sample runs through its asset's checks. If a check raises, the whole batch's state
  is rolled back and the batch is run again without that entry, which stays pending (not acked) and
  is claimed again after `claim_idle_ms`; when it fails on its `max_deliveries`-th delivery it is
  dead-lettered with the error. The other entries' outputs do not wait for it.

`sweep` runs the time-driven checks (staleness) the same way, with no entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bridge.record import entry_key, entry_ms
from config.errors import PayloadRejected
from workers.anomaly import AnomalyEvent
from workers.columns import decode_columns
from workers.detectors.base import SampleFailed
from workers.outputs import Outputs
from workers.sample import Fields, Sample, as_mapping, decode_entry
from workers.state import Shard, ShardState
from workers.streams import Entry

MALFORMED = "malformed"
POISON = "poison"
# Enough of the entry to find and replay it by hand.
_MAX_ENTRY_TEXT = 4096


@dataclass
class Delivery:
    """Entries of one shard from one read or claim, in id order."""

    state: ShardState
    entries: Sequence[Entry]
    # Delivery counts of claimed entries (XPENDING); None for a first delivery (XREADGROUP >).
    counts: Mapping[str, int] | None = None


@dataclass
class Result:
    outputs: Outputs
    # Entries whose processing raised and that stay pending for a retry: (stream, id) -> error.
    retrying: dict[tuple[str, str], str]
    # Poison entries dead-lettered in this batch: (stream, id).
    given_up: list[tuple[str, str]]


class _EntryFailed(Exception):
    def __init__(self, key: tuple[str, str], error: str) -> None:
        self.key = key
        self.error = error
        super().__init__(error)


def process(
    deliveries: Sequence[Delivery], max_deliveries: int, errors: Mapping[tuple[str, str], str]
) -> Result:
    """Run `deliveries` through their shards' states; `errors` are earlier failures of entries
    still pending, for the dead letter of one that is given up without running it again."""
    failed: dict[tuple[str, str], str] = {}
    while True:
        result = Result(Outputs(), {}, [])
        try:
            for delivery in deliveries:
                _run(delivery, result, failed, errors, max_deliveries)
        except _EntryFailed as failure:
            for delivery in deliveries:
                delivery.state.rollback()
            failed[failure.key] = failure.error
            continue
        return result


def _run(
    delivery: Delivery, result: Result, failed: Mapping[tuple[str, str], str],
    errors: Mapping[tuple[str, str], str], max_deliveries: int,
) -> None:  # fmt: skip
    state, counts = delivery.state, delivery.counts
    shard, outputs = state.shard, result.outputs
    acks = outputs.acks.setdefault(shard, [])
    events: list[AnomalyEvent] = []
    entries = delivery.entries
    # Entry ids only grow within a stream, so one comparison tells whether any needs the floor.
    floor = (
        entry_key(state.last_id)
        if counts is None and entries and entry_key(entries[0][0]) <= entry_key(state.last_id)
        else None
    )
    # Only a redelivery or a batch run again after a failure can meet a failed entry.
    settle = counts is not None or bool(failed)
    batch = None if floor is not None or settle else decode_columns(shard.route, entries)
    if batch is not None:
        # Every entry well-formed, in one layout: decoded column-wise, all acked with the batch.
        try:
            state.feed_columns(batch, events)
        except SampleFailed as failure:
            key = (shard.stream, failure.sample.entry_id)
            raise _EntryFailed(key, str(failure)) from failure.error
        acks.extend(batch.ids)
        _done(state, result, entries, len(batch), events)
        return
    samples: list[Sample] = []
    for entry_id, fields in entries:
        if floor is not None and entry_key(entry_id) <= floor:
            acks.append(entry_id)
            continue
        deliveries = 1 if counts is None else counts.get(entry_id, 1)
        if settle and _settled(
            result, shard, entry_id, fields, deliveries, failed, errors, max_deliveries
        ):
            continue
        try:
            sample = decode_entry(shard.route, entry_id, fields)
        except PayloadRejected as exc:
            _dead_letter(outputs, shard, entry_id, fields, MALFORMED, exc.detail, deliveries)
            acks.append(entry_id)
            continue
        samples.append(sample)
        # Acked only if the whole batch goes through: a failure runs it again without the entry.
        acks.append(entry_id)
    try:
        state.feed_batch(samples, events)
    except SampleFailed as failure:
        key = (shard.stream, failure.sample.entry_id)
        raise _EntryFailed(key, str(failure)) from failure.error
    _done(state, result, entries, len(samples), events)


def _done(
    state: ShardState, result: Result, entries: Sequence[Entry], processed: int,
    events: list[AnomalyEvent],
) -> None:  # fmt: skip
    """A delivery's outputs besides its acks: events, counts, checkpoint and position."""
    shard, outputs = state.shard, result.outputs
    outputs.processed_by_shard[shard] += processed
    outputs.events.extend((shard, event) for event in events)
    last_id, watermark = state.last_id, state.watermark_ms
    if entries and entry_key(entries[-1][0]) > entry_key(last_id):
        last_id = entries[-1][0]
        watermark = max(watermark, entry_ms(last_id))
    outputs.checkpoints[shard] = state.checkpoint_fields(last_id, watermark)
    outputs.positions[shard] = (last_id, watermark)


def _settled(
    result: Result, shard: Shard, entry_id: str, fields: Fields | None,
    deliveries: int, failed: Mapping[tuple[str, str], str], errors: Mapping[tuple[str, str], str],
    max_deliveries: int,
) -> bool:  # fmt: skip
    """Deal with an entry that failed or was delivered too often: dead-lettered (and acked) or
    left pending for a retry. False for an entry to process."""
    key = (shard.stream, entry_id)
    error = failed.get(key)
    if error is None and deliveries > max_deliveries:
        error = errors.get(key, "processing never completed")
    if error is None:
        return False
    if deliveries >= max_deliveries:
        _dead_letter(result.outputs, shard, entry_id, fields, POISON, error, deliveries)
        result.outputs.acks[shard].append(entry_id)
        result.given_up.append(key)
    else:
        result.retrying[key] = error
    return True


def sweep(clocks: Sequence[tuple[ShardState, int]]) -> tuple[Outputs, list[ShardState]]:
    """The time-driven checks of each shard at its stream time (ms): the outputs, and the shards
    whose state changed."""
    outputs = Outputs(timed=True)
    swept: list[ShardState] = []
    for state, now_ms in clocks:
        events: list[AnomalyEvent] = []
        state.sweep(now_ms, events)
        if events:
            swept.append(state)
            outputs.events.extend((state.shard, event) for event in events)
            position = (state.last_id, state.watermark_ms)
            outputs.checkpoints[state.shard] = state.checkpoint_fields(*position)
            outputs.positions[state.shard] = position
    return outputs, swept


def _dead_letter(
    outputs: Outputs, shard: Shard, entry_id: str, fields: Fields | None, reason: str,
    error: str, deliveries: int,
) -> None:  # fmt: skip
    letter = {
        "source_id": entry_id,
        "stream": shard.stream,
        "reason": reason,
        "error": error,
        "deliveries": str(deliveries),
        "entry": json.dumps(dict(as_mapping(fields or {})), separators=(",", ":"))[
            :_MAX_ENTRY_TEXT
        ],
    }
    outputs.dead_letters.append((shard, reason, letter))
