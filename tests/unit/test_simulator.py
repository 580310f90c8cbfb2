"""The simulator's pure parts: payloads, topics, the schedule and the publish counts."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from config.settings import RouteSettings, Settings, SimulatorSettings
from observability.metrics import SimulatorMetrics
from simulators.fleet import NORMAL_RANGES, Fleet, asset_id, topic_for
from simulators.schedule import Schedule
from simulators.stats import PublishStats

ROUTE = RouteSettings(name="telemetry", topic="tABC/plant/{site}/{line}/{asset}/telemetry")


def messages(settings: SimulatorSettings, route: RouteSettings = ROUTE) -> list[tuple[str, Any]]:
    """Every (topic, payload without ts) of a run, in schedule order."""
    fleet = Fleet(settings, route)
    schedule = Schedule(settings.assets, settings.rate_hz, settings.duration_s)
    out = []
    for number in range(schedule.total):
        index, seq = schedule.slot(number)
        topic, payload, _ = fleet.message(index, seq, ts=1_700_000_000.0)
        body = json.loads(payload)
        del body["ts"]
        out.append((topic, body))
    return out


def sim(**fields: Any) -> SimulatorSettings:
    return SimulatorSettings(**{"assets": 20, "rate_hz": 2.0, "duration_s": 5.0, **fields})


# --- payloads -------------------------------------------------------------------------------


def test_same_seed_same_messages() -> None:
    first = messages(sim(seed=7, anomaly_rate=0.05))
    assert first == messages(sim(seed=7, anomaly_rate=0.05))
    assert first != messages(sim(seed=8, anomaly_rate=0.05))


def test_payload_follows_the_contract() -> None:
    fleet = Fleet(sim(), ROUTE)
    _, payload, _ = fleet.message(3, 4, ts=1_700_000_000.25)
    body = json.loads(payload)
    assert set(body) == {"ts", "seq", "values"}
    assert body["ts"] == 1_700_000_000.25
    assert body["seq"] == 4
    assert set(body["values"]) == {"temperature", "vibration", "pressure"}


def test_seq_counts_from_zero_per_asset() -> None:
    seqs: dict[str, list[int]] = {}
    for topic, body in messages(sim(assets=5, rate_hz=4.0, duration_s=2.0)):
        seqs.setdefault(topic, []).append(body["seq"])
    assert len(seqs) == 5
    assert all(found == list(range(8)) for found in seqs.values())


def test_samples_depend_only_on_seed_asset_and_seq() -> None:
    small, large = Fleet(sim(assets=3), ROUTE), Fleet(sim(assets=50), ROUTE)
    # Out of order, and in a bigger fleet: the same message.
    for index, seq in [(2, 9), (0, 0), (1, 5), (2, 0)]:
        assert small.message(index, seq, 1.0) == large.message(index, seq, 1.0)


def test_values_stay_in_range_without_anomalies() -> None:
    settings = Settings()
    rules = settings.worker.detectors.threshold
    for _, body in messages(sim(assets=50, duration_s=20.0, anomaly_rate=0.0)):
        for name, value in body["values"].items():
            low, high = NORMAL_RANGES[name]
            assert low <= value <= high
        for rule in rules:
            value = body["values"][rule.value]
            assert rule.max is None or value <= rule.max
            assert rule.min is None or value >= rule.min


def test_values_are_noisy_not_constant() -> None:
    temperatures = [body["values"]["temperature"] for _, body in messages(sim(assets=1))]
    assert len(set(temperatures)) == len(temperatures)


def test_every_message_is_an_anomaly_at_rate_one() -> None:
    fleet = Fleet(sim(anomaly_rate=1.0), ROUTE)
    kinds: Counter[str] = Counter()
    for seq in range(200):
        _, payload, anomaly = fleet.message(seq % 20, seq, 1.0)
        values = json.loads(payload)["values"]
        assert values["temperature"] > 95 or values["vibration"] > 10
        assert anomaly is not None
        kinds[anomaly] += 1
    assert set(kinds) == {"temperature", "vibration"}


def test_anomaly_rate_is_honoured() -> None:
    fleet = Fleet(sim(assets=100, anomaly_rate=0.05), ROUTE)
    flagged = sum(
        fleet.message(index, seq, 1.0)[2] is not None for index in range(100) for seq in range(100)
    )
    assert 400 <= flagged <= 600  # 10 000 draws at 5 %: 500 +- 4.6 standard deviations


# --- topics -------------------------------------------------------------------------------------


def test_topic_of_the_first_assets() -> None:
    topics = [topic for topic, _ in messages(sim(assets=3, rate_hz=1.0, duration_s=1.0))]
    assert topics == [
        "tABC/plant/s1/l1/a000001/telemetry",
        "tABC/plant/s2/l1/a000002/telemetry",
        "tABC/plant/s1/l2/a000003/telemetry",
    ]


@pytest.mark.parametrize(
    ("template", "asset_level", "expected"),
    [
        ("plant/{site}/{line}/{asset}/telemetry", "asset", "plant/s1/l2/a000042/telemetry"),
        ("p/{site}/{area}/{line}/{asset}", "asset", "p/s1/x/l2/a000042"),
        ("p/{site}/{line}/{device}/data", "device", "p/s1/l2/a000042/data"),
        ("p/{site}/{asset}/#", "asset", "p/s1/a000042/x"),
    ],
)
def test_topic_formatting(template: str, asset_level: str, expected: str) -> None:
    route = RouteSettings(name="r", topic=template, asset_level=asset_level)
    assert topic_for(route, site="s1", line="l2", asset=asset_id(41)) == expected


def test_assets_spread_evenly_over_sites_and_lines() -> None:
    fleet = Fleet(sim(assets=16, sites=2, lines=4), ROUTE)
    places = Counter((asset.site, asset.line) for asset in fleet.assets)
    assert len(places) == 8
    assert set(places.values()) == {2}


# --- schedule -----------------------------------------------------------------------------------


def test_schedule_counts() -> None:
    schedule = Schedule(assets=200, rate_hz=5.0, duration_s=2.0)
    assert schedule.per_asset == 10
    assert schedule.total == 2000
    assert schedule.target_rate == 1000.0


@pytest.mark.parametrize(
    ("rate_hz", "duration_s", "per_asset"),
    [(10.0, 0.3, 3), (10.0, 0.7, 7), (2.0, 1.0, 2), (1.0, 60.0, 60), (1.0, 0.5, 1), (3.0, 1.9, 5)],
)
def test_whole_periods_per_asset(rate_hz: float, duration_s: float, per_asset: int) -> None:
    assert Schedule(assets=1, rate_hz=rate_hz, duration_s=duration_s).per_asset == per_asset


def test_each_asset_publishes_once_per_period_staggered() -> None:
    schedule = Schedule(assets=4, rate_hz=2.0, duration_s=3.0)
    times: dict[int, list[float]] = {}
    for number in range(schedule.total):
        index, seq = schedule.slot(number)
        assert seq == len(times.setdefault(index, []))
        times[index].append(schedule.time_of(number))
    # Each asset every 0.5 s; assets offset by 0.5 / 4 = 0.125 s from each other.
    for index, found in times.items():
        assert found == pytest.approx([index * 0.125 + k * 0.5 for k in range(6)])
    assert max(t for found in times.values() for t in found) < schedule.duration_s


def test_due_counts_slots_whose_time_has_come() -> None:
    schedule = Schedule(assets=10, rate_hz=10.0, duration_s=1.0)  # one slot per 10 ms
    assert schedule.due(-0.1) == 0
    assert schedule.due(0.0) == 1
    assert schedule.due(0.0099) == 1
    assert schedule.due(0.01) == 2
    assert schedule.due(0.5) == 51
    assert schedule.due(5.0) == schedule.total == 100
    for number in range(schedule.total):
        assert schedule.due(schedule.time_of(number)) == number + 1


# --- counts -------------------------------------------------------------------------------------


def test_publish_stats_add_up() -> None:
    registry = CollectorRegistry()
    stats = PublishStats(SimulatorMetrics(registry), reservoir_size=50)
    for _ in range(100):
        stats.record_sent(anomaly=False)
    stats.record_sent(anomaly=True)
    for latency in range(1, 100):
        stats.record_acked(latency / 1000)
    stats.record_failed("not_connected", 3)
    assert stats.outstanding == 2
    stats.record_failed("unacked", stats.outstanding)
    assert stats.outstanding == 0
    snapshot = stats.snapshot()
    assert snapshot == {
        "sent": 101,
        "acked": 99,
        "failed": 5,
        "failed_by_kind": {"not_connected": 3, "unacked": 2},
        "anomalies_injected": 1,
    }
    quantiles = stats.latency_quantiles()
    assert quantiles["p50"] is not None
    assert 0.02 < quantiles["p50"] < 0.08
    assert registry.get_sample_value("iotbridge_simulator_messages_acked_total") == 99
    assert registry.get_sample_value("iotbridge_simulator_publish_ack_seconds_count") == 99
    value = registry.get_sample_value(
        "iotbridge_simulator_messages_failed_total", {"kind": "unacked"}
    )
    assert value == 2


def test_latency_quantiles_nearest_rank() -> None:
    stats = PublishStats(SimulatorMetrics(CollectorRegistry()))
    assert stats.latency_quantiles() == {"p50": None, "p99": None}
    for latency in range(1, 101):
        stats.record_sent(anomaly=False)
        stats.record_acked(latency / 1000)
    assert stats.latency_quantiles() == {"p50": 0.05, "p99": 0.099}
