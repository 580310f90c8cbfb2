"""The simulator's pure parts: classes and signals, payloads, topics, the schedule, scenarios and
their plan, injections, the acknowledged set and its file, counts, the MQTT framing of its hot
path."""

from __future__ import annotations

import io
import json
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from config.errors import ConfigError
from config.settings import RouteSettings, Settings, SimulatorSettings
from simulators import acked as acked_file
from simulators.acklog import AckLog
from simulators.app import shard_specs
from simulators.audit import audit
from simulators.fleet import Fleet, asset_id, asset_index, messages_per_asset, topic_for
from simulators.injection import Injector
from simulators.models import CLASS_NAMES, CLASSES, payload_template
from simulators.scenario import Event, Scenario, bundled, load_scenario, plan
from simulators.schedule import Schedule
from simulators.stats import PublishStats, Totals, quantiles
from simulators.wire import BufferedSocket, publish_packet, topic_field

ROUTE = RouteSettings(name="telemetry", topic="tABC/plant/{site}/{line}/{asset}/telemetry")


def sim(**fields: Any) -> SimulatorSettings:
    return SimulatorSettings(**{"assets": 20, "rate_hz": 2.0, "duration_s": 5.0, **fields})


def messages(settings: SimulatorSettings) -> list[tuple[str, dict[str, Any]]]:
    """Every (topic, payload without ts) of a run's schedule, asset by asset."""
    fleet = Fleet(settings, ROUTE)
    out = []
    for local in range(fleet.count):
        for k in range(fleet.per_asset(settings.duration_s)):
            body = json.loads(fleet.encode(local, 1_700_000_000.0, k, fleet.values(local, k)))
            del body["ts"]
            out.append((fleet.topics[local], body))
    return out


# --- classes, values, payloads ------------------------------------------------------------------


def test_same_seed_same_messages() -> None:
    first = messages(sim(seed=7))
    assert first == messages(sim(seed=7))
    assert first != messages(sim(seed=8))


def test_samples_depend_only_on_seed_asset_and_k() -> None:
    small, large = Fleet(sim(assets=3), ROUTE), Fleet(sim(assets=50), ROUTE)
    shard = Fleet(sim(assets=50), ROUTE, first=2, count=10)
    for index, k in [(2, 9), (0, 0), (1, 5), (2, 0)]:
        assert small.values(index, k) == large.values(index, k)
    assert shard.values(0, 4) == large.values(2, 4)
    assert shard.topics[0] == large.topics[2]


def test_payload_follows_the_contract() -> None:
    fleet = Fleet(sim(), ROUTE)
    body = json.loads(fleet.encode(3, 1_700_000_000.25, 4, fleet.values(3, 4)))
    assert set(body) == {"ts", "seq", "values"}
    assert body["ts"] == 1_700_000_000.25
    assert body["seq"] == 4
    assert list(body["values"]) == list(fleet.asset_class(3).value_names)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_every_class_stays_inside_the_default_detector_rules(name: str) -> None:
    settings = Settings()
    detectors = settings.worker.detectors
    thresholds = {r.value: r for r in detectors.threshold}
    rates = {r.value: r.max_per_s for r in detectors.rate}
    fleet = Fleet(sim(assets=400, classes={name: 1.0}, rate_hz=1.0), ROUTE)
    assert {fleet.asset_class(i).name for i in range(fleet.count)} == {name}
    for local in range(0, 400, 7):
        previous: list[float] | None = None
        seen: set[tuple[float, ...]] = set()
        for k in range(0, 3000, 3):  # an hour of 1 Hz samples, and beyond a day of wear
            values = fleet.values(local, k)
            seen.add(tuple(values))
            for model, value in zip(fleet.asset_class(local).values, values, strict=True):
                low, high = model.normal
                assert low <= value <= high
                rule = thresholds.get(model.name)
                if rule is not None:
                    assert rule.max is None or value <= rule.max - rule.hysteresis
                    assert rule.min is None or value >= rule.min + rule.hysteresis
            if previous is not None:
                for model, a, b in zip(
                    fleet.asset_class(local).values, previous, values, strict=True
                ):
                    if model.name in rates:
                        assert abs(a - b) / 3 <= rates[model.name]
            previous = values
        assert len(seen) > 990  # noisy, never flat


