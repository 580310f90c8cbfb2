"""The worker's pure parts: the threshold detector, the anomaly record and entry decoding."""

from __future__ import annotations

import pytest

from config.errors import PayloadRejected
from config.settings import ThresholdRule
from workers.anomaly import AnomalyEvent, Event
from workers.detectors import Sample, decode_entry
from workers.detectors.threshold import ThresholdDetector

RULES = [
    ThresholdRule(value="temperature", min=-20.0, max=90.0, severity="critical"),
    ThresholdRule(value="vibration", max=8.0),
]


def sample(entry_id: str, asset: str = "a1", **values: float) -> Sample:
    return Sample(
        entry_id=entry_id, route="telemetry", asset=asset, seq=0, ts="1700000000.5", values=values
    )


def summary(events: list[AnomalyEvent]) -> list[tuple[str, str, str, float, float, str]]:
    return [(e.event, e.asset, e.value_name, e.value, e.bound, e.source_id) for e in events]


def test_a_value_hovering_above_max_is_one_anomaly_until_it_returns() -> None:
    detector = ThresholdDetector(RULES)
    assert detector.feed(sample("1-0", temperature=50.0)) == []

    events = [
        e for i in range(50) for e in detector.feed(sample(f"{i + 2}-0", temperature=95 + i % 3))
    ]

    assert summary(events) == [("start", "a1", "temperature", 95.0, 90.0, "2-0")]
    assert detector.active == 1
    ended = detector.feed(sample("99-0", temperature=70.0))
    assert summary(ended) == [("ended", "a1", "temperature", 70.0, 90.0, "99-0")]
    assert detector.active == 0
    assert detector.feed(sample("100-0", temperature=71.0)) == []


def test_below_min_starts_and_ends_with_the_min_bound() -> None:
    detector = ThresholdDetector(RULES)
    started = detector.feed(sample("1-0", temperature=-25.0))
    assert detector.feed(sample("2-0", temperature=-30.0)) == []
    ended = detector.feed(sample("3-0", temperature=0.0))
    assert summary(started + ended) == [
        ("start", "a1", "temperature", -25.0, -20.0, "1-0"),
        ("ended", "a1", "temperature", 0.0, -20.0, "3-0"),
    ]


def test_the_bounds_themselves_are_in_range() -> None:
    detector = ThresholdDetector(RULES)
    assert detector.feed(sample("1-0", temperature=90.0, vibration=8.0)) == []
    assert detector.feed(sample("2-0", temperature=-20.0)) == []


def test_a_jump_across_the_range_ends_one_anomaly_and_starts_another() -> None:
    detector = ThresholdDetector(RULES)
    detector.feed(sample("1-0", temperature=95.0))
    events = detector.feed(sample("2-0", temperature=-40.0))
    assert summary(events) == [
        ("ended", "a1", "temperature", -40.0, 90.0, "2-0"),
        ("start", "a1", "temperature", -40.0, -20.0, "2-0"),
    ]


def test_state_is_kept_per_asset_and_value() -> None:
    detector = ThresholdDetector(RULES)
    assert len(detector.feed(sample("1-0", "a1", temperature=95.0))) == 1
    assert detector.feed(sample("2-0", "a2", temperature=50.0)) == []
    # a1's temperature anomaly does not hide a2's, nor a1's vibration one.
    assert len(detector.feed(sample("3-0", "a2", temperature=95.0))) == 1
    assert len(detector.feed(sample("4-0", "a1", temperature=96.0, vibration=9.0))) == 1
    assert detector.active == 3


def test_a_sample_without_the_value_leaves_its_state_alone() -> None:
    detector = ThresholdDetector(RULES)
    detector.feed(sample("1-0", temperature=95.0))
    assert detector.feed(sample("2-0", vibration=1.0)) == []
    assert detector.active == 1
    assert [e.event for e in detector.feed(sample("3-0", temperature=20.0))] == [Event.ENDED]


def test_severity_comes_from_the_rule() -> None:
    detector = ThresholdDetector(RULES)
    events = detector.feed(sample("1-0", temperature=100.0, vibration=12.0))
    assert {e.value_name: e.severity for e in events} == {
        "temperature": "critical",
        "vibration": "warning",
    }


def test_rollback_returns_to_the_checkpoint_so_a_redelivered_batch_flags_again() -> None:
    detector = ThresholdDetector(RULES)
    detector.checkpoint()
    first = detector.feed(sample("1-0", temperature=95.0))
    detector.rollback()
    assert detector.feed(sample("1-0", temperature=95.0)) == first


def test_an_event_is_laid_out_as_the_anomaly_record() -> None:
    [event] = ThresholdDetector(RULES).feed(sample("5-1", "pump-7", vibration=8.25))
    assert event.to_fields() == {
        "event": "start",
        "asset": "pump-7",
        "route": "telemetry",
        "detector": "threshold",
        "value_name": "vibration",
        "value": "8.25",
        "bound": "8.0",
        "ts": "1700000000.5",
        "source_id": "5-1",
        "severity": "warning",
    }


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


def test_a_telemetry_entry_decodes_to_a_sample() -> None:
    assert decode_entry("telemetry", "7-0", GOOD) == Sample(
        entry_id="7-0",
        route="telemetry",
        asset="pump-7",
        seq=12,
        ts="1700000000.25",
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
