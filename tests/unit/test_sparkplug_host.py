"""The Sparkplug host: sequence and reorder, rebirth requests, aliases, deaths, entries, STATE.

Time is passed in, so the reorder timeout and the rebirth interval are stepped through, not waited.
"""

from __future__ import annotations

import json
from itertools import pairwise

from bridge.sparkplug import names
from bridge.sparkplug.host import Host
from bridge.sparkplug.payload import DataType, OutMetric, Value, decode, encode, value_of
from bridge.sparkplug.publish import (
    REBIRTH_METRIC,
    Publication,
    answer_state,
    state_birth,
    state_death,
    state_will,
)
from bridge.sparkplug.records import Counters, Entry, Outcome
from config.sparkplug_settings import SparkplugSettings

T0 = 1_700_000_000.0  # host clock, epoch seconds
MS0 = 1_700_000_000_000  # edge clock, epoch ms
GROUP, NODE = "Plant 1", "Edge_1"
NODE_ASSET = "Plant-201.Edge_1"
TIMEOUT_S = 0.5
INTERVAL_S = 10.0

TEMPERATURE, COUNT, STATUS, BIG = 1, 2, 3, 4  # node metric aliases
SPEED, RUNNING = 10, 11  # device metric aliases


class Edge:
    """An edge node as the spec has it publish: one seq for all its messages, 255 then 0."""

    def __init__(self, group: str = GROUP, node: str = NODE, bd_seq: int = 0) -> None:
        self.group, self.node, self.bd_seq = group, node, bd_seq
        self.seq = 0

    def _topic(self, kind: str, device: str | None = None) -> str:
        tail = f"/{device}" if device else ""
        return f"spBv1.0/{self.group}/{kind}/{self.node}{tail}"

    def next_seq(self) -> int:
        seq, self.seq = self.seq, (self.seq + 1) % 256
        return seq

    def nbirth(self, ms: int = MS0, seq: int = 0) -> tuple[str, bytes]:
        self.seq = (seq + 1) % 256
        metrics = [
            OutMetric("bdSeq", DataType.INT64, self.bd_seq, timestamp_ms=ms),
            OutMetric(REBIRTH_METRIC, DataType.BOOLEAN, False, timestamp_ms=ms),
            OutMetric("Sensors/Temperature", DataType.DOUBLE, 20.5, TEMPERATURE, ms),
            OutMetric("Count", DataType.INT32, -3, COUNT, ms),
            OutMetric("Status", DataType.STRING, "idle", STATUS, ms),
            OutMetric("Big", DataType.UINT64, 2**64 - 1, BIG, ms),
        ]
        return self._topic("NBIRTH"), encode(ms, seq, metrics)

    def dbirth(self, device: str, ms: int = MS0) -> tuple[str, bytes]:
        metrics = [
            OutMetric("Speed", DataType.FLOAT, 1.5, SPEED, ms),
            OutMetric("Running", DataType.BOOLEAN, True, RUNNING, ms),
        ]
        return self._topic("DBIRTH", device), encode(ms, self.next_seq(), metrics)

    def ndata(
        self, values: dict[int, Value | None], ms: int = MS0, **flags: bool
    ) -> tuple[str, bytes]:
        metrics = [_aliased(alias, value, ms, **flags) for alias, value in values.items()]
        return self._topic("NDATA"), encode(ms, self.next_seq(), metrics)

    def ddata(self, device: str, values: dict[int, Value], ms: int = MS0) -> tuple[str, bytes]:
        metrics = [_aliased(alias, value, ms) for alias, value in values.items()]
        return self._topic("DDATA", device), encode(ms, self.next_seq(), metrics)

    def ndeath(self, bd_seq: int | None = None) -> tuple[str, bytes]:
        bd = self.bd_seq if bd_seq is None else bd_seq
        return self._topic("NDEATH"), encode(None, None, [OutMetric("bdSeq", DataType.INT64, bd)])

    def ddeath(self, device: str, ms: int) -> tuple[str, bytes]:
        return self._topic("DDEATH", device), encode(ms, self.next_seq(), [])