def test_classes_follow_their_shares() -> None:
    fleet = Fleet(sim(assets=4000, classes={"motor": 3, "oven": 1}), ROUTE)
    counts = Counter(fleet.asset_class(i).name for i in range(fleet.count))
    assert set(counts) == {"motor", "oven"}
    assert 2850 <= counts["motor"] <= 3150


def test_template_matches_json() -> None:
    for asset_class in CLASSES.values():
        values = [1.5] * len(asset_class.values)
        body = json.loads(payload_template(asset_class) % (1.0, 3, *values))
        assert body["values"] == dict.fromkeys(asset_class.value_names, 1.5)


# --- topics and ids -----------------------------------------------------------------------------


def test_topic_of_the_first_assets() -> None:
    assert Fleet(sim(assets=3), ROUTE).topics == [
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


def test_asset_ids_round_trip() -> None:
    assert asset_index(asset_id(99_999)) == 99_999
    assert asset_index("b000001") is None


# --- schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate_hz", "duration_s", "per_asset"),
    [(10.0, 0.3, 3), (10.0, 0.7, 7), (2.0, 1.0, 2), (1.0, 60.0, 60), (1.0, 0.5, 1), (3.0, 1.9, 5)],
)
def test_whole_periods_per_asset(rate_hz: float, duration_s: float, per_asset: int) -> None:
    assert messages_per_asset(duration_s, rate_hz) == per_asset


def test_due_times_are_staggered_in_order_and_inside_the_run() -> None:
    settings = sim(assets=50, rate_hz=2.0, duration_s=10.0, jitter=0.45)
    fleet = Fleet(settings, ROUTE)
    per_asset = fleet.per_asset(settings.duration_s)
    firsts = sorted(fleet.offset[i] for i in range(50))
    assert firsts[0] < 0.05  # spread over the whole interval
    assert firsts[-1] > 0.45
    for local in range(50):
        due = [fleet.due_s(local, k) for k in range(per_asset)]
        assert due == sorted(due)
        assert all(
            abs(d - fleet.nominal_s(local, k)) <= 0.45 * 0.5 + 1e-9 for k, d in enumerate(due)
        )
        assert fleet.nominal_s(local, per_asset - 1) < settings.duration_s


def test_shards_take_whole_connections() -> None:
    specs = shard_specs(assets=1001, per_connection=100, processes=3, rate=300.0)
    assert [(s.first, s.count) for s in specs] == [(0, 400), (400, 400), (800, 201)]
    assert all(s.connect_rate_per_s == 100.0 for s in specs)
    assert len(shard_specs(assets=10, per_connection=10, processes=4, rate=1.0)) == 1


# --- scenarios ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["standard", "smoke", "sparkplug"])
def test_bundled_scenarios_load_and_plan(name: str) -> None:
    scenario = load_scenario(bundled(name))
    settings = scenario.apply(SimulatorSettings())
    events = plan(scenario, settings)
    assert events == plan(scenario, settings)  # same seed, same plan
    kinds = {e.kind for e in events}
    assert {"spike", "drift", "stuck", "dropout", "out_of_range"} <= kinds
    assert {"malformed", "wrong_type", "oversized", "duplicate", "restart", "clock_skew"} <= kinds
    assert len({e.index for e in events}) == len(events)  # distinct assets
    assert all(0 <= e.start_s <= e.end_s <= settings.duration_s for e in events)
    for e in events:
        if e.category == "anomaly" and e.kind != "dropout":
            assert e.value is not None


def test_standard_scenario_is_the_documented_one() -> None:
    settings = load_scenario(bundled("standard")).apply(SimulatorSettings())
    assert (settings.assets, settings.duration_s, settings.anomaly_rate) == (1000, 600, 0.0)


