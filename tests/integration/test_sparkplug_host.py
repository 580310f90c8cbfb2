"""The Sparkplug B host in the bridge, against real mosquitto and redis-server: what edge nodes'
births, DATA and deaths become in the `sparkplug` stream, sequence gaps and rebirth requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from bridge.app import BridgeApp
from bridge.sparkplug.payload import DataType, OutMetric, encode
from config.keys import Keys
from config.settings import Settings
from tests.clients import running_bridge, sample, wait_for
from tests.faults import redis as own_redis
from tests.sparkplug_edge import EdgeNode

pytestmark = pytest.mark.integration

SP = "iotbridge_sparkplug_"
TIMEOUT_MS = 400
INTERVAL_S = 3.0


def _settings(make_settings: Callable[..., Settings], unique: str, **extra: Any) -> Settings:
    sparkplug = {"enabled": True, "host_id": unique, "groups": [unique],
                 "reorder_timeout_ms": TIMEOUT_MS, "rebirth_min_interval_s": INTERVAL_S}  # fmt: skip
    return make_settings(sparkplug={**sparkplug, **extra})


def _entries(settings: Settings) -> list[dict[str, str]]:
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    keys = Keys(settings.redis.key_prefix, settings.redis.stream_shards)
    return [fields for stream in keys.telemetry_streams("sparkplug")
            for _, fields in db.xrange(stream)]  # fmt: skip


def _of(entries: list[dict[str, str]], kind: str) -> list[dict[str, str]]:
    return [e for e in entries if e.get("sp.type") == kind]


async def _edge(
    app: BridgeApp, settings: Settings, node: str = "Edge 1", bd_seq: int = 0
) -> EdgeNode:
    return await asyncio.to_thread(
        EdgeNode, settings.mqtt.url, settings.sparkplug.groups[0], node, bd_seq,
        settings.mqtt.protocol,
    )  # fmt: skip


def _device_birth(edge: EdgeNode) -> None:
    edge.publish("DBIRTH", [OutMetric("Speed", DataType.INT32, 0, alias=1)], device="Motor 1")


def _ddata(edge: EdgeNode, value: int, seq: int | None = None) -> None:
    edge.publish("DDATA", [OutMetric(None, DataType.INT32, value, alias=1)], "Motor 1", seq)


async def test_600_consecutive_messages_wrap_the_seq_twice_with_0_gaps_and_0_rebirths(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings)
        try:
            edge.birth([OutMetric("Load", DataType.DOUBLE, 0.5, alias=7)])
            _device_birth(edge)
            for value in range(600):  # seqs 2..601: past 255 and 511
                _ddata(edge, value)
            await wait_for(lambda: len(_of(_entries(settings), "DDATA")) == 600, 20, "600 entries")
            assert edge.seq == 602 % 256
        finally:
            await asyncio.to_thread(edge.close)
        assert sample(app, SP + "seq_gaps_total") == 0
        assert sample(app, SP + "rebirth_requests_total") == 0
        assert sample(app, SP + "births_total", level="node") == 1
        assert sample(app, SP + "births_total", level="device") == 1
    data = _of(_entries(settings), "DDATA")
    assert [int(e["v.Speed"]) for e in data] == list(range(600))
    assert {e["asset"] for e in data} == {f"{unique}.Edge-201.Motor-201"}
    assert [int(e["seq"]) for e in data] == list(range(1, 601))  # the DBIRTH's entry is seq 0
    assert [int(e["sp.seq"]) for e in data] == [s % 256 for s in range(2, 602)]
    assert edge.rebirths() == []


async def test_two_messages_swapped_within_the_reorder_timeout_are_both_stored_with_0_rebirths(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique, reorder_timeout_ms=2000)
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings)
        try:
            edge.birth([])
            _device_birth(edge)  # seq 1
            for value, seq in ((3, 3), (2, 2), (4, 4)):
                _ddata(edge, value, seq)
            await wait_for(lambda: len(_of(_entries(settings), "DDATA")) == 3, 10, "3 entries")
        finally:
            await asyncio.to_thread(edge.close)
        assert sample(app, SP + "rebirth_requests_total") == 0
        assert sample(app, SP + "seq_gaps_total") == 0
    assert [e["v.Speed"] for e in _of(_entries(settings), "DDATA")] == ["2", "3", "4"]
    assert edge.rebirths() == []


async def test_a_dropped_seq_gives_exactly_1_rebirth_ncmd_within_the_timeout_and_half_a_second(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings)
        try:
            edge.birth([])
            _device_birth(edge)
            _ddata(edge, 2, seq=2)
            sent = time.time()
            _ddata(edge, 4, seq=4)  # seq 3 never comes
            limit_s = TIMEOUT_MS / 1000 + 0.5
            await wait_for(edge.rebirths, limit_s + 1, "a rebirth request")
            assert edge.rebirths()[0] - sent <= limit_s
            # The held message is written once the hole is given up on.
            await wait_for(lambda: len(_of(_entries(settings), "DDATA")) == 2, 5, "both entries")
            # A storm of gaps within the interval: every further request is held back.
            first = edge.rebirths()[0]
            seq = 5
            for value in range(8):
                _ddata(edge, value, seq=seq)
                seq += 2  # a hole before every message
            await wait_for(lambda: sample(app, SP + "rebirth_requests_suppressed_total") >= 1,
                           first + INTERVAL_S - time.time(), "a suppressed request")  # fmt: skip
            assert time.time() - first < INTERVAL_S
            [(_, topic, qos, retain, metrics)] = edge.commands
        finally:
            await asyncio.to_thread(edge.close)
        assert sample(app, SP + "rebirth_requests_total") == 1
        assert sample(app, SP + "seq_gaps_total") >= 2
    assert (topic, qos, retain) == (f"spBv1.0/{unique}/NCMD/Edge 1", 0, False)
    assert metrics == [("Node Control/Rebirth", True)]


async def test_an_unknown_alias_writes_nothing_and_asks_for_1_rebirth(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings)
        try:
            edge.publish("DDATA", [OutMetric(None, DataType.INT32, 1, alias=1)], "Motor 1")
            await wait_for(lambda: len(edge.rebirths()) == 1, 5, "a rebirth request (no birth)")
            edge.birth([])
            _device_birth(edge)
            edge.publish("DDATA", [OutMetric(None, DataType.INT32, 5, alias=1),
                                   OutMetric(None, DataType.INT32, 6, alias=99)], "Motor 1")  # fmt: skip
            await wait_for(lambda: sample(app, SP + "unknown_total") == 2, 5, "the unknown alias")
        finally:
            await asyncio.to_thread(edge.close)
        assert sample(app, SP + "rebirth_requests_total") == 1  # the second within the interval
    assert _of(_entries(settings), "DDATA") == []


async def test_values_of_every_scalar_datatype_at_min_max_and_minus_1_are_stored_exactly(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    metrics, expected = [], {}
    bounds = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}
    for kind, bits in bounds.items():
        for label, value in (
            ("min", -(1 << (bits - 1))),
            ("max", (1 << (bits - 1)) - 1),
            ("m1", -1),
        ):
            metrics.append(OutMetric(f"{kind.name}/{label}", kind, value))
            expected[f"v.{kind.name}.{label}"] = str(value)
    for kind, bits in {DataType.UINT8: 8, DataType.UINT16: 16, DataType.UINT32: 32,
                       DataType.UINT64: 64}.items():  # fmt: skip
        for label, value in (("min", 0), ("max", (1 << bits) - 1)):
            metrics.append(OutMetric(f"{kind.name}/{label}", kind, value))
            expected[f"v.{kind.name}.{label}"] = str(value)
    metrics += [
        OutMetric("FLOAT", DataType.FLOAT, -1.5),
        OutMetric("DOUBLE", DataType.DOUBLE, 1.7976931348623157e308),
        OutMetric("BOOLEAN", DataType.BOOLEAN, True),
        OutMetric("DATETIME", DataType.DATETIME, 1_700_000_000_123),
        OutMetric("STRING", DataType.STRING, "naïve ✓"),
        OutMetric("TEXT", DataType.TEXT, "line 1\nline 2"),
        OutMetric("UUID", DataType.UUID, "123e4567-e89b-12d3-a456-426614174000"),
        OutMetric("NULL", DataType.INT32, None),
    ]
    expected |= {"v.FLOAT": "-1.5", "v.DOUBLE": "1.7976931348623157e+308", "v.BOOLEAN": "1.0",
                 "v.DATETIME": "1700000000123", "s.STRING": "naïve ✓", "s.TEXT": "line 1\nline 2",
                 "s.UUID": "123e4567-e89b-12d3-a456-426614174000", "sp.null": "NULL"}  # fmt: skip
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings)
        try:
            edge.birth(metrics)
            historical = OutMetric("INT8/m1", DataType.INT8, -128, timestamp_ms=1_600_000_000_000,
                                   is_historical=True)  # fmt: skip
            edge.publish("NDATA", [historical])
            await wait_for(lambda: len(_entries(settings)) == 2, 10, "the birth and the NDATA")
        finally:
            await asyncio.to_thread(edge.close)
        assert sample(app, SP + "messages_rejected_total", reason="schema") == 0
    birth, data = _entries(settings)
    assert {k: birth.get(k) for k in expected} == expected
    assert (data["v.INT8.m1"], data["ts"], data["sp.historical"]) == ("-128", "1600000000.0", "1")
    assert "sp.historical" not in birth


async def test_deaths_mark_the_node_and_its_devices_stale_and_an_old_ndeath_changes_nothing(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings, bd_seq=4)
        try:
            edge.birth([OutMetric("Load", DataType.DOUBLE, 0.5)])
            _device_birth(edge)
            edge.publish("DDEATH", [], device="Motor 1")
            await wait_for(lambda: len(_of(_entries(settings), "DDEATH")) == 1, 5, "the DDEATH")
            assert sample(app, SP + "online", level="device") == 0
            assert sample(app, SP + "stale_metrics") == 1
            _device_birth(edge)
            # An NDEATH of an earlier connection of the node (bdSeq 3): this session lives on.
            stale = encode(None, None, [OutMetric("bdSeq", DataType.INT64, 3)])
            edge.client.publish(edge.topic("NDEATH"), stale, qos=1).wait_for_publish(5)
            edge.publish("DDATA", [OutMetric(None, DataType.INT32, 9, alias=1)], "Motor 1")
            await wait_for(lambda: len(_of(_entries(settings), "DDATA")) == 1, 5, "DATA after it")
            assert sample(app, SP + "online", level="node") == 1
            await asyncio.to_thread(edge.die)
            await wait_for(lambda: len(_of(_entries(settings), "NDEATH")) == 2, 5, "the NDEATH")
        finally:
            await asyncio.to_thread(edge.close)
        assert sample(app, SP + "online", level="node") == 0
        assert sample(app, SP + "online", level="device") == 0
        # Node: bdSeq, Node Control/Rebirth, Load; device: Speed.
        assert sample(app, SP + "stale_metrics") == 4
        assert sample(app, SP + "deaths_total", level="device") == 2
    deaths = {e["asset"]: e for e in _of(_entries(settings), "NDEATH")}
    node, device = f"{unique}.Edge-201", f"{unique}.Edge-201.Motor-201"
    assert set(deaths) == {node, device}
    assert deaths[node]["sp.online"] == "0"
    assert deaths[node]["sp.bdseq"] == "4"
    assert set(deaths[node]["sp.stale"].split(",")) == {"bdSeq", "Node-20Control.Rebirth", "Load"}
    assert deaths[device]["sp.stale"] == "Speed"


async def test_after_a_restart_entry_seqs_continue_and_nothing_is_taken_for_a_duplicate(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = _settings(make_settings, unique)
    for run in range(2):
        async with running_bridge(settings) as app:
            edge = await _edge(app, settings)
            try:
                edge.birth([])
                _device_birth(edge)
                for value in range(10):
                    _ddata(edge, value)
                await wait_for(lambda: len(_of(_entries(settings), "DDATA")) == 10 * (run + 1),  # noqa: B023
                               10, "10 entries")  # fmt: skip
            finally:
                await asyncio.to_thread(edge.close)
            assert sample(app, SP + "entries_duplicate_total") == 0
    device = [e for e in _entries(settings) if e["asset"].endswith("Motor-201")]
    assert [int(e["seq"]) for e in device] == list(range(22))


async def test_an_oversized_message_and_a_future_timestamp_are_dead_lettered_by_reason(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    settings = make_settings(
        sparkplug={"enabled": True, "host_id": unique, "groups": [unique]},
        bridge={"max_payload_bytes": 1024},
    )
    db = redis.Redis.from_url(settings.redis.url)  # dead letters hold the raw protobuf bytes
    dlq = Keys(settings.redis.key_prefix).dead_letters
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings)
        try:
            edge.birth([])
            _device_birth(edge)
            edge.publish("DDATA", [OutMetric("Note", DataType.STRING, "x" * 2000)], "Motor 1")
            ahead_ms = round((time.time() + 3600) * 1000)
            edge.publish("DDATA", [OutMetric(None, DataType.INT32, 7, alias=1,
                                             timestamp_ms=ahead_ms)], "Motor 1")  # fmt: skip
            await wait_for(lambda: db.xlen(dlq) == 2, 5, "two dead letters")
        finally:
            await asyncio.to_thread(edge.close)
        assert sample(app, SP + "messages_rejected_total", reason="size") == 1
        assert sample(app, SP + "messages_rejected_total", reason="clock") == 1
    size, clock = ({k.decode(): v if k == b"payload" else v.decode() for k, v in fields.items()}
                   for _, fields in db.xrange(dlq))  # fmt: skip
    assert 2000 < len(size["payload"]) <= settings.bridge.dlq_payload_bytes  # the whole message
    assert (size["reason"], size["route"], size["topic"]) == (
        "size", "sparkplug", f"spBv1.0/{unique}/DDATA/Edge 1/Motor 1")  # fmt: skip
    assert (clock["reason"], clock["topic"]) == ("clock", f"spBv1.0/{unique}/DDATA/Edge 1/Motor 1")
    assert "in the future" in clock["error"]
    assert _of(_entries(settings), "DDATA") == []


async def test_a_burst_fills_the_queue_to_its_bound_and_qos0_past_it_is_dropped_and_counted(
    make_settings: Callable[..., Settings], unique: str
) -> None:
    bound, count = 100, 2000
    settings = make_settings(
        sparkplug={"enabled": True, "host_id": unique, "groups": [unique],
                   "rebirth_min_interval_s": 60},
        bridge={"max_in_flight": bound},
    )  # fmt: skip
    async with running_bridge(settings) as app:
        edge = await _edge(app, settings)
        try:
            edge.birth([])
            _device_birth(edge)
            for value in range(count):
                _ddata(edge, value)
            await wait_for(lambda: sample(app, SP + "messages_received_total", type="DDATA")
                           == count, 20, "every DDATA received")  # fmt: skip
            session = app.sparkplug
            assert session is not None
            # Empty, and nothing held for reordering (given up on after the reorder timeout).
            await wait_for(lambda: not session.queue and session.host.next_deadline is None, 10,
                           "the queue to empty")  # fmt: skip
        finally:
            await asyncio.to_thread(edge.close)
        dropped = sample(app, SP + "messages_dropped_total")
        assert dropped > 0  # drops happen only with the queue at its bound
        # A message far past a run of drops looks like one the host has passed: not placed.
        unplaced = sample(app, SP + "unplaced_total")
    assert len(_of(_entries(settings), "DDATA")) + dropped + unplaced == count


async def test_while_redis_is_down_the_host_is_offline_and_writes_what_it_held_once_back(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path
) -> None:
    service = own_redis(tmp_path / "redis")
    service.start()
    settings = make_settings(
        redis={"url": f"redis://127.0.0.1:{service.port}/0", "key_prefix": unique,
               "socket_timeout_s": 0.5, "connect_timeout_s": 0.5},
        sparkplug={"enabled": True, "host_id": unique, "groups": [unique]},
    )  # fmt: skip
    try:
        async with running_bridge(settings) as app:
            session = app.sparkplug
            assert session is not None
            edge = await _edge(app, settings)
            try:
                edge.birth([])
                _device_birth(edge)
                await wait_for(lambda: len(_entries(settings)) == 1, 5, "the DBIRTH entry")
                first_connect = session.host.connect_ms
                service.kill()
                _ddata(edge, 1)  # received, then held: Redis refuses it
                await wait_for(lambda: not session.online, 10, "the host to go offline")
                assert sample(app, SP + "connected") == 0
                service.start()
                await wait_for(lambda: session.online, 20, "the host back online")
                assert (session.host.connect_ms or 0) > (first_connect or 0)  # a new session
                await wait_for(lambda: len(_of(_entries(settings), "DDATA")) == 1, 10,
                               "the held DDATA written")  # fmt: skip
            finally:
                await asyncio.to_thread(edge.close)
        assert sample(app, SP + "entries_written_total") == 2
    finally:
        service.stop()
