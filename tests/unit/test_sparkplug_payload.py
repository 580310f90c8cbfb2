"""Sparkplug B payloads: every scalar datatype reads back exactly, flags survive, the rest is refused."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sparkplug import sparkplug_b_pb2 as pb
from bridge.sparkplug.payload import (
    SIGNED_BITS,
    UNSIGNED_BITS,
    DataType,
    Metric,
    OutMetric,
    PayloadRefused,
    Value,
    decode,
    encode,
    value_of,
)

FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.401298464324817e-45  # the smallest positive float32 (subnormal)


def _signed_cases() -> list[tuple[DataType, int]]:
    cases = []
    for kind, bits in SIGNED_BITS.items():
        cases += [(kind, -(1 << (bits - 1))), (kind, (1 << (bits - 1)) - 1), (kind, -1), (kind, 0)]
    return cases


def _unsigned_cases() -> list[tuple[DataType, int]]:
    return [(k, v) for k, bits in UNSIGNED_BITS.items() for v in (0, (1 << bits) - 1)]


SCALAR_CASES: list[tuple[DataType, Value]] = [
    *_signed_cases(),
    *_unsigned_cases(),
    (DataType.FLOAT, -FLOAT32_MAX),
    (DataType.FLOAT, FLOAT32_MAX),
    (DataType.FLOAT, -1.0),
    (DataType.FLOAT, FLOAT32_TINY),
    (DataType.DOUBLE, -1.7976931348623157e308),
    (DataType.DOUBLE, 1.7976931348623157e308),
    (DataType.DOUBLE, -1.0),
    (DataType.DOUBLE, 5e-324),
    (DataType.BOOLEAN, True),
    (DataType.BOOLEAN, False),
    (DataType.STRING, ""),
    (DataType.STRING, "Zürich / 東京 ✓"),
    (DataType.TEXT, "line one\nline two"),
    (DataType.UUID, "3f2504e0-4f89-11d3-9a0c-0305e82c3301"),
    (DataType.DATETIME, 0),
    (DataType.DATETIME, (1 << 64) - 1),
    (DataType.DATETIME, 1_700_000_000_123),
]


def _round_trip(kind: DataType, value: Value | None, **flags: bool) -> tuple[Value | None, Metric]:
    data = encode(1, 5, [OutMetric("m", kind, value, alias=7, timestamp_ms=2, **flags)])
    payload = decode(data)
    (metric,) = payload.metrics
    return value_of(metric, metric.datatype or 0), metric


@pytest.mark.parametrize(("kind", "value"), SCALAR_CASES, ids=str)
def test_every_scalar_reads_back_exactly_at_its_bounds(kind: DataType, value: Value) -> None:
    decoded, _ = _round_trip(kind, value)
    assert decoded == value
    assert type(decoded) is type(value)


def test_negative_signed_integers_are_sign_extended_on_the_wire() -> None:
    """-1 as Int8 travels as 0xFFFFFFFF in int_value, as Int64 as 2**64 - 1 in long_value."""
    wire = pb.Payload.FromString(
        encode(None, 0, [OutMetric("a", DataType.INT8, -1), OutMetric("b", DataType.INT64, -1)])
    )
    assert wire.metrics[0].int_value == 0xFFFFFFFF
    assert wire.metrics[1].long_value == (1 << 64) - 1


@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        (DataType.INT8, 0xFF, -1),  # zero-extended from 8 bits (Python Tahu)
        (DataType.INT8, 0x80, -128),
        (DataType.INT16, 0xFFFF, -1),
        (DataType.INT16, 0xFFFF8000, -32768),  # sign-extended to 32 bits (Java Tahu)
        (DataType.INT32, 0xFFFFFFFF, -1),
        (DataType.INT8, 0x7F, 127),
    ],
)
def test_negative_integers_read_from_either_extension(
    kind: DataType, raw: int, expected: int
) -> None:
    message = pb.Payload()
    metric = message.metrics.add(name="m", datatype=kind)
    metric.int_value = raw
    (decoded,) = decode(message.SerializeToString()).metrics
    assert value_of(decoded, kind) == expected


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        (DataType.INT8, 0x100),
        (DataType.INT8, 0xFFFFFF7F),
        (DataType.UINT8, 256),
        (DataType.UINT16, 65536),
    ],
)
def test_integers_out_of_range_are_refused(kind: DataType, raw: int) -> None:
    message = pb.Payload()
    message.metrics.add(name="m", datatype=kind, int_value=raw)
    (decoded,) = decode(message.SerializeToString()).metrics
    with pytest.raises(PayloadRefused) as refused:
        value_of(decoded, kind)
    assert refused.value.reason == "schema"


def test_flags_read_back_exactly() -> None:
    _, plain = _round_trip(DataType.DOUBLE, 1.5)
    _, historical = _round_trip(DataType.DOUBLE, 1.5, is_historical=True)
    _, transient = _round_trip(DataType.DOUBLE, 1.5, is_transient=True)
    null_value, null = _round_trip(DataType.DOUBLE, None)
    flags = [
        (m.is_null, m.is_historical, m.is_transient) for m in (plain, historical, transient, null)
    ]
    assert flags == [
        (False, False, False),
        (False, True, False),
        (False, False, True),
        (True, False, False),
    ]
    assert null_value is None
    assert null.field is None


def test_metric_fields_read_back() -> None:
    payload = decode(
        encode(
            1_700_000_000_000,
            42,
            [OutMetric("a/b c", DataType.INT32, -5, alias=9, timestamp_ms=123)],
        )
    )
    assert (payload.timestamp_ms, payload.seq) == (1_700_000_000_000, 42)
    (metric,) = payload.metrics
    assert (metric.name, metric.alias, metric.timestamp_ms, metric.datatype) == (
        "a/b c",
        9,
        123,
        DataType.INT32,
    )


@pytest.mark.parametrize(
    ("kind", "setup"),
    [
        (DataType.DATASET, lambda m: m.dataset_value.columns.append("x")),
        (DataType.TEMPLATE, lambda m: setattr(m.template_value, "version", "1")),
        (DataType.BYTES, lambda m: setattr(m, "bytes_value", b"\x00\x01")),
        (DataType.FILE, lambda m: setattr(m, "bytes_value", b"file")),
        (DataType.UNKNOWN, lambda m: setattr(m, "int_value", 1)),
        (99, lambda m: setattr(m, "int_value", 1)),
    ],
    ids=["DataSet", "Template", "Bytes", "File", "Unknown", "99"],
)
def test_complex_datatypes_are_refused_with_reason_schema(kind: int, setup) -> None:
    message = pb.Payload()
    metric = message.metrics.add(name="m", datatype=kind)
    setup(metric)
    (decoded,) = decode(message.SerializeToString()).metrics
    with pytest.raises(PayloadRefused) as refused:
        value_of(decoded, kind)
    assert refused.value.reason == "schema"
    assert "not supported" in refused.value.detail


def test_a_value_in_the_wrong_field_is_refused() -> None:
    (metric,) = decode(encode(None, 0, [OutMetric("m", DataType.STRING, "x")])).metrics
    with pytest.raises(PayloadRefused, match="needs int_value"):
        value_of(metric, DataType.INT32)


def test_bytes_that_are_not_a_payload_are_refused() -> None:
    with pytest.raises(PayloadRefused) as refused:
        decode(b'{"ts": 1, "seq": 2}')
    assert refused.value.reason == "schema"


INTEGER_TYPES = [*SIGNED_BITS.items(), *UNSIGNED_BITS.items()]


@st.composite
def _integers(draw: st.DrawFn) -> tuple[DataType, int]:
    kind, bits = draw(st.sampled_from(INTEGER_TYPES))
    if kind in SIGNED_BITS:
        return kind, draw(st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1))
    return kind, draw(st.integers(0, (1 << bits) - 1))


@settings(max_examples=300, deadline=None, database=None)
@given(_integers(), st.booleans(), st.booleans())
def test_integer_round_trip(case: tuple[DataType, int], historical: bool, transient: bool) -> None:
    kind, value = case
    decoded, metric = _round_trip(kind, value, is_historical=historical, is_transient=transient)
    assert decoded == value
    assert (metric.is_historical, metric.is_transient, metric.is_null) == (
        historical,
        transient,
        False,
    )


@settings(max_examples=200, deadline=None, database=None)
@given(st.floats(width=32), st.floats(), st.text())
def test_float_double_and_text_round_trip(single: float, double: float, text: str) -> None:
    for kind, value in (
        (DataType.FLOAT, single),
        (DataType.DOUBLE, double),
        (DataType.STRING, text),
    ):
        decoded, _ = _round_trip(kind, value)
        if isinstance(value, float) and math.isnan(value):
            assert isinstance(decoded, float)
            assert math.isnan(decoded)
        else:
            assert decoded == value