def test_scenario_errors_carry_yaml_paths(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "fleet: {assets: 0, colour: red}\n"
        "injections:\n  - {kind: spike}\n  - {kind: wobble}\n  - {kind: dropout, value: temperature}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_scenario(path)
    found = {p.path: p.message for p in caught.value.problems}
    assert found["fleet.assets"] == "must be > 0"
    assert found["fleet.colour"] == "unknown key"
    assert "injections[1].kind" in found
    assert "injections[2]" in found
    assert caught.value.source == str(path)


def test_plan_errors_name_the_injection() -> None:
    scenario = Scenario.model_validate({
        "duration_s": 60,
        "fleet": {"assets": 10, "classes": {"oven": 1}},
        "injections": [{"kind": "spike", "asset": "a000011"},
                       {"kind": "drift", "value": "vibration"},
                       {"kind": "stuck", "start_s": 50, "duration_s": 20}],
    })  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        plan(scenario, scenario.apply(SimulatorSettings()))
    paths = [p.path for p in caught.value.problems]
    assert paths == ["injections[0].asset", "injections[1].value", "injections[2].start_s"]


# --- injections ---------------------------------------------------------------------------------


def injector(kind: str, value: int | None = 0, **fields: Any) -> tuple[Fleet, Injector, list[Any]]:
    fleet = Fleet(
        sim(assets=4, rate_hz=1.0, duration_s=100.0, jitter=0.0, classes={"motor": 1}), ROUTE
    )
    event = Event(0, fields.pop("category", "anomaly"), kind, 2, 10.0, 20.0, value,
                  fields.pop("magnitude", 30.0), **fields)  # fmt: skip
    truth: list[Any] = []
    return fleet, Injector(fleet, [event], truth.append), truth


def run(fleet: Fleet, inj: Injector, ks: range) -> list[tuple[Any, list[float]]]:
    out = []
    for k in ks:
        values = fleet.values(2, k)
        out.append((inj.apply(2, k, 1000.0 + k, values), values))
    return out


@pytest.mark.parametrize("kind", ["spike", "drift", "stuck", "out_of_range", "dropout"])
def test_anomalies_change_only_their_window(kind: str) -> None:
    fleet, inj, truth = injector(kind, None if kind == "dropout" else 0)
    results = run(fleet, inj, range(30))
    inside = [k for k in range(30) if 10 <= fleet.nominal_s(2, k) < 20]
    for k, (message, values) in enumerate(results):
        normal = fleet.values(2, k)
        changed = message.silenced or values != normal
        unchanged_first = kind == "stuck" or (kind == "drift" and fleet.nominal_s(2, k) == 10.0)
        assert changed == (k in inside and not (unchanged_first and k == inside[0]))
        if k in inside and kind == "spike":
            assert values[0] == pytest.approx(normal[0] + 30.0)
        if k in inside and kind == "out_of_range":
            assert values[0] == 30.0
        if k in inside and kind == "stuck":
            assert values[0] == results[inside[0]][1][0]
    inj.finish(40.0)
    assert len(truth) == 1
    record = truth[0]
    assert (record["kind"], record["asset"], record["messages"]) == (kind, "a000003", len(inside))
    assert record["value"] == (None if kind == "dropout" else "temperature")
    assert (record["start_seq"], record["end_seq"]) == (inside[0], inside[-1])


def test_restart_starts_a_new_epoch_with_seq_zero_and_a_newer_ts() -> None:
    fleet, inj, truth = injector("restart", None, category="fault")
    results = run(fleet, inj, range(15))
    assert [m.seq for m, _ in results] == [*range(10), *range(5)]
    assert [m.epoch for m, _ in results] == [0] * 10 + [1] * 5
    assert results[10][0].restarted
    assert results[10][0].ts > 1000.0 + 10
    assert truth[0]["kind"] == "restart"


@pytest.mark.parametrize(("kind", "flag"), [("duplicate", "duplicate"), ("out_of_order", "hold")])
def test_one_message_faults_apply_once(kind: str, flag: str) -> None:
    fleet, inj, _ = injector(kind, None, category="fault")
    flagged = [k for k, (m, _) in enumerate(run(fleet, inj, range(30))) if getattr(m, flag)]
    assert flagged == [10]


def test_clock_skew_marks_its_messages_bad() -> None:
    fleet, inj, _ = injector("clock_skew", None, category="fault", skew_s=3600.0)
    results = run(fleet, inj, range(30))
    assert [k for k, (m, _) in enumerate(results) if m.bad] == list(range(10, 20))
    assert results[12][0].ts == 1000.0 + 12 + 3600.0


# --- the acknowledged set -----------------------------------------------------------------------


def test_ack_log_keeps_ranges_per_epoch() -> None:
    log = AckLog(first=5, count=3)
    for seq in range(10):
        log.add(0, 0, seq)
    for seq in (0, 1, 3, 2, 5):  # out of order, a gap at 4
        log.add(1, 0, seq)
    for seq in range(4):
        log.add(2, 0, seq)
    log.restarted(2, 123.5)
    for seq in range(3):
        log.add(2, 1, seq)
    log.add_bad(2, 1, 7)
    assert log.ranges(0) == [(0, 0, 9)]
    assert log.ranges(1) == [(0, 0, 3), (0, 5, 5)]
    assert log.ranges(2) == [(0, 0, 3), (1, 0, 2)]
    records = list(log.records())
    assert [r["asset"] for r in records] == ["a000006", "a000007", "a000008"]
    assert records[2] == {"asset": "a000008", "acked": [[0, 0, 3], [1, 0, 2]],
                          "epochs": [123.5], "bad": [[1, 7]]}  # fmt: skip


def test_acked_file_round_trip_and_epochs(tmp_path: Path) -> None:
    log = AckLog(first=0, count=2)
    for seq in range(5):
        log.add(0, 0, seq)
        log.add(1, 0, seq)
    log.restarted(1, 200.0)
    log.add(1, 1, 0)
    log.add_bad(0, 0, 5)
    path = tmp_path / "acked.jsonl"
    with path.open("w") as out:
        assert acked_file.write(out, {"route": "telemetry"}, log.records()) == 2
    loaded = acked_file.load(path)
    assert loaded.header["route"] == "telemetry"
    assert len(loaded.acked) == 11
    entries: list[Any] = [
        ("1-0", {"asset": "a000002", "seq": "0", "ts": "100.0"}),
        ("2-0", {"asset": "a000002", "seq": "0", "ts": "200.0"}),  # after the restart
        ("3-0", {"asset": "a000001", "seq": "5", "ts": "150.0"}),  # bad: left out
        ("4-0", {"asset": "a000001", "seq": "4", "ts": "150.0"}),
    ]
    skipped = [0]
    seen = list(loaded.telemetry(entries, skipped))
    assert [fields["asset"] for _, fields in seen] == ["a000002", "a000002@1", "a000001"]
    assert skipped == [1]


def test_acked_file_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"format": "something"}\n')
    with pytest.raises(ValueError, match="not an acked file"):
        acked_file.load(path)


