"""Request and response models of the admin API, with the examples /docs shows."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _examples(*examples: dict[str, Any]) -> ConfigDict:
    return ConfigDict(json_schema_extra={"examples": list(examples)})


_LETTER_EXAMPLE: dict[str, Any] = {
    "id": "1767225600123-0",
    "topic": "plant/s1/l1/a1/telemetry",
    "route": "telemetry",
    "reason": "schema",
    "error": "seq: Input should be a valid integer",
    "received_at": 1767225600.12,
    "size": 52,
    "payload": '{"ts": 1767225600, "seq": "two", "values": {"t": 1}}',
    "payload_encoding": "utf-8",
    "truncated": False,
}


class DeadLetter(BaseModel):
    """One entry of the dead-letter stream: the message as it arrived and why it was refused."""

    model_config = _examples(_LETTER_EXAMPLE)

    id: str = Field(description="Stream entry id (Redis time of the write, ms, and a counter).")
    topic: str = Field(description="The topic the message had (MQTT, or the gateway's path).")
    route: str = Field(description="The route it matched, or `unrouted`.")
    reason: str = Field(description="size, json, schema, topic, identity, clock or rate.")
    error: str = Field(description="What the check found, for people.")
    received_at: float | None = Field(description="Receive time, epoch seconds.")
    size: int | None = Field(description="The payload's size as received, in bytes.")
    payload: str = Field(description="The stored payload: UTF-8 text, or base64 when not UTF-8.")
    payload_encoding: Literal["utf-8", "base64"] = Field(description="How `payload` is encoded.")
    truncated: bool = Field(
        description="The stored payload was cut at `bridge.dlq_payload_bytes`: it cannot be "
        "replayed (replay answers `not_replayable`)."
    )


class DeadLetterPage(BaseModel):
    """Dead letters in stream order, oldest first."""

    model_config = _examples({"items": [_LETTER_EXAMPLE], "next_cursor": "1767225600123-0"})

    items: list[DeadLetter]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null when the end was reached."
    )


class ReplayFilter(BaseModel):
    """Which dead letters to replay: all those matching every field given."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"reason": "schema", "route": "telemetry", "limit": 1000}]},
    )

    reason: str | None = Field(None, description="Only dead letters with this reason.")
    route: str | None = Field(None, description="Only dead letters of this route (or `unrouted`).")
    limit: int = Field(
        10_000, gt=0, le=100_000, description="At most this many are replayed by one request."
    )


ReplayStatus = Literal["stored", "duplicate", "rejected", "not_replayable"]


class ReplayResult(BaseModel):
    """What became of one replayed dead letter."""

    model_config = _examples(
        {
            "dead_letter": "1767225600123-0",
            "status": "stored",
            "id": "1767225700456-0",
            "reason": None,
            "error": None,
        },
        {
            "dead_letter": "1767225600124-0",
            "status": "rejected",
            "id": None,
            "reason": "schema",
            "error": "values.flow: Input should be less than or equal to 500",
        },
    )

    dead_letter: str = Field(description="Id of the dead letter replayed.")
    status: ReplayStatus = Field(
        description="stored: written to its telemetry stream, the dead letter removed; duplicate: "
        "already stored (dedup), the dead letter removed; rejected: still invalid, dead-lettered "
        "again with its new reason and the old entry removed; not_replayable: the payload was "
        "cut when it was dead-lettered, left as it is."
    )
    id: str | None = Field(description="The telemetry entry id when stored.")
    reason: str | None = Field(description="The new reason when rejected (or `truncated`).")
    error: str | None = Field(description="The new error text when rejected.")


class ReplaySummary(BaseModel):
    """Counts of a replay of every dead letter matching a filter."""

    model_config = _examples(
        {
            "matched": 100,
            "stored": 98,
            "duplicate": 0,
            "rejected": 2,
            "not_replayable": 0,
            "complete": True,
        },
    )

    matched: int = Field(description="Dead letters that matched the filter and were replayed.")
    stored: int
    duplicate: int
    rejected: int
    not_replayable: int
    complete: bool = Field(
        description="False when `limit` stopped the replay before the last matching dead letter "
        "(those written before the replay started): run it again for the rest."
    )


class ConsumerGroup(BaseModel):
    name: str
    consumers: int
    pending: int = Field(description="Delivered to a consumer, not yet acknowledged.")
    lag: int | None = Field(
        description="Entries not yet delivered to the group; null when Redis cannot tell (after "
        "deletions inside the unread part)."
    )
    last_delivered_id: str


