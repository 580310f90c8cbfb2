from __future__ import annotations

import json
from pathlib import Path

from workers.score import Flag, Truth, flags_from, read_truth, score


def _flag(asset: str, detector: str, value: str | None, ts: float, delay: float = 0.1) -> Flag:
    return Flag(asset, detector, value, ts, ts + delay)


def test_recall_precision_and_latency_per_kind() -> None:
    truths = [
        Truth("spike", "a1", "temperature", 100.0, 103.0, "anomaly"),
        Truth("spike", "a2", "temperature", 200.0, 203.0, "anomaly"),
        Truth("dropout", "a3", None, 300.0, 390.0, "anomaly"),
        Truth("restart", "a4", None, 400.0, 400.0, "fault"),
    ]
    flags = [
        _flag("a1", "threshold", "temperature", 100.5),
        _flag("a1", "rate", "temperature", 100.5),
        _flag("a9", "threshold", "temperature", 50.0),  # nothing injected on a9: a false flag
        _flag("a1", "threshold", "vibration", 101.0),  # another value: not this event
        _flag("a3", "staleness", None, 360.0),
        _flag("a4", "sequence_gap", None, 401.0),  # during a fault: excused
    ]
    report = score(truths, flags)
    assert report["spike"]["events"] == 2
    assert report["spike"]["detected"] == 1
    assert report["spike"]["recall"] == 0.5
    assert report["spike"]["flags"] == 2
    assert report["spike"]["false_flags"] == 2  # a9 and the vibration flag
    assert report["spike"]["precision"] == 0.5
    # A staleness flag's ts is the last sample before the silence: no publish-to-flag latency.
    assert report["dropout"] == {
        "events": 1, "detected": 1, "recall": 1.0, "flags": 1, "false_flags": 0, "precision": 1.0,
        "detection_latency_s": {"p50": 60.1, "p99": 60.1},
    }  # fmt: skip
    assert report["publish_to_flag_s"]["p99"] == 0.1
    assert report["false_flags_total"] == 2


def test_reading_ground_truth_and_the_anomaly_stream(tmp_path: Path) -> None:
    path = tmp_path / "truth.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"category": "anomaly", "kind": "stuck", "asset": "a1", "value": "pressure", "start": 10.0, "end": 70.0},
        {"category": "anomaly", "kind": "dropout", "asset": "a2", "value": None, "start": None, "end": None},
    ]))  # fmt: skip
    assert read_truth(path) == [Truth("stuck", "a1", "pressure", 10.0, 70.0, "anomaly")]
    entries = [
        (
            "1000-0",
            {
                "event": "start",
                "asset": "a1",
                "detector": "flatline",
                "value_name": "pressure",
                "ts": "40.0",
            },
        ),
        (
            "2000-0",
            {
                "event": "ended",
                "asset": "a1",
                "detector": "flatline",
                "value_name": "pressure",
                "ts": "71.0",
            },
        ),
    ]
    assert list(flags_from(entries)) == [Flag("a1", "flatline", "pressure", 40.0, 1.0)]