_TYPES = {TEMPERATURE: DataType.DOUBLE, COUNT: DataType.INT32, STATUS: DataType.STRING,
          BIG: DataType.UINT64, SPEED: DataType.FLOAT, RUNNING: DataType.BOOLEAN, 99: DataType.INT32}  # fmt: skip


def _aliased(alias: int, value: Value | None, ms: int, **flags: bool) -> OutMetric:
    # DATA metrics carry the alias only; the datatype is set for encoding, as Tahu does.
    return OutMetric(None, _TYPES[alias], value, alias, ms, **flags)


def _host(primary: bool = True, counters: Counters | None = None) -> Host:
    return Host("iotbridge", TIMEOUT_S, INTERVAL_S, primary, counters)


def _feed(host: Host, message: tuple[str, bytes], now: float = T0) -> Outcome:
    return host.handle(message[0], message[1], now)


def _rebirths(out: Outcome) -> list[Publication]:
    return [c for c in out.commands if "/NCMD/" in c.topic]


def _temperatures(entries: list[Entry]) -> list[float]:
    return [
        float(e.values["Sensors.Temperature"]) for e in entries if "Sensors.Temperature" in e.values
    ]


def _born(host: Host, edge: Edge, now: float = T0) -> Outcome:
    return _feed(host, edge.nbirth(), now)


def test_600_consecutive_messages_wrap_the_seq_twice_without_a_gap() -> None:
    host, edge = _host(), Edge()
    total = _born(host, edge)
    for i in range(600):
        total.extend(_feed(host, edge.ndata({TEMPERATURE: float(i)}, MS0 + i), T0 + i / 100))
    total.extend(host.expire(T0 + 3600))
    assert total.missing == 0
    assert total.unplaced == 0
    assert total.unknown == 0
    assert _rebirths(total) == []
    data = [e for e in total.entries if e.extra["sp.type"] == "NDATA"]
    assert _temperatures(data) == [float(i) for i in range(600)]
    assert [e.seq for e in total.entries] == list(range(601))  # the birth's entry, then 600
    wire = [int(e.extra["sp.seq"]) for e in data]
    assert wire[:3] == [1, 2, 3]
    assert wire.count(0) == 2  # wrapped after 255 twice
    assert wire == [(i + 1) % 256 for i in range(600)]


def test_two_messages_swapped_within_the_timeout_are_both_written_in_order() -> None:
    host, edge = _host(), Edge()
    _born(host, edge)
    first, second, third, fourth = (edge.ndata({TEMPERATURE: float(i)}) for i in range(4))
    out = _feed(host, first, T0)
    out.extend(_feed(host, third, T0 + 0.1))
    assert len(out.entries) == 1  # the third is held
    out.extend(_feed(host, second, T0 + 0.1 + TIMEOUT_S * 0.9))
    out.extend(_feed(host, fourth, T0 + 0.2 + TIMEOUT_S))
    out.extend(host.expire(T0 + 3600))
    assert _temperatures(out.entries) == [0.0, 1.0, 2.0, 3.0]
    assert (out.missing, out.unplaced, len(_rebirths(out))) == (0, 0, 0)