class StreamInfo(BaseModel):
    """One telemetry stream (a route's shard) as XINFO STREAM and XINFO GROUPS report it."""

    model_config = _examples(
        {
            "route": "telemetry",
            "shard": 0,
            "key": "iotbridge:tel:telemetry",
            "exists": True,
            "length": 81234,
            "max_entries": 1000000,
            "fill_ratio": 0.081234,
            "max_age_s": None,
            "first_id": "1767225600000-0",
            "last_id": "1767229200000-3",
            "groups": [
                {
                    "name": "workers",
                    "consumers": 2,
                    "pending": 120,
                    "lag": 4,
                    "last_delivered_id": "1767229199000-0",
                }
            ],
        },
    )

    route: str
    shard: int
    key: str = Field(description="The Redis key of the stream.")
    exists: bool = Field(description="False until the first entry is written.")
    length: int = Field(description="XLEN.")
    max_entries: int = Field(description="The stream's bound (`bridge.retention.max_entries`).")
    fill_ratio: float = Field(
        description="length / max_entries. Above 1 while a consumer group still needs entries "
        "past the bound (retention never trims those)."
    )
    max_age_s: float | None = Field(description="The age bound, if any.")
    first_id: str | None
    last_id: str | None
    groups: list[ConsumerGroup]


class Anomaly(BaseModel):
    """One anomaly event as a worker wrote it."""

    model_config = _examples(
        {
            "id": "1767225601000-0",
            "event": "start",
            "asset": "a1",
            "route": "telemetry",
            "detector": "threshold",
            "value_name": "temperature",
            "value": 121.5,
            "bound": 110.0,
            "score": 121.5,
            "ts": 1767225600.5,
            "severity": "critical",
            "stream": "iotbridge:tel:telemetry",
            "source_id": "1767225600900-0",
        },
    )

    id: str = Field(description="Entry id in the anomaly stream (Redis time of the write, ms).")
    event: str = Field(description="start or ended.")
    asset: str
    route: str
    detector: str
    value_name: str = Field(description="Empty for detectors of the whole asset.")
    value: float | None
    bound: float | None
    score: float | None
    ts: float | None = Field(description="Device time of the sample, epoch seconds.")
    severity: str
    stream: str = Field(description="The telemetry stream of the sample that raised it.")
    source_id: str = Field(description="That sample's entry id.")


class AnomalyPage(BaseModel):
    model_config = _examples({"items": [], "next_cursor": None})

    items: list[Anomaly]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null when the window was read to its end."
    )


class Subscribers(BaseModel):
    """The live anomaly stream's clients in this gateway process."""

    model_config = _examples({"connected": 2, "cut_off_total": 1, "buffer_events": 256})

    connected: int
    cut_off_total: int = Field(
        description="Clients cut off because they read slower than anomalies arrived and their "
        "buffer filled (each got an `overflow` event naming where to resume)."
    )
    buffer_events: int = Field(description="Events one client may have waiting before it is cut.")


class RouteInfo(BaseModel):
    model_config = _examples(
        {
            "name": "telemetry",
            "topic": "plant/{site}/{line}/{asset}/telemetry",
            "filter": "plant/+/+/+/telemetry",
            "contract": "telemetry",
            "qos": 1,
            "asset_level": "asset",
            "streams": ["iotbridge:tel:telemetry"],
            "http_path": "/api/v1/topics/plant/{site}/{line}/{asset}/telemetry",
        },
    )

    name: str
    topic: str = Field(description="Topic template; `{level}` names a level.")
    filter: str = Field(description="The MQTT subscription filter derived from it.")
    contract: str
    qos: int
    asset_level: str
    streams: list[str] = Field(description="Its telemetry streams, in shard order.")
    http_path: str = Field(description="Where the gateway takes its messages over HTTP.")


class ContractInfo(BaseModel):
    model_config = _examples(
        {
            "name": "telemetry",
            "routes": ["telemetry"],
            "json_schema": {"type": "object", "required": ["ts", "seq", "values"]},
        },
    )

    name: str
    routes: list[str] = Field(description="The routes whose payloads it checks.")
    json_schema: dict[str, Any] = Field(description="The payload's JSON Schema (2020-12).")
