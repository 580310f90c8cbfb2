"""What /openapi.json shows of the ingest endpoint: its request body, answers and examples."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NDJSON = "application/x-ndjson"


# --- models (what /openapi.json shows) ------------------------------------------------------------


class TelemetryPayload(BaseModel):
    """The built-in `telemetry` contract's payload (a route with a declared contract takes its
    own `values`)."""

    model_config = ConfigDict(json_schema_extra={
        "examples": [{"ts": 1767225600.25, "seq": 42, "values": {"temperature": 71.5}}]})  # fmt: skip

    ts: float | str = Field(description="Device time: epoch seconds, or ISO 8601 with a zone.")
    seq: int = Field(ge=0, le=2**53 - 1, description="Per-asset sequence number (dedup identity).")
    values: dict[str, float | int | bool | str] = Field(description="Readings by name.")
    asset: str | None = Field(None, description="If present, must equal the topic's asset level.")


class Stored(BaseModel):
    model_config = ConfigDict(json_schema_extra={
        "examples": [{"status": "stored", "id": "1767225600251-0"},
                     {"status": "duplicate", "id": None}]})  # fmt: skip

    status: Literal["stored", "duplicate"] = Field(
        description="stored: a new telemetry entry; duplicate: the dedup already holds this "
        "(asset, seq), nothing was added."
    )
    id: str | None = Field(description="The telemetry entry's stream id when stored.")


class Rejected(BaseModel):
    model_config = ConfigDict(json_schema_extra={
        "examples": [{"reason": "schema", "error": "seq: must be an integer"}]})  # fmt: skip

    reason: str = Field(
        description="Dead-letter reason: json, schema, topic, identity, clock, size."
    )
    error: str = Field(description="What was wrong, as stored in the dead letter.")


class LineResult(BaseModel):
    status: Literal["stored", "duplicate", "rejected"]
    id: str | None = Field(None, description="Entry id when stored.")
    reason: str | None = Field(None, description="Dead-letter reason when rejected.")
    error: str | None = Field(None, description="Detail when rejected.")


class BulkResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "stored": 1, "duplicate": 0, "rejected": 1,
        "results": [{"status": "stored", "id": "1767225600251-0"},
                    {"status": "rejected", "reason": "json", "error": "not JSON: ..."}]}]})  # fmt: skip

    stored: int
    duplicate: int
    rejected: int
    results: list[LineResult] = Field(description="One per non-empty line, in order.")


class Problem(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"error": "redis unavailable"}]})

    error: str


RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No token, or not a valid one (WWW-Authenticate: Bearer)."},
    403: {"model": Problem, "description": "The token is not valid for this topic's asset."},
    413: {"description": "Body over bridge.max_payload_bytes (a single message: dead-lettered "
          "with reason size) or over the bulk limits, counted as read and after gzip decoding."},
    415: {"model": Problem, "description": "Content-Type not JSON or NDJSON, or an unknown "
          "Content-Encoding."},
    429: {"model": Problem, "description": "The asset's token bucket is empty; see Retry-After."},
    503: {"model": Problem, "description": "Redis is away or did not confirm the write within "
          "gateway.write_timeout_ms; retry after Retry-After (the dedup keeps one entry)."},
}  # fmt: skip


def request_body_schema() -> dict[str, Any]:
    example = {"ts": 1767225600.25, "seq": 42, "values": {"temperature": 71.5}}
    lines = "\n".join(json.dumps({**example, "seq": 42 + i}) for i in range(3)) + "\n"
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": TelemetryPayload.model_json_schema(), "example": example},
            NDJSON: {"schema": {"type": "string", "description": "One JSON payload a line."},
                     "example": lines},
        },
    }  # fmt: skip
