"""Payload contracts: what a message must look like to enter a telemetry stream.

The built-in `telemetry` contract:
`{"ts": <epoch seconds or RFC 3339>, "seq": <int >= 0>, "values": {<name>: <finite number>}}`,
with an optional `"asset"` that must equal the topic's asset level. Payloads are validated from the
raw bytes (`model_validate_json`), so nothing is parsed twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    ValidationError,
)

from bridge.record import Reason
from config.errors import PayloadRejected
from config.settings import NAME_PATTERN

MAX_VALUES = 256


# JSON has no NaN or Infinity, but 1e400 parses to inf: finite is checked after parsing.
def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = Annotated[StrictFloat | StrictInt, AfterValidator(_finite)]
ValueName = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]


class TelemetryPayload(BaseModel):
    """The default route's contract."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    ts: Annotated[Finite, Field(gt=0)] | AwareDatetime
    # At most 2**53 - 1: exact in a double, as the dedup script's Lua numbers are.
    seq: Annotated[StrictInt, Field(ge=0, le=2**53 - 1)]
    values: Annotated[dict[ValueName, Finite], Field(min_length=1, max_length=MAX_VALUES)]
    asset: Annotated[str, StringConstraints(pattern=NAME_PATTERN)] | None = None

    @property
    def epoch(self) -> float:
        if isinstance(self.ts, datetime):
            return self.ts.timestamp()
        return float(self.ts)


@dataclass(frozen=True, slots=True)
class Sample:
    """A valid message: who sent it, its sequence number, device time and values."""

    asset: str
    seq: int
    ts: float
    values: dict[str, float]


def _reason_of(exc: ValidationError) -> Reason:
    kinds = {error["type"] for error in exc.errors()}
    return Reason.JSON if kinds & {"json_invalid", "json_type"} else Reason.SCHEMA


def _summary(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def validate_telemetry(payload: bytes, topic_asset: str, max_bytes: int) -> Sample:
    """Check size, JSON, schema and identity; raise PayloadRejected with the reason."""
    if len(payload) > max_bytes:
        raise PayloadRejected(Reason.SIZE, f"{len(payload)} bytes > limit {max_bytes}")
    try:
        model = TelemetryPayload.model_validate_json(payload)
    except ValidationError as exc:
        raise PayloadRejected(_reason_of(exc), _summary(exc)) from None
    if model.asset is not None and model.asset != topic_asset:
        raise PayloadRejected(
            Reason.IDENTITY, f"payload asset {model.asset!r} != topic asset {topic_asset!r}"
        )
    values = {name: float(v) for name, v in model.values.items()}
    return Sample(topic_asset, model.seq, model.epoch, values)
