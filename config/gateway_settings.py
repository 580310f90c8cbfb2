"""Settings of the HTTP gateway: its address, the admin token, and its group-commit writes."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from config.sections import Section


class GatewaySettings(Section):
    host: str = Field("127.0.0.1", description="Listen address of the gateway's HTTP server.")
    port: int = Field(
        8000, ge=0, le=65535, description="Port of the API, /docs, /metrics, /healthz, /readyz."
    )
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the admin endpoints; set it with "
        "IOTBRIDGE_GATEWAY__ADMIN_TOKEN, never in the file. null: the admin endpoints refuse all.",
    )
    write_timeout_ms: float = Field(
        2000.0,
        gt=0,
        description="A request whose write Redis has not confirmed within this is answered 503 "
        "with Retry-After (a retry is deduplicated).",
    )
    batch_max_size: int = Field(
        500, gt=0, le=100_000, description="Messages per Redis round trip (group commit)."
    )
    pipeline: int = Field(
        2,
        ge=1,
        le=8,
        description="Batches written to Redis at once; requests arriving meanwhile share the next.",
    )
    max_pending: int = Field(
        20_000,
        gt=0,
        description="Messages waiting for their batch; beyond it a request is answered 503.",
    )
    max_bulk_lines: int = Field(
        1000, gt=0, le=100_000, description="Lines accepted in one NDJSON request (413 beyond)."
    )
    max_bulk_bytes: int = Field(
        4_194_304, gt=0, description="Decoded body bytes of one NDJSON request (413 beyond)."
    )
    token_refresh_s: float = Field(
        5.0,
        gt=0,
        description="How often the device tokens are reloaded from Redis: a revoked token stops "
        "working within this time (a new one works at once).",
    )
    auth_failures: int = Field(
        10,
        gt=0,
        description="Failed token checks from one client address before its requests are slowed.",
    )
    auth_penalty_ms: float = Field(
        500.0,
        ge=0,
        description="Delay added to each failing request of a client past auth_failures, doubling "
        "per further failure up to 8x; cleared by a success.",
    )

    @field_validator("admin_token")
    @classmethod
    def _not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value
