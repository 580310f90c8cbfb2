"""The worker's pure parts: entry decoding, the anomaly record, per-shard state (rollback and
checkpoints), batch processing (dead letters, retries, poison) and XAUTOCLAIM replies."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

from config.errors import PayloadRejected
from config.settings import DetectorSettings, StalenessRule, ThresholdRule
from workers.anomaly import AnomalyEvent
from workers.detectors import Check, build_checks
from workers.detectors.base import Row
from workers.detectors.threshold import ThresholdCheck
from workers.processing import Delivery, process, sweep
from workers.sample import Sample, decode_entry
from workers.state import Engine, Shard, ShardState
from workers.streams import Entry, parse_autoclaim

SHARD = Shard("telemetry", 0, "p:tel:telemetry", "p:lease", "p:state")
OTHER = Shard("telemetry", 1, "p:tel:telemetry:{1}", "p:lease:{1}", "p:state:{1}")
RULES = [
    ThresholdRule(value="temperature", min=-20.0, max=90.0, severity="critical"),
    ThresholdRule(value="vibration", max=8.0),
]

GOOD = {
    "asset": "pump-7",
    "seq": "12",
    "ts": "1700000000.25",
    "topic": "plant/s1/l1/pump-7/telemetry",
    "route": "telemetry",
    "rx": "1700000000.3",
    "site": "s1",
    "line": "l1",
    "v.temperature": "71.5",
    "v.vibration": "2",
}


def entry(seq: int, asset: str = "pump-7", **values: float) -> dict[str, str]:
    fields = {**GOOD, "asset": asset, "seq": str(seq), "ts": str(1_700_000_000 + seq)}
    fields.update({f"v.{name}": repr(value) for name, value in values.items()})
    return fields


def thresholds() -> Engine:
    return Engine([ThresholdCheck(rule) for rule in RULES])


# decoding


def test_a_telemetry_entry_decodes_to_a_sample() -> None:
    assert decode_entry("telemetry", "7-0", GOOD) == Sample(
        entry_id="7-0",
        route="telemetry",
        asset="pump-7",
        seq=12,
        ts="1700000000.25",
        time_s=1700000000.25,
        values={"temperature": 71.5, "vibration": 2.0},
    )


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"asset": None}, "missing field 'asset'"),
        ({"seq": None}, "missing field 'seq'"),
        ({"ts": None}, "missing field 'ts'"),
        ({"asset": ""}, "empty field 'asset'"),
        ({"seq": "-1"}, "seq is not an integer >= 0: '-1'"),
        ({"seq": "x" * 100}, "seq is not an integer >= 0: '" + "x" * 64 + "...'"),
        ({"ts": "yesterday"}, "ts is not a finite number: 'yesterday'"),
        ({"ts": "inf"}, "ts is not a finite number: 'inf'"),
        ({"v.temperature": "hot"}, "a value is not a number"),
        ({"v.temperature": "nan"}, "value 'temperature' is not finite"),
    ],
)
def test_a_malformed_entry_is_rejected_with_the_reason(
    change: dict[str, str | None], error: str
) -> None:
    fields = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(PayloadRejected) as caught:
        decode_entry("telemetry", "7-0", fields)
    assert caught.value.detail.startswith(error)


@pytest.mark.parametrize("fields", [None, {}])
def test_a_trimmed_pending_entry_is_rejected(fields: dict[str, str] | None) -> None:
    with pytest.raises(PayloadRejected, match="no longer in the stream"):
        decode_entry("telemetry", "7-0", fields)


# the anomaly record


def test_an_event_is_laid_out_as_the_anomaly_record() -> None:
    state = ShardState(SHARD, thresholds())
    out: list[AnomalyEvent] = []
    state.feed(decode_entry("telemetry", "5-1", entry(3, vibration=8.25)), out)
    [event] = out
    assert event.to_fields("p:tel:telemetry") == {
        "event": "start",
        "asset": "pump-7",
        "route": "telemetry",
        "detector": "threshold",
        "value_name": "vibration",
        "value": "8.25",
        "bound": "8.0",
        "score": "8.25",
        "ts": "1700000003",
        "stream": "p:tel:telemetry",
        "source_id": "5-1",
        "severity": "warning",
    }


# state: rollback and checkpoints


def feed(state: ShardState, *samples: tuple[str, dict[str, str]]) -> list[AnomalyEvent]:
    out: list[AnomalyEvent] = []
    for entry_id, fields in samples:
        state.feed(decode_entry("telemetry", entry_id, fields), out)
    return out


def test_rollback_returns_to_the_last_commit_so_a_redelivered_batch_flags_again() -> None:
    state = ShardState(SHARD, thresholds())
    feed(state, ("1-0", entry(1, temperature=50.0)))
    state.committed([], "1-0", 1)
    first = feed(state, ("2-0", entry(2, temperature=95.0)), ("3-0", entry(3, "new", vibration=9)))
    state.rollback()
    assert set(state.assets) == {"pump-7"}
    again = feed(state, ("2-0", entry(2, temperature=95.0)), ("3-0", entry(3, "new", vibration=9)))
    assert again == first
    assert len(first) == 2


def test_a_checkpoint_restores_the_state_on_another_worker() -> None:
    engine = Engine(build_checks(DetectorSettings()))
    first = ShardState(SHARD, engine)
    # The vibration of these entries never changes: a flatline opens at the 30th.
    events = feed(first, *((f"{i}-0", entry(i, temperature=50.0 + i % 3)) for i in range(1, 40)))
    events += feed(first, ("40-0", entry(40, temperature=95.0)))
    fields = first.checkpoint_fields("40-0", 40)
    first.committed(events, "40-0", 40)

    second = ShardState(SHARD, Engine(build_checks(DetectorSettings())))
    second.restore(fields)
    assert (second.last_id, second.watermark_ms) == ("40-0", 40)
    opened = {"threshold": 1, "deviation": 1, "rate": 1, "flatline": 1}
    assert second.open == first.open == opened
    later = [("41-0", entry(41, temperature=50.0)), ("42-0", entry(42, temperature=50.5))]
    assert feed(second, *later) == feed(first, *later)


def test_a_checkpoint_from_other_rules_is_not_restored() -> None:
    first = ShardState(SHARD, thresholds())
    feed(first, ("1-0", entry(1, temperature=95.0)))
    fields = first.checkpoint_fields("1-0", 1)
    second = ShardState(SHARD, Engine(build_checks(DetectorSettings())))
    second.restore(fields)
    assert (second.assets, second.last_id) == ({}, "1-0")


# batch processing


class Failing(Check):
    """Raises on samples of one asset: a detector bug, for the delivery-count path."""

    detector: ClassVar[str] = "failing"
    width: ClassVar[int] = 1
    initial: ClassVar[tuple[float, ...]] = (0.0,)
    open_slot: ClassVar[int] = 0

    def __init__(self, asset: str) -> None:
        super().__init__(ThresholdRule(value="temperature", max=1.0), None)
        self._asset = asset
        self.calls = 0

    def feed(self, st: Row, at: int, sample: Sample, value: float, out: list[AnomalyEvent]) -> None:
        if sample.asset == self._asset:
            self.calls += 1
            raise RuntimeError("boom")


def run(state: ShardState, entries: list[Entry], counts: dict[str, int] | None = None) -> Any:
    return process([Delivery(state, entries, counts)], 3, {})


def test_a_failing_entry_stays_pending_and_the_rest_of_the_batch_is_written() -> None:
    failing = Failing("bad")
    state = ShardState(SHARD, Engine([ThresholdCheck(RULES[0]), failing]))
    entries: list[Entry] = [("1-0", entry(1, temperature=95.0)), ("2-0", entry(2, "bad")),
                            ("3-0", entry(3, temperature=20.0)), ("4-0", {"asset": "x"})]  # fmt: skip
    result = run(state, entries)
    outputs = result.outputs
    assert outputs.acks == {SHARD: ["1-0", "3-0", "4-0"]}
    assert [(e.event.value, e.source_id) for _, e in outputs.events] == [
        ("start", "1-0"),
        ("ended", "3-0"),
    ]
    assert result.retrying == {(SHARD.stream, "2-0"): "RuntimeError: boom"}
    [(_, reason, letter)] = outputs.dead_letters
    assert (reason, letter["source_id"], letter["error"]) == (
        "malformed",
        "4-0",
        "missing field 'seq'",
    )
    assert outputs.positions[SHARD] == ("4-0", 4)
    assert json.loads(outputs.checkpoints[SHARD]["meta"])["last_id"] == "4-0"


def test_a_failure_on_the_last_allowed_delivery_is_dead_lettered_with_the_error() -> None:
    state = ShardState(SHARD, Engine([Failing("bad")]))
    result = run(state, [("2-0", entry(2, "bad"))], {"2-0": 3})
    [(_, reason, letter)] = result.outputs.dead_letters
    assert (reason, letter["error"], letter["deliveries"]) == ("poison", "RuntimeError: boom", "3")
    assert json.loads(letter["entry"])["asset"] == "bad"
    assert result.outputs.acks == {SHARD: ["2-0"]}
    assert result.given_up == [(SHARD.stream, "2-0")]


def test_an_entry_delivered_too_often_is_dead_lettered_without_running() -> None:
    failing = Failing("bad")
    state = ShardState(SHARD, Engine([failing]))
    result = process([Delivery(state, [("2-0", entry(2, "bad"))], {"2-0": 4})], 3,
                     {(SHARD.stream, "2-0"): "RuntimeError: earlier"})  # fmt: skip
    [(_, _, letter)] = result.outputs.dead_letters
    assert (letter["error"], failing.calls) == ("RuntimeError: earlier", 0)


def test_new_entries_at_or_before_the_checkpoint_are_acked_without_processing() -> None:
    state = ShardState(SHARD, thresholds())
    state.committed([], "5-0", 5)
    result = run(state, [("4-0", entry(4, temperature=99.0)), ("6-0", entry(6, temperature=99.0))])
    assert result.outputs.acks == {SHARD: ["4-0", "6-0"]}
    assert [e.source_id for _, e in result.outputs.events] == ["6-0"]


def test_a_sweep_writes_the_timed_events_with_the_checkpoint_of_the_shards_they_changed() -> None:
    engine = Engine(build_checks(DetectorSettings(staleness=[StalenessRule(silent_s=5.0)])))
    quiet, busy = ShardState(SHARD, engine), ShardState(OTHER, engine)
    feed(quiet, ("1000-0", entry(1)))
    feed(busy, ("1000-0", entry(1)))
    quiet.committed([], "1000-0", 1000)
    busy.committed([], "1000-0", 1000)
    outputs, swept = sweep([(quiet, 7000), (busy, 5000)])
    assert swept == [quiet]
    assert outputs.timed
    assert [(e.detector, e.event.value, e.source_id) for _, e in outputs.events] == [
        ("staleness", "start", "1000-0")
    ]
    assert set(outputs.checkpoints[SHARD]) == {"a.pump-7", "meta"}
    assert not outputs.acks


# XAUTOCLAIM replies


def test_autoclaim_replies_of_redis_6_and_7_are_both_read() -> None:
    six = parse_autoclaim(["0-0", [("1-0", {"a": "1"}), (None, None)]])
    assert (six.cursor, six.entries, six.deleted, six.done) == (
        "0-0",
        [("1-0", {"a": "1"})],
        [],
        True,
    )
    seven = parse_autoclaim(["5-0", [("2-0", {"a": "2"})], ["1-0"]])
    assert (seven.cursor, seven.entries, seven.deleted, seven.done) == (
        "5-0", [("2-0", {"a": "2"})], ["1-0"], False,
    )  # fmt: skip
