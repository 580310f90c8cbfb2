"""Intake without servers: what one received message becomes (the appends the sink sends as they
are, so their packed fields must agree with their field count)."""

from __future__ import annotations

import time
from dataclasses import replace

from bridge.intake import Intake
from bridge.sink import RedisSink, dedup_args
from bridge.source import Inbound
from config.keys import Keys
from config.settings import Settings

TOPIC = "plant/s1/l1/a1/telemetry"


def _inbound(payload: bytes, topic: str = TOPIC, retain: bool = False) -> Inbound:
    return Inbound(1, 1, topic, topic.encode(), payload, retain, 1, time.monotonic(), time.time())


def _fields(intake: Intake, inbound: Inbound) -> dict[bytes, bytes]:
    pending = intake.classify(inbound)
    assert pending.append is not None
    flat = pending.append.fields()
    assert len(flat) == pending.append.count
    return dict(zip(flat[::2], flat[1::2], strict=True))


def test_a_telemetry_entry_has_every_field_once_in_its_count() -> None:
    intake = Intake(Settings().bridge, Keys("t"))
    payload = b'{"ts": %d, "seq": 7, "values": {"temp": 71.25, "rpm": 1480}}' % time.time()
    for _ in range(2):  # the second message reuses what was packed for the topic
        fields = _fields(intake, _inbound(payload))
        assert fields.keys() - {b"rx"} == {b"asset", b"seq", b"ts", b"topic", b"route", b"site",
                                           b"line", b"v.temp", b"v.rpm"}  # fmt: skip
        assert (fields[b"asset"], fields[b"seq"], fields[b"v.temp"], fields[b"v.rpm"]) == (
            b"a1", b"7", b"71.25", b"1480.0")  # fmt: skip
        assert fields[b"topic"] == TOPIC.encode()


def test_a_retained_message_under_tag_is_marked_and_counted() -> None:
    settings = Settings.model_validate({"bridge": {"retained": "tag"}})
    intake = Intake(settings.bridge, Keys("t"))
    payload = b'{"ts": %d, "seq": 7, "values": {"temp": 1}}' % time.time()
    assert _fields(intake, _inbound(payload, retain=True))[b"retained"] == b"1"


def test_a_dead_letter_counts_its_fields_too() -> None:
    intake = Intake(Settings().bridge, Keys("t"))
    fields = _fields(intake, _inbound(b'{"ts": 1, "seq": "x"}'))
    assert fields[b"reason"] == b"schema"


def test_the_dedup_arguments_packed_by_the_intake_are_the_sinks() -> None:
    """The intake packs asset, seq and ts once, for the entry and the dedup script alike: the
    script gets the same arguments as from a Dedup the sink packs itself (one from the spool)."""
    intake = Intake(Settings().bridge, Keys("t"))
    ts = time.time()
    pending = intake.classify(_inbound(b'{"ts": %r, "seq": 12345678901, "values": {"t": 1}}' % ts))
    assert pending.append is not None
    assert pending.append.dedup is not None
    dedup = pending.append.dedup
    assert dedup.packed == dedup_args(b"a1", 12345678901, ts)
    sink = RedisSink(Settings().redis, intake.write_keys)
    unpacked = replace(pending.append, dedup=replace(dedup, packed=b""))
    assert sink.pack([pending.append]) == sink.pack([unpacked])


def test_readings_are_stored_as_their_repr_the_second_time_too() -> None:
    """Reading texts are made once per value: what is stored is still repr(float(reading)), and
    -0.0 (equal to 0.0) keeps its sign."""
    intake = Intake(Settings().bridge, Keys("t"))
    payload = b'{"ts": %d, "seq": 7, "values": {"a": -0.0, "b": 0.0, "c": 1e16, "d": 0.10, "e": 3}}'
    for order in (payload, payload.replace(b'"a": -0.0, "b": 0.0', b'"b": 0.0, "a": -0.0')):
        fields = _fields(intake, _inbound(order % time.time()))
        assert [fields[b"v." + name] for name in (b"a", b"b", b"c", b"d", b"e")] == [
            b"-0.0", b"0.0", b"1e+16", b"0.1", b"3.0"]  # fmt: skip