def test_a_dropped_seq_gives_one_rebirth_request_once_the_timeout_has_passed() -> None:
    host, edge = _host(), Edge()
    _born(host, edge)
    messages = [edge.ndata({TEMPERATURE: float(i)}) for i in range(4)]
    out = _feed(host, messages[0], T0)
    out.extend(_feed(host, messages[2], T0 + 0.1))  # messages[1] never arrives
    out.extend(_feed(host, messages[3], T0 + 0.2))
    out.extend(host.expire(T0 + 0.1 + TIMEOUT_S - 0.001))
    assert _rebirths(out) == []
    assert host.next_deadline == T0 + 0.1 + TIMEOUT_S
    out.extend(host.expire(T0 + 0.1 + TIMEOUT_S))
    (request,) = _rebirths(out)
    assert _temperatures(out.entries) == [0.0, 2.0, 3.0]  # what came after the hole is kept
    assert out.missing == 1
    assert host.next_deadline is None
    assert (request.topic, request.qos, request.retain) == (
        f"spBv1.0/{GROUP}/NCMD/{NODE}",
        0,
        False,
    )
    (metric,) = decode(request.payload).metrics
    assert (metric.name, metric.alias, metric.datatype) == (REBIRTH_METRIC, None, DataType.BOOLEAN)
    assert value_of(metric, DataType.BOOLEAN) is True


def test_with_a_reorder_timeout_of_0_a_hole_asks_for_a_rebirth_at_once() -> None:
    host, edge = Host("iotbridge", 0.0, INTERVAL_S), Edge()
    _born(host, edge)
    edge.seq += 1
    out = _feed(host, edge.ndata({TEMPERATURE: 7.0}))
    assert (_temperatures(out.entries), out.missing, len(_rebirths(out))) == ([7.0], 1, 1)


def test_a_storm_of_gaps_gives_at_most_one_rebirth_request_per_node_per_interval() -> None:
    host, edges = _host(), [Edge(node="A"), Edge(node="B")]
    requests: list[tuple[float, str]] = []
    for edge in edges:
        _born(host, edge)
    for step in range(600):  # 60 s, a message every 0.1 s per node, every other seq lost
        now = T0 + step / 10
        for edge in edges:
            edge.seq = (edge.seq + 1) % 256  # the message with this seq is lost
            out = _feed(host, edge.ndata({TEMPERATURE: 1.0}), now)
            out.extend(host.expire(now))
            requests += [(now, r.topic) for r in _rebirths(out)]
    for node in ("A", "B"):
        times = [now for now, topic in requests if topic.endswith(f"/NCMD/{node}")]
        assert len(times) == 6  # at 0.5 s, then every 10 s up to 60 s
        assert all(later - earlier >= INTERVAL_S for earlier, later in pairwise(times))


def test_data_with_an_unknown_alias_writes_nothing_of_the_message_and_asks_for_a_rebirth() -> None:
    host, edge = _host(), Edge()
    _born(host, edge)
    out = _feed(host, edge.ndata({TEMPERATURE: 5.0, 99: 1}))
    assert out.entries == []
    assert out.unknown == 1
    assert len(_rebirths(out)) == 1
    later = _feed(host, edge.ndata({TEMPERATURE: 6.0}), T0 + 1)
    assert _temperatures(later.entries) == [6.0]  # the sequence went on
    assert _rebirths(later) == []


def test_data_before_any_birth_and_data_of_an_unborn_device_ask_for_a_rebirth() -> None:
    host, edge = _host(), Edge()
    edge.seq = 7
    out = _feed(host, edge.ndata({TEMPERATURE: 1.0}))
    assert (out.entries, out.unknown, len(_rebirths(out))) == ([], 1, 1)
    _born(host, edge, T0 + INTERVAL_S)
    out = _feed(host, edge.ddata("Pump", {SPEED: 2.0}), T0 + 2 * INTERVAL_S)
    assert (out.entries, out.unknown, len(_rebirths(out))) == ([], 1, 1)