# --- counts -------------------------------------------------------------------------------------


def test_publish_stats_add_up_and_sum_over_engines() -> None:
    stats = PublishStats(reservoir_size=50)
    stats.sent = 101
    for latency in range(1, 100):
        stats.acked += 1
        stats.observe(latency / 1000)
    stats.fail("not_connected", 3)
    assert stats.outstanding == 2
    stats.fail("unacked", stats.outstanding)
    assert stats.outstanding == 0
    assert len(stats.latencies) == 50
    totals = Totals()
    totals.update(0, stats.snapshot())
    totals.update(1, stats.snapshot())
    assert totals.total("sent") == 202
    assert totals.kinds("failed_by_kind") == {"not_connected": 6, "unacked": 4}
    assert totals.outstanding == 0
    buckets, total = totals.buckets()
    assert sum(buckets) == 198
    assert total == pytest.approx(2 * sum(range(1, 100)) / 1000)


def test_latency_quantiles_nearest_rank() -> None:
    assert quantiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    got = quantiles([x / 1000 for x in range(1, 101)])
    assert got == {"p50": 0.05, "p90": 0.09, "p99": 0.099, "max": 0.1}


# --- the buffered socket ------------------------------------------------------------------------


def test_buffered_socket_batches_writes_and_serves_small_reads() -> None:
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        buffered = BufferedSocket(right)
        assert buffered.send(b"ab") == 2
        assert buffered.send(bytearray(b"cd")) == 2
        assert buffered.pending_out
        assert buffered.flush()
        assert left.recv(10) == b"abcd"
        left.sendall(b"\x40\x02\x00\x01")
        assert [buffered.recv(1), buffered.recv(1), buffered.recv(2)] == [b"\x40", b"\x02",
                                                                          b"\x00\x01"]  # fmt: skip
        assert not buffered.buffered
        with pytest.raises(BlockingIOError):
            buffered.recv(1)
    finally:
        left.close()
        right.close()


