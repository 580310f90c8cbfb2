"""Sparkplug B payloads: protobuf bytes to plain, typed data and back.

The only module that touches the generated protobuf classes (`sparkplug_b_pb2`). Decoding is in
two steps, because DATA messages carry no datatype (tck-id-payloads-metric-datatype-not-req): a
metric keeps the raw value of whichever `value` field it set, and `value_of` reads it once the
datatype is known from the birth certificate (tck-id-payloads-metric-datatype-req).

Supported datatypes (tck-id-payloads-metric-datatype-value): the scalars Int8..Int64,
UInt8..UInt64, Float, Double, Boolean, String, DateTime, Text and UUID. DataSet, Bytes, File,
Template, property sets and arrays are refused, one metric at a time, with reason `schema`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from google.protobuf.message import DecodeError

from bridge.record import Reason
from bridge.sparkplug import sparkplug_b_pb2 as pb

Value = int | float | bool | str
Raw = int | float | bool | str | bytes | None


class DataType(IntEnum):
    """Sparkplug B datatypes (spec 6.4.16), the numbers of the proto's `DataType`."""

    UNKNOWN = 0
    INT8 = 1
    INT16 = 2
    INT32 = 3
    INT64 = 4
    UINT8 = 5
    UINT16 = 6
    UINT32 = 7
    UINT64 = 8
    FLOAT = 9
    DOUBLE = 10
    BOOLEAN = 11
    STRING = 12
    DATETIME = 13
    TEXT = 14
    UUID = 15
    DATASET = 16
    BYTES = 17
    FILE = 18
    TEMPLATE = 19


# Width in bits of the integer types; signed ones may arrive sign-extended to the carrier's width
# (32 bits in int_value, as Java Tahu writes -1 as 0xFFFFFFFF) or zero-extended from their own
# (as Python Tahu adds 2**8 to a negative Int8): both read back as the same number.
SIGNED_BITS = {DataType.INT8: 8, DataType.INT16: 16, DataType.INT32: 32, DataType.INT64: 64}
UNSIGNED_BITS = {DataType.UINT8: 8, DataType.UINT16: 16, DataType.UINT32: 32, DataType.UINT64: 64}
_TEXTS = frozenset({DataType.STRING, DataType.TEXT, DataType.UUID})
SUPPORTED = frozenset(
    {*SIGNED_BITS, *UNSIGNED_BITS, *_TEXTS, DataType.FLOAT, DataType.DOUBLE, DataType.BOOLEAN,
     DataType.DATETIME}
)  # fmt: skip


class PayloadRefused(ValueError):
    """A payload (or one metric of it) that cannot be read; `reason` is a dead-letter reason."""

    def __init__(self, detail: str, reason: Reason = Reason.SCHEMA) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric as sent: `datatype` None when omitted (DATA), `raw` the value field's content."""

    name: str | None
    alias: int | None
    timestamp_ms: int | None
    datatype: int | None
    is_null: bool
    is_historical: bool
    is_transient: bool
    field: str | None  # which `value` field was set: int_value, long_value, ... or None
    raw: Raw


@dataclass(frozen=True, slots=True)
class Payload:
    timestamp_ms: int | None
    seq: int | None
    metrics: tuple[Metric, ...]

    def metric(self, name: str) -> Metric | None:
        """The first metric of that name (births and deaths name every metric)."""
        return next((m for m in self.metrics if m.name == name), None)


def decode(data: bytes) -> Payload:
    """A Sparkplug B payload; PayloadRefused when the bytes are not one."""
    message = pb.Payload()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise PayloadRefused(f"not a Sparkplug B payload: {exc}") from None
    metrics = tuple(_metric(m) for m in message.metrics)
    return Payload(
        message.timestamp if message.HasField("timestamp") else None,
        message.seq if message.HasField("seq") else None,
        metrics,
    )


def _metric(m: pb.Payload.Metric) -> Metric:
    field = m.WhichOneof("value")
    raw: Raw = None
    if field in ("int_value", "long_value", "float_value", "double_value", "boolean_value"):
        raw = getattr(m, field)
    elif field == "string_value":
        raw = m.string_value
    elif field == "bytes_value":
        raw = m.bytes_value
    return Metric(
        m.name if m.HasField("name") else None,
        m.alias if m.HasField("alias") else None,
        m.timestamp if m.HasField("timestamp") else None,
        m.datatype if m.HasField("datatype") else None,
        m.is_null,
        m.is_historical,
        m.is_transient,
        field,
        raw,
    )


def datatype_name(datatype: int) -> str:
    try:
        return DataType(datatype).name
    except ValueError:
        return f"datatype {datatype}"