def test_a_matching_ndeath_takes_the_node_and_its_devices_offline_and_their_metrics_stale() -> None:
    host, edge = _host(), Edge(bd_seq=3)
    _born(host, edge)
    _feed(host, edge.dbirth("Pump"))
    _feed(host, edge.dbirth("Fan"))
    out = _feed(host, edge.ndeath(), T0 + 5)
    offline = {e.asset: e for e in out.events}
    assert set(offline) == {NODE_ASSET, f"{NODE_ASSET}.Pump", f"{NODE_ASSET}.Fan"}
    assert all(
        (not e.online, e.ts, e.bd_seq, e.cause) == (True, T0 + 5, 3, "NDEATH")
        for e in offline.values()
    )
    assert offline[f"{NODE_ASSET}.Pump"].stale == ("Speed", "Running")
    assert "Sensors.Temperature" in offline[NODE_ASSET].stale
    node = host.node(GROUP, NODE)
    assert node.entity is not None
    assert all(m.stale for m in node.entity.by_name.values())
    assert all(m.stale for d in node.devices.values() for m in d.by_name.values())
    after = _feed(host, edge.ndata({TEMPERATURE: 1.0}), T0 + 6)
    assert (after.entries, after.unknown) == ([], 1)


def test_an_ndeath_of_an_earlier_connection_changes_nothing() -> None:
    host, edge = _host(), Edge(bd_seq=4)
    _born(host, edge)
    out = _feed(host, edge.ndeath(bd_seq=3), T0 + 1)
    assert (out.events, out.entries, out.commands, out.refusals) == ([], [], [], [])
    node = host.node(GROUP, NODE)
    assert node.online
    assert node.entity is not None
    assert not any(m.stale for m in node.entity.by_name.values())
    assert _temperatures(_feed(host, edge.ndata({TEMPERATURE: 2.0}), T0 + 2).entries) == [2.0]


def test_ddeath_takes_only_its_device_offline() -> None:
    host, edge = _host(), Edge()
    _born(host, edge)
    _feed(host, edge.dbirth("Pump"))
    _feed(host, edge.dbirth("Fan"))
    out = _feed(host, edge.ddeath("Pump", MS0 + 700), T0 + 1)
    (event,) = out.events
    assert (event.asset, event.online, event.ts, event.cause) == (
        f"{NODE_ASSET}.Pump",
        False,
        (MS0 + 700) / 1000,
        "DDEATH",
    )
    node = host.node(GROUP, NODE)
    assert node.online
    assert node.devices["Fan"].online
    assert all(m.stale for m in node.devices["Pump"].by_name.values())
    assert not any(m.stale for m in node.devices["Fan"].by_name.values())
    pump = _feed(host, edge.ddata("Pump", {SPEED: 3.0}), T0 + 2)
    assert (pump.entries, pump.unknown, len(_rebirths(pump))) == ([], 1, 1)
    fan = _feed(host, edge.ddata("Fan", {SPEED: 4.0}), T0 + 3)
    assert [(e.asset, e.values) for e in fan.entries] == [(f"{NODE_ASSET}.Fan", {"Speed": 4.0})]


def test_historical_values_are_written_flagged_but_leave_the_current_value() -> None:
    host, edge = _host(), Edge()
    _born(host, edge)
    out = _feed(host, edge.ndata({TEMPERATURE: 99.0}, MS0 - 60_000, is_historical=True), T0 + 1)
    (entry,) = out.entries
    assert (entry.values, entry.ts, entry.extra["sp.historical"]) == (
        {"Sensors.Temperature": 99.0},
        (MS0 - 60_000) / 1000,
        "1",
    )
    node = host.node(GROUP, NODE)
    assert node.entity is not None
    current = node.entity.by_alias[TEMPERATURE]
    assert (current.value, current.timestamp_ms, current.stale) == (20.5, MS0, False)
    live = _feed(host, edge.ndata({TEMPERATURE: 21.0}, MS0 + 1000), T0 + 2)
    assert "sp.historical" not in live.entries[0].extra
    assert (current.value, current.timestamp_ms) == (21.0, MS0 + 1000)