def test_write_of_the_acked_header_is_one_json_line() -> None:
    out = io.StringIO()
    acked_file.write(out, {"route": "r"}, [])
    assert json.loads(out.getvalue()) == {"format": acked_file.FORMAT, "route": "r"}


# --- the wire: PUBLISH packets and PUBACKs without paho -----------------------------------------


def _parse_publish(packet: bytes, v5: bool) -> tuple[int, str, int, bytes]:
    """(header, topic, packet id or 0, payload) of one PUBLISH, decoded by the spec (3.3)."""
    length, width, mult = 0, 0, 1
    while True:
        byte = packet[1 + width]
        length += (byte & 0x7F) * mult
        mult *= 128
        width += 1
        if not byte & 0x80:
            break
    body = packet[1 + width :]
    assert len(body) == length
    topic_len = int.from_bytes(body[:2], "big")
    topic, rest = body[2 : 2 + topic_len].decode(), body[2 + topic_len :]
    mid = 0
    if packet[0] & 0x06:
        mid, rest = int.from_bytes(rest[:2], "big"), rest[2:]
    if v5:
        assert rest[:1] == b"\x00"  # no properties
        rest = rest[1:]
    return packet[0], topic, mid, rest


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("size", [10, 200, 20_000])  # one, two and three length bytes
def test_publish_packets_follow_the_spec(v5: bool, size: int) -> None:
    field = topic_field("plant/s1/l1/a000001/telemetry")
    payload = b"x" * size
    assert _parse_publish(publish_packet(field, payload, 513, v5=v5), v5) == (
        0x32, "plant/s1/l1/a000001/telemetry", 513, payload)  # fmt: skip
    assert _parse_publish(publish_packet(field, payload, 0, v5=v5), v5) == (
        0x30, "plant/s1/l1/a000001/telemetry", 0, payload)  # fmt: skip


def test_pubacks_are_taken_whole_and_the_rest_left_for_paho() -> None:
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        buffered = BufferedSocket(right)
        acks: list[tuple[int, bool]] = []
        # 3.1.1 PUBACK, MQTT 5 with "no matching subscribers" (a success), one with "not
        # authorized" and properties, then a PINGRESP and the first half of a PUBACK.
        left.sendall(b"\x40\x02\x00\x01" + b"\x40\x03\x00\x02\x10" + b"\x40\x04\x00\x03\x87\x00"
                     + b"\xd0\x00" + b"\x40\x02\x00")  # fmt: skip
        assert buffered.fill()
        assert buffered.take_pubacks(lambda mid, failed: acks.append((mid, failed)))
        assert acks == [(1, False), (2, False), (3, True)]
        assert [buffered.recv(1), buffered.recv(1)] == [b"\xd0", b"\x00"]  # paho's PINGRESP
        assert not buffered.take_pubacks(lambda mid, failed: acks.append((mid, failed)))
        left.sendall(b"\x04")  # the rest of that PUBACK arrives
        assert buffered.fill()
        assert not buffered.take_pubacks(lambda mid, failed: acks.append((mid, failed)))
        assert acks[-1] == (4, False)
        assert not buffered.buffered
        left.close()
        assert not buffered.fill()
        assert buffered.eof
        assert buffered.recv(1) == b""  # paho reads the close
    finally:
        left.close()
        right.close()


