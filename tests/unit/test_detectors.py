"""Each detector alone: samples in, events out (pure, no Redis)."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

from config.settings import (
    DetectorSettings,
    DeviationRule,
    FlatlineRule,
    RateRule,
    SequenceGapRule,
    StalenessRule,
    ThresholdRule,
)
from workers.anomaly import AnomalyEvent
from workers.detectors import Check, build_checks
from workers.detectors.deviation import DeviationCheck
from workers.detectors.flatline import FlatlineCheck
from workers.detectors.rate import RateCheck
from workers.detectors.sequence_gap import SequenceGapCheck
from workers.detectors.staleness import StalenessCheck
from workers.detectors.threshold import ThresholdCheck
from workers.sample import Sample
from workers.state import Engine, Shard, ShardState

T0 = 1_700_000_000.0
SHARD = Shard("telemetry", 0, "p:tel:telemetry", "p:lease", "p:state")


def sample(
    i: int, asset: str = "a1", *, seq: int | None = None, t: float | None = None, **values: float
) -> Sample:
    """Sample number `i`: entry id `<1000 + i>-0`, seq i and device time T0 + i unless given."""
    time_s = T0 + i if t is None else t
    return Sample(
        entry_id=f"{1000 + i}-0", route="telemetry", asset=asset, seq=i if seq is None else seq,
        ts=repr(time_s), time_s=time_s, values=values,
    )  # fmt: skip


class Harness:
    """A shard's state fed sample by sample, as the consumer does."""

    def __init__(self, *checks: Check) -> None:
        self.state = ShardState(SHARD, Engine(checks))

    def feed(self, samples: Iterable[Sample]) -> list[AnomalyEvent]:
        out: list[AnomalyEvent] = []
        for one in samples:
            self.state.feed(one, out)
        return out

    def sweep(self, now_ms: int) -> list[AnomalyEvent]:
        out: list[AnomalyEvent] = []
        self.state.sweep(now_ms, out)
        return out


def brief(events: Sequence[AnomalyEvent]) -> list[tuple[Any, ...]]:
    return [(e.event.value, e.asset, e.value_name, e.source_id, e.score) for e in events]


def values(name: str, series: Iterable[float], asset: str = "a1", start: int = 0) -> list[Sample]:
    samples = []
    for i, value in enumerate(series):
        one = sample(start + i, asset)
        one.values[name] = value
        samples.append(one)
    return samples


# threshold


def test_threshold_with_hysteresis_flags_a_value_hovering_at_the_bound_once() -> None:
    h = Harness(ThresholdCheck(ThresholdRule(value="temperature", max=90.0, hysteresis=1.0)))
    hovering = [89.0, 90.5, 89.8, 90.2, 89.5, 90.9, 89.2, 88.9, 90.1]
    events = h.feed(values("temperature", hovering))
    assert brief(events) == [
        ("start", "a1", "temperature", "1001-0", 90.5),
        ("ended", "a1", "temperature", "1007-0", 88.9),
        ("start", "a1", "temperature", "1008-0", 90.1),
    ]


def test_threshold_without_hysteresis_ends_at_the_bound_and_a_jump_across_starts_again() -> None:
    h = Harness(ThresholdCheck(ThresholdRule(value="x", min=-20.0, max=90.0)))
    events = h.feed(values("x", [90.0, 95.0, 96.0, -40.0, -20.0, 10.0]))
    assert [(e.event.value, e.bound, e.source_id) for e in events] == [
        ("start", 90.0, "1001-0"),
        ("ended", 90.0, "1003-0"),
        ("start", -20.0, "1003-0"),
        ("ended", -20.0, "1004-0"),
    ]


def test_threshold_rules_are_chosen_per_asset_pattern_first_match_wins() -> None:
    h = Harness(
        ThresholdCheck(ThresholdRule(value="x", max=250.0, assets="oven-*", severity="critical")),
        ThresholdCheck(ThresholdRule(value="x", max=90.0)),
    )
    events = h.feed([sample(0, "oven-1", x=200.0), sample(1, "pump-1", x=200.0),
                     sample(2, "oven-1", x=260.0)])  # fmt: skip
    assert [(e.asset, e.bound, e.severity) for e in events] == [
        ("pump-1", 90.0, "warning"),
        ("oven-1", 250.0, "critical"),
    ]


def test_a_rule_for_another_route_does_not_apply() -> None:
    h = Harness(ThresholdCheck(ThresholdRule(value="x", max=1.0, route="other")))
    assert h.feed(values("x", [5.0, 6.0])) == []


# deviation


def test_deviation_flags_a_jump_after_warmup_once_and_ends_when_back() -> None:
    rule = DeviationRule(value="p", warmup_samples=20, z_max=5.0, z_clear=2.0)
    h = Harness(DeviationCheck(rule))
    normal = [4.0 + 0.1 * ((i * 7) % 5 - 2) for i in range(40)]
    assert h.feed(values("p", normal)) == []
    events = h.feed(values("p", [9.0, 9.1, 4.0], start=40))
    assert [(e.event.value, e.source_id) for e in events] == [
        ("start", "1040-0"),
        ("ended", "1042-0"),
    ]
    assert events[0].score > 5.0
    assert events[0].bound == 5.0