def value_of(metric: Metric, datatype: int) -> Value | None:
    """The metric's value read as `datatype`: None when is_null (the value is then absent:
    tck-id-payloads-metric-is-null); PayloadRefused for an unsupported datatype or a value field
    that does not fit it."""
    if datatype not in SUPPORTED:
        raise PayloadRefused(f"{datatype_name(datatype)} is not supported")
    if metric.is_null:
        return None
    kind = DataType(datatype)
    raw, field = metric.raw, metric.field
    if kind in SIGNED_BITS or kind in UNSIGNED_BITS or kind is DataType.DATETIME:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise PayloadRefused(f"{kind.name} needs int_value or long_value, not {field}")
        carrier = 32 if field == "int_value" else 64
        return _integer(kind, raw, carrier)
    if kind in (DataType.FLOAT, DataType.DOUBLE):
        if field not in ("float_value", "double_value"):
            raise PayloadRefused(f"{kind.name} needs float_value or double_value, not {field}")
        assert isinstance(raw, float)
        return raw
    if kind is DataType.BOOLEAN:
        if field != "boolean_value":
            raise PayloadRefused(f"Boolean needs boolean_value, not {field}")
        return bool(raw)
    if field != "string_value":
        raise PayloadRefused(f"{kind.name} needs string_value, not {field}")
    assert isinstance(raw, str)
    return raw


def _integer(kind: DataType, raw: int, carrier: int) -> int:
    if kind is DataType.DATETIME:
        return raw  # milliseconds since the epoch, unsigned
    if kind in UNSIGNED_BITS:
        bits = UNSIGNED_BITS[kind]
        if raw >= 1 << bits:
            raise PayloadRefused(f"{raw} is out of range for {kind.name}")
        return raw
    bits = SIGNED_BITS[kind]
    low = raw & ((1 << bits) - 1)
    value = low - (1 << bits) if low >> (bits - 1) else low
    high = raw >> bits
    # Zero-extended (high == 0) or sign-extended (every high bit set, value negative); anything
    # else is a number the type cannot hold.
    if high and not (value < 0 and high == (1 << (carrier - bits)) - 1):
        raise PayloadRefused(f"{raw} is out of range for {kind.name}")
    return value


@dataclass(frozen=True, slots=True)
class OutMetric:
    """A metric to encode (commands, tests, simulators)."""

    name: str | None
    datatype: DataType
    value: Value | None = None
    alias: int | None = None
    timestamp_ms: int | None = None
    is_historical: bool = False
    is_transient: bool = False


def encode(timestamp_ms: int | None, seq: int | None, metrics: Iterable[OutMetric]) -> bytes:
    """A Sparkplug B payload. Signed integers are written sign-extended to their field's width,
    as the spec's two's complement over uint32/uint64 reads; a None value sets is_null."""
    message = pb.Payload()
    if timestamp_ms is not None:
        message.timestamp = timestamp_ms
    if seq is not None:
        message.seq = seq
    for metric in metrics:
        _encode_metric(message.metrics.add(), metric)
    data: bytes = message.SerializeToString()
    return data


def _encode_metric(m: pb.Payload.Metric, metric: OutMetric) -> None:
    if metric.name is not None:
        m.name = metric.name
    if metric.alias is not None:
        m.alias = metric.alias
    if metric.timestamp_ms is not None:
        m.timestamp = metric.timestamp_ms
    m.datatype = metric.datatype
    if metric.is_historical:
        m.is_historical = True
    if metric.is_transient:
        m.is_transient = True
    if metric.value is None:
        m.is_null = True
    else:
        _set_value(m, metric.datatype, metric.value)


def _set_value(m: pb.Payload.Metric, kind: DataType, value: Value) -> None:
    if kind in SIGNED_BITS and isinstance(value, int):
        carrier = 32 if SIGNED_BITS[kind] <= 32 else 64
        setattr(m, "int_value" if carrier == 32 else "long_value", value % (1 << carrier))
    elif kind in (DataType.UINT8, DataType.UINT16, DataType.UINT32) and isinstance(value, int):
        m.int_value = value
    elif kind in (DataType.UINT64, DataType.DATETIME) and isinstance(value, int):
        m.long_value = value
    elif kind is DataType.FLOAT and isinstance(value, float | int):
        m.float_value = value
    elif kind is DataType.DOUBLE and isinstance(value, float | int):
        m.double_value = value
    elif kind is DataType.BOOLEAN and isinstance(value, bool):
        m.boolean_value = value
    elif kind in _TEXTS and isinstance(value, str):
        m.string_value = value
    else:
        raise ValueError(f"cannot encode {value!r} as {kind.name}")