def test_buffered_socket_counts_what_the_kernel_has_not_taken() -> None:
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        buffered = BufferedSocket(right)
        chunk = b"y" * 65536
        for _ in range(16):
            buffered.send(chunk)
        assert buffered.out_bytes == 16 * 65536
        assert not buffered.flush()  # nobody reads the other end
        assert 0 < buffered.out_bytes < 16 * 65536
    finally:
        left.close()
        right.close()


# --- the schedule: late messages are skipped, never queued --------------------------------------


def test_schedule_skips_what_is_later_than_the_lag_and_counts_it() -> None:
    fleet = Fleet(sim(assets=4, rate_hz=10.0, duration_s=10.0, jitter=0.0), ROUTE)
    schedule = Schedule(fleet, fleet.per_asset(10.0), max_lag_s=0.5)  # 100 messages per asset
    assert schedule.take(0) == [0]  # asset 0 has offset 0
    assert schedule.advance(0, 0)  # message 0 sent; message 1 is due at 0.1 s (tick 20)
    # At 1.0 s (tick 200), messages 1..10 are due; those due before 0.5 s (1..4) are too late.
    assert schedule.skip_late(0, 200) == 4
    assert schedule.next_k[0] == 5
    assert schedule.skip_late(0, 200) == 0  # message 5 is due at 0.5 s: 0.5 s late, not more
    # At the end, everything not dealt with is counted, and assets run out.
    assert schedule.skip_late(0, 10_000) == 95
    assert schedule.done(0)
    assert schedule.remaining == 3
    assert schedule.unsent() == 3 * 100


def test_skips_add_up_to_the_schedule_and_failures_name_the_kind() -> None:
    stats = PublishStats()
    stats.sent = 7
    stats.extras_sent = 2  # a duplicate and a bad copy
    stats.skip("behind_schedule", 3)
    stats.skip("stopped", 4)
    stats.skip("silenced")
    stats.fail("not_connected")  # an extra that could not go: not a skip
    snapshot = stats.snapshot()
    assert snapshot["skipped"] == {"behind_schedule": 3, "stopped": 4, "silenced": 1}
    assert snapshot["failed_by_kind"] == {"behind_schedule": 3, "not_connected": 1}
    assert stats.sent - stats.extras_sent + sum(stats.skipped.values()) == 13


def test_given_up_publishes_are_written_as_unconfirmed_and_marked_for_the_audit(
    tmp_path: Path,
) -> None:
    log = AckLog(first=0, count=2)
    for seq in range(3):
        log.add(0, 0, seq)
    for seq in (3, 4, 6):  # sent, the connection dropped before their PUBACKs
        log.add_unconfirmed(0, 0, seq)
    path = tmp_path / "acked.jsonl"
    with path.open("w") as out:
        acked_file.write(out, {"route": "telemetry"}, log.records())
    loaded = acked_file.load(path)
    assert len(loaded.acked) == 3  # never counted as acknowledged
    assert list(loaded.unconfirmed) == [("a000001", 3), ("a000001", 4), ("a000001", 6)]
    entries: list[Any] = [
        ("1-0", {"asset": "a000001", "seq": "2", "ts": "1.0"}),
        ("2-0", {"asset": "a000001", "seq": "4", "ts": "1.0"}),  # the broker had taken it
        ("3-0", {"asset": "a000001", "seq": "5", "ts": "1.0"}),  # nobody sent this one
    ]
    report = audit(loaded.acked, loaded.telemetry(entries, [0]))
    assert (report.found, report.lost, report.unconfirmed, report.unexpected) == (1, 2, 1, 1)