def test_birth_and_data_entries_as_the_write_path_will_store_them() -> None:
    host, edge = _host(), Edge(bd_seq=2)
    birth = _born(host, edge)
    (entry,) = birth.entries
    fields = entry.fields()
    assert fields == {
        "asset": NODE_ASSET, "seq": "0", "ts": repr(MS0 / 1000),
        "v.Sensors.Temperature": "20.5", "v.Count": "-3", "v.Big": str(2**64 - 1), "s.Status": "idle",
        "sp.type": "NBIRTH", "sp.seq": "0", "sp.bdseq": "2",
    }  # fmt: skip
    assert [e.online for e in birth.events] == [True]
    out = _feed(host, edge.ndata({TEMPERATURE: 1.0, COUNT: None, STATUS: "run"}, MS0 + 5))
    out.extend(_feed(host, edge.ndata({TEMPERATURE: 2.0}, MS0 + 6, is_transient=True)))
    (data,) = out.entries  # the transient value is not stored
    assert (data.seq, data.ts, data.values, data.texts) == (
        1,
        (MS0 + 5) / 1000,
        {"Sensors.Temperature": 1.0},
        {"Status": "run"},
    )
    assert data.extra == {"sp.type": "NDATA", "sp.seq": "1", "sp.bdseq": "2", "sp.null": "Count"}
    node = host.node(GROUP, NODE)
    assert node.entity is not None
    assert node.entity.by_alias[TEMPERATURE].value == 2.0  # but it is the current value


def test_one_entry_per_metric_timestamp() -> None:
    host, edge = _host(), Edge()
    _born(host, edge)
    metrics = [OutMetric(None, DataType.DOUBLE, float(i), TEMPERATURE, MS0 + i) for i in range(3)]
    out = host.handle(
        f"spBv1.0/{GROUP}/NDATA/{NODE}", encode(MS0 + 3, edge.next_seq(), metrics), T0
    )
    assert [(e.ts, e.values["Sensors.Temperature"]) for e in out.entries] == [
        ((MS0 + i) / 1000, float(i)) for i in range(3)
    ]
    assert [e.seq for e in out.entries] == [1, 2, 3]


def test_entry_seq_keeps_rising_across_a_rebirth_and_resumes_from_the_write_path() -> None:
    counters = Counters()
    counters.resume(NODE_ASSET, 41)
    host, edge = _host(counters=counters), Edge()
    seqs = [e.seq for e in _born(host, edge).entries]
    seqs += [e.seq for e in _feed(host, edge.ndata({TEMPERATURE: 1.0})).entries]
    edge.bd_seq += 1
    seqs += [e.seq for e in _feed(host, edge.nbirth(seq=200), T0 + 1).entries]
    seqs += [e.seq for e in _feed(host, edge.ndata({TEMPERATURE: 2.0}), T0 + 2).entries]
    assert seqs == [42, 43, 44, 45]


def test_a_dataset_metric_is_refused_alone() -> None:
    host, edge = _host(), Edge()
    topic, _ = edge.nbirth()
    metrics = [
        OutMetric("bdSeq", DataType.INT64, 0, timestamp_ms=MS0),
        OutMetric("Table", DataType.DATASET, None, 5, MS0),
        OutMetric("Sensors/Temperature", DataType.DOUBLE, 20.5, TEMPERATURE, MS0),
    ]
    birth = encode(MS0, 0, metrics)
    # An is_null DataSet still declares an unsupported type: refused, not read.
    out = host.handle(topic, birth, T0)
    assert [(r.reason, r.metric) for r in out.refusals] == [("schema", "Table")]
    assert [e.values for e in out.entries] == [{"Sensors.Temperature": 20.5}]
    data = encode(
        MS0, 1, [OutMetric(None, DataType.INT32, 1, 5, MS0), _aliased(TEMPERATURE, 3.0, MS0)]
    )
    out = host.handle(f"spBv1.0/{GROUP}/NDATA/{NODE}", data, T0 + 1)
    assert [(r.reason, r.metric) for r in out.refusals] == [("schema", "Table")]
    assert (_temperatures(out.entries), _rebirths(out)) == ([3.0], [])