def test_deviation_learns_during_warmup_and_flags_nothing() -> None:
    h = Harness(DeviationCheck(DeviationRule(value="p", warmup_samples=10)))
    assert h.feed(values("p", [1.0, 100.0, -50.0, 3.0, 1e6, 2.0, 7.0, 1.0, 0.0, 5.0])) == []


def test_deviation_state_is_per_asset() -> None:
    h = Harness(DeviationCheck(DeviationRule(value="p", warmup_samples=5, min_std=0.1)))
    h.feed([sample(i, "low", p=1.0 + 0.01 * (i % 3)) for i in range(10)])
    h.feed([sample(i, "high", p=50.0 + 0.01 * (i % 3)) for i in range(10)])
    events = h.feed([sample(20, "low", p=50.0), sample(21, "high", p=50.0)])
    assert [(e.asset, e.event.value) for e in events] == [("low", "start")]


def test_deviation_min_std_keeps_a_steady_value_from_flagging_noise() -> None:
    h = Harness(DeviationCheck(DeviationRule(value="p", warmup_samples=5, min_std=0.5)))
    h.feed(values("p", [3.0] * 10))
    assert h.feed(values("p", [3.4, 2.6], start=10)) == []
    assert [e.event.value for e in h.feed(values("p", [6.0], start=12))] == ["start"]


# rate of change


def test_rate_flags_a_fast_change_by_device_time() -> None:
    h = Harness(RateCheck(RateRule(value="x", max_per_s=2.0)))
    series = values("x", [50.0, 51.0, 60.0, 51.0, 51.5])
    events = h.feed(series)
    assert [(e.event.value, e.source_id, e.score) for e in events] == [
        ("start", "1002-0", 9.0),
        ("ended", "1004-0", 0.5),
    ]


def test_rate_uses_the_dt_floor_and_ignores_samples_not_after_the_previous() -> None:
    h = Harness(RateCheck(RateRule(value="x", max_per_s=2.0, min_dt_s=1.0)))
    series = [sample(0, t=T0, x=50.0),
              sample(1, t=T0 + 0.1, x=51.5),  # 1.5 per floored second, not 15 per second
              sample(2, t=T0 + 0.05, x=90.0),  # reordered: no rate, a new reference
              sample(3, t=T0 + 0.2, x=90.5)]  # fmt: skip
    assert h.feed(series) == []


# flatline


def test_flatline_flags_n_unchanged_samples_once_and_ends_on_change() -> None:
    h = Harness(FlatlineCheck(FlatlineRule(value="v", samples=5, epsilon=0.01)))
    events = h.feed(values("v", [1.0, 2.0, 2.0, 2.005, 2.0, 2.0, 2.0, 2.0, 2.5]))
    assert [(e.event.value, e.source_id, e.score) for e in events] == [
        ("start", "1005-0", 5.0),
        ("ended", "1008-0", 7.0),
    ]


def test_flatline_flags_after_a_duration_of_device_time() -> None:
    h = Harness(FlatlineCheck(FlatlineRule(value="v", samples=1000, duration_s=30.0)))
    series = [sample(i, t=T0 + 10 * i, v=7.0) for i in range(5)]
    events = h.feed(series)
    assert [(e.event.value, e.source_id, e.bound, e.score) for e in events] == [
        ("start", "1003-0", 30.0, 30.0)
    ]


# staleness


def test_staleness_fires_on_the_timer_and_ends_when_the_asset_speaks() -> None:
    h = Harness(StalenessCheck(StalenessRule(silent_s=10.0)))
    h.feed([sample(0, "quiet"), sample(0, "chatty")])
    assert h.sweep(1000 + 9_000) == []
    h.feed([sample(9_500, "chatty")])  # entry id 10500-0: stream time 10.5 s
    events = h.sweep(1000 + 10_500)
    assert [(e.event.value, e.asset, e.source_id, e.score) for e in events] == [
        ("start", "quiet", "1000-0", 10.5)
    ]
    assert h.sweep(1000 + 15_000) == [], "one flag per silence"
    ended = h.feed([sample(30_000, "quiet")])
    assert [(e.event.value, e.source_id, e.score) for e in ended] == [("ended", "31000-0", 30.0)]


# sequence gap


def seqs(*numbers: int, asset: str = "a1") -> list[Sample]:
    return [sample(i, asset, seq=n) for i, n in enumerate(numbers)]


def test_a_seq_jump_is_one_event_with_the_burst_size_after_the_reorder_window() -> None:
    h = Harness(SequenceGapCheck(SequenceGapRule(reorder_window=4)))
    events = h.feed(seqs(0, 1, 2, 6, 7, 8, 9, 10, 11))
    assert [(e.event.value, e.value, e.score) for e in events] == [
        ("start", 7.0, 3.0),  # 3, 4, 5 lost: declared once 7, a window above 3, arrives
        ("ended", 8.0, 3.0),
    ]


