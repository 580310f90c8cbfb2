"""Birth certificates: the metric tables of an edge node or device, and the session numbers.

NBIRTH and DBIRTH name every metric with its datatype and, when aliases are used, its alias
(tck-id-payloads-alias-birth-requirement, tck-id-payloads-metric-datatype-req), aliases unique
(tck-id-payloads-alias-uniqueness). A metric without a datatype is kept as Unknown: its values are
refused one by one (reason schema) rather than the whole node being unreadable. NBIRTH carries seq
0-255 and the bdSeq of the connection (tck-id-payloads-nbirth-seq, tck-id-payloads-nbirth-bdseq);
NDEATH carries the same bdSeq (tck-id-payloads-ndeath-bdseq).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.sparkplug import names
from bridge.sparkplug.payload import DataType, Metric, Payload, PayloadRefused, Value, value_of
from bridge.sparkplug.sequence import SEQ_MODULUS

BD_SEQ = "bdSeq"


@dataclass(slots=True)
class MetricState:
    """A metric as the host knows it: its birth declaration, its current value (not moved by
    historical values) and whether it is stale (after a death, until its next value or birth)."""

    name: str
    alias: int | None
    datatype: int
    value: Value | None = None
    timestamp_ms: int | None = None
    stale: bool = False


@dataclass(slots=True)
class Entity:
    """An edge node or a device: its asset id, metric tables and whether it is online."""

    asset: str
    by_name: dict[str, MetricState] = field(default_factory=dict)
    by_alias: dict[int, MetricState] = field(default_factory=dict)
    online: bool = True

    def go_offline(self) -> tuple[str, ...]:
        self.online = False
        for metric in self.by_name.values():
            metric.stale = True
        return tuple(names.value_name(name) for name in self.by_name)


def birth_seq(payload: Payload) -> int:
    if payload.seq is None or not 0 <= payload.seq < SEQ_MODULUS:
        raise PayloadRefused("NBIRTH needs a seq of 0-255")
    return payload.seq


def read_bd_seq(payload: Payload) -> int:
    metric = payload.metric(BD_SEQ)
    if metric is None:
        raise PayloadRefused("no bdSeq metric")
    value = value_of(metric, metric.datatype if metric.datatype is not None else DataType.INT64)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadRefused("bdSeq is not an integer")
    return value


def entity_of(asset: str, payload: Payload) -> Entity:
    """The metric tables of a birth; PayloadRefused when a name is missing or an alias repeats."""
    entity = Entity(asset)
    for metric in payload.metrics:
        if metric.name is None:
            raise PayloadRefused("a birth metric without a name")
        datatype = metric.datatype if metric.datatype is not None else DataType.UNKNOWN
        state = MetricState(metric.name, metric.alias, datatype)
        entity.by_name[metric.name] = state
        if metric.alias is not None:
            if metric.alias in entity.by_alias:
                raise PayloadRefused(f"alias {metric.alias} is declared twice")
            entity.by_alias[metric.alias] = state
    return entity


def birth_metrics(entity: Entity, payload: Payload) -> list[tuple[Metric, MetricState]]:
    return [(m, entity.by_name[m.name]) for m in payload.metrics if m.name is not None]