def test_malformed_topics_payloads_and_births_are_refused() -> None:
    host, edge = _host(), Edge()
    out = host.handle("spBv1.0/g/NDATA", b"", T0)
    out.extend(host.handle(f"spBv1.0/{GROUP}/NDATA/{NODE}", b"\xff\xff\xff", T0))
    out.extend(host.handle(f"spBv1.0/{GROUP}/NBIRTH/{NODE}", encode(MS0, 0, []), T0))  # no bdSeq
    assert [r.reason for r in out.refusals] == ["topic", "schema", "schema"]
    assert out.entries == []
    birth = _born(host, edge)
    assert birth.refusals == []


def test_a_seq_the_host_has_passed_is_not_written_and_asks_for_a_rebirth() -> None:
    host, edge = _host(), Edge()
    _born(host, edge)
    message = edge.ndata({TEMPERATURE: 1.0})
    out = _feed(host, message)
    out.extend(_feed(host, message, T0 + 1))  # the same message again
    assert _temperatures(out.entries) == [1.0]
    assert (out.unplaced, len(_rebirths(out))) == (1, 1)


def test_a_secondary_host_never_sends_rebirth_requests() -> None:
    host, edge = _host(primary=False), Edge()
    _born(host, edge)
    out = _feed(host, edge.ndata({99: 1}))
    assert (out.unknown, out.commands) == (1, [])


def test_the_host_is_built_from_settings() -> None:
    host = Host.from_settings(
        SparkplugSettings(host_id="scada", reorder_timeout_ms=250, primary=False)
    )
    edge = Edge()
    _born(host, edge)
    edge.seq += 1
    _feed(host, edge.ndata({TEMPERATURE: 1.0}), T0)
    assert host.next_deadline == T0 + 0.25
    assert host.host_id == "scada"


def test_state_payloads_of_the_host() -> None:
    will, birth, death = (
        state_will("scada", MS0),
        state_birth("scada", MS0),
        state_death("scada", MS0 + 9),
    )
    assert {(p.topic, p.qos, p.retain) for p in (will, birth, death)} == {
        ("spBv1.0/STATE/scada", 1, True)
    }
    assert json.loads(will.payload) == {"online": False, "timestamp": MS0}
    assert json.loads(birth.payload) == {"online": True, "timestamp": MS0}
    assert json.loads(death.payload) == {"online": False, "timestamp": MS0 + 9}


def test_an_offline_state_for_the_host_itself_is_answered_with_its_birth() -> None:
    assert answer_state("scada", b'{"online": false, "timestamp": 5}', MS0) == state_birth(
        "scada", MS0
    )
    assert answer_state("scada", b'{"online": true, "timestamp": 5}', MS0) is None
    assert answer_state("scada", b"OFFLINE", MS0) is None  # Sparkplug 2.2's text form: not ours
    host = _host()
    will, birth = host.start_session(MS0)
    assert (will, birth) == (state_will("iotbridge", MS0), state_birth("iotbridge", MS0))
    out = host.handle("spBv1.0/STATE/iotbridge", state_will("iotbridge", MS0 - 1).payload, T0)
    assert out.commands == [state_birth("iotbridge", MS0)]
    assert host.handle("spBv1.0/STATE/other", state_will("other", MS0).payload, T0).commands == []


def test_value_names_and_assets_are_plain_names() -> None:
    assert names.asset_id(GROUP, NODE, "Pump 2") == "Plant-201.Edge_1.Pump-202"
    assert names.value_name("Sensors/Temperature") == "Sensors.Temperature"


def test_after_a_clean_stop_the_host_no_longer_answers_state() -> None:
    host = _host()
    host.start_session(MS0)
    assert host.stop_session(MS0 + 50) == state_death("iotbridge", MS0 + 50)
    offline = state_death("iotbridge", MS0 + 50).payload
    assert host.handle("spBv1.0/STATE/iotbridge", offline, T0).commands == []