def test_small_reordering_and_duplicates_are_not_gaps() -> None:
    h = Harness(SequenceGapCheck(SequenceGapRule(reorder_window=4)))
    assert h.feed(seqs(0, 2, 1, 3, 5, 4, 4, 6, 7, 8, 9, 10)) == []


def test_a_restart_to_zero_is_not_a_gap() -> None:
    h = Harness(SequenceGapCheck(SequenceGapRule(reorder_window=4)))
    assert h.feed(seqs(*range(100), 0, 1, 2, 3, 4, 5, 6, 7)) == []


def test_a_jump_longer_than_the_window_is_declared_at_once() -> None:
    h = Harness(SequenceGapCheck(SequenceGapRule(reorder_window=4)))
    events = h.feed(seqs(0, 1, 2, 20, 21))
    assert [(e.event.value, e.score) for e in events] == [("start", 17.0), ("ended", 17.0)]


# all together


def test_detectors_of_the_whole_asset_have_no_value_name() -> None:
    h = Harness(SequenceGapCheck(SequenceGapRule(reorder_window=1)))
    [event, _] = h.feed(seqs(0, 5, 6))
    assert (event.detector, event.value_name, event.severity) == ("sequence_gap", "", "warning")


# column-wise rounds against sample by sample


def fleet(seed: int, assets: int, steps: int) -> list[Sample]:
    """Samples of a fleet, shuffled in small bursts, with every kind of anomaly: spikes, stuck
    readings, missing values, seq jumps, repeats and restarts, device time going back."""
    rng = random.Random(seed)
    out: list[Sample] = []
    for step in range(steps):
        for a in rng.sample(range(assets), assets):
            kind = rng.random()
            seq = step + (rng.randrange(-12, 30) if kind < 0.02 else 0)
            t = T0 + step + (rng.uniform(-3, 0) if kind > 0.99 else rng.uniform(0, 0.3))
            values = {
                "temperature": 50 + 5 * rng.gauss(0, 1) + (60 if 0.02 < kind < 0.04 else 0),
                "vibration": 2.0 if a % 7 == 0 and step % 40 < 35 else rng.gauss(2, 0.2),
                "pressure": rng.gauss(4, 0.1) + (30 * rng.random() if kind > 0.985 else 0),
            }
            if 0.05 < kind < 0.08:
                del values["pressure"]
            one = sample(step * assets + a, f"a{a}", seq=max(seq, 0), t=t, **values)
            out.append(one)
        if step % 25 == 24:  # a burst: the next samples come in another order
            tail = out[-assets:]
            rng.shuffle(tail)
            out[-assets:] = tail
    return out


def run_batches(engine: Engine, samples: list[Sample], batch: int, *, whole: bool) -> Any:
    state = ShardState(SHARD, engine)
    events: list[AnomalyEvent] = []
    for start in range(0, len(samples), batch):
        out: list[AnomalyEvent] = []
        if whole:
            state.feed_batch(samples[start : start + batch], out)
        else:
            for one in samples[start : start + batch]:
                state.feed(one, out)
        state.sweep(int((T0 + start / 40) * 1000), out)
        state.committed(out, samples[start].entry_id, 0)
        events += out
    rows = {asset: state.assets[asset].row.tobytes() for asset in sorted(state.assets)}
    return events, rows


def test_rounds_run_column_wise_give_the_same_events_and_state_as_sample_by_sample() -> None:
    samples = fleet(seed=3, assets=60, steps=160)
    settings = DetectorSettings(
        flatline=[FlatlineRule(value="vibration", samples=20, duration_s=25.0)],
        staleness=[StalenessRule(silent_s=2.0)],
        sequence_gap=[SequenceGapRule(reorder_window=5)],
    )
    for batch in (13, 300):
        expected = run_batches(Engine(build_checks(settings)), samples, batch, whole=False)
        kinds = {(e.detector, e.event.value) for e in expected[0]}
        assert len(kinds) == 12  # every detector opened and ended anomalies
        for columns_from in (1, 24, 10_000):
            engine = Engine(build_checks(settings), columns_from=columns_from)
            assert run_batches(engine, samples, batch, whole=True) == expected


def test_a_round_with_a_check_of_its_own_runs_it_sample_by_sample() -> None:
    # A check without column-wise code (the default feed_many) still meets every sample in order.
    samples = [one for i in range(40) for one in values("temperature", [50.0 + i], f"a{i % 30}", i)]
    checks: list[Check] = [ThresholdCheck(ThresholdRule(value="temperature", max=70.0))]
    expected = Harness(*checks).feed(samples)
    state = ShardState(SHARD, Engine(checks, columns_from=1))
    out: list[AnomalyEvent] = []
    state.feed_batch(samples, out)
    assert out == expected
