"""The gateway's HTTP API: ingest (`POST /api/v1/topics/{topic}`), the admin router, the offline
/docs and /redoc, and /metrics, /healthz, /readyz on the same port.

A request's answer is final: 200 only once Redis stored the entry (or its dedup recognised it),
422 only once the dead letter is stored; anything else (401, 403, 413 without a dead letter, 415,
429, 503) stored nothing but what its body says.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.admin import admin_router
from gateway.context import GatewayContext
from gateway.ingest import Ingestor
from gateway.ingest_http import Ingest, IngestFastPath
from gateway.ingest_models import (
    NDJSON,
    RESPONSES,
    BulkResult,
    Rejected,
    Stored,
    request_body_schema,
)
from gateway.tokens import TokenStore
from observability.http import BasicAuth
from observability.metrics import GatewayMetrics


def ingest_router(ingest: Ingest) -> APIRouter:
    router = APIRouter(prefix="/api/v1", tags=["ingest"])
    bearer = HTTPBearer(auto_error=False, description="A device token: `iotbridge token create`.")

    @router.post(
        "/topics/{topic:path}",
        summary="Send one reading (JSON) or many (NDJSON) as if published on an MQTT topic",
        description="The path is the MQTT topic the message would have had, e.g. "
        "`plant/s1/l1/a1/telemetry`: every route and contract works over HTTP. Answered only "
        "once Redis stored the entry (200) or its dead letter (422). With `Content-Type: "
        f"{NDJSON}` each line is one payload and is answered in `results` (200).",
        responses={
            200: {
                "model": Stored | BulkResult,
                "description": "Stored, or recognised as a duplicate (JSON); one "
                "result per line (NDJSON).",
            },
            422: {"model": Rejected, "description": "Dead-lettered with this reason."},
            **RESPONSES,
        },
        openapi_extra={"requestBody": request_body_schema()},
        response_model=None,
    )
    async def post_topic(
        topic: str,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> Response:
        # Served by IngestFastPath; this route documents the endpoint, and serves the same
        # handler should a request reach the router.
        headers = {k.lower(): v for k, v in request.headers.items()}
        client = request.client.host if request.client else "unknown"
        status, extra, body = await ingest.handle(topic, headers, request.stream(), client)
        return Response(body, status, headers=extra, media_type="application/json")

    return router


def create_app(
    ctx: GatewayContext,
    *,
    ingestor: Ingestor | None = None,
    registry: CollectorRegistry | None = None,
    readiness: Callable[[], tuple[bool, str]] | None = None,
    metrics: GatewayMetrics | None = None,
) -> FastAPI:
    """The whole HTTP API on one app. `registry`, `readiness` and `metrics` come from the running
    gateway (gateway.server); built with only `ctx`, /metrics serves a registry of its own and
    the ingest endpoint uses the Ingestor behind `ctx.ingest`."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = metrics if metrics is not None else GatewayMetrics(registry)
    if ingestor is None:
        owner = getattr(ctx.ingest, "__self__", None)
        if not isinstance(owner, Ingestor):
            raise TypeError("ctx.ingest must be an Ingestor's (gateway.server builds both)")
        ingestor = owner
    ready = readiness or (lambda: (True, "ready"))
    app = FastAPIOffline(
        title="iotbridge gateway",
        version="1",
        summary="HTTP ingest beside MQTT: the same routes, contracts, dedup and dead letters.",
        description="Devices post readings to `/api/v1/topics/{topic}` with a device token; "
        "operators use the admin endpoints with the admin token.",
    )
    tokens = TokenStore(ctx.redis, ctx.keys.gateway_tokens, ctx.settings.gateway.token_refresh_s)
    ingest = Ingest(ctx, ingestor, tokens, metrics)
    app.include_router(ingest_router(ingest))
    app.add_middleware(IngestFastPath, ingest=ingest)
    app.state.ingest = ingest  # gateway.server puts IngestFastPath in front of the whole app too
    app.include_router(admin_router(ctx))
    http = ctx.settings.http
    auth = None
    if http.username is not None and http.password is not None:
        auth = BasicAuth(http.username, http.password.get_secret_value())

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint(request: Request) -> Response:
        header = request.headers.get("authorization")
        if auth is not None and not auth.allows(header.encode() if header else None):
            return Response("unauthorized\n", 401, media_type="text/plain",
                            headers={"WWW-Authenticate": 'Basic realm="iotbridge metrics"'})  # fmt: skip
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        ok, reason = ready()
        return Response((reason or "ready") + "\n", 200 if ok else 503, media_type="text/plain")

    return app
