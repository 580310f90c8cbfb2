"""The gateway's HTTP API: ingest (`POST /api/v1/topics/{topic}`), the admin router, the offline
/docs and /redoc, and /metrics, /healthz, /readyz on the same port.

A request's answer is final: 200 only once Redis stored the entry (or its dedup recognised it),
422 only once the dead letter is stored; anything else (401, 403, 413 without a dead letter, 415,
429, 503) stored nothing but what its body says.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.admin import admin_router
from gateway.context import GatewayContext, IngestOutcome, Unavailable
from gateway.ingest import Ingestor, RateLimited
from gateway.tokens import FailureThrottle, TokenRecord, TokenStore
from observability.http import BasicAuth
from observability.metrics import UNROUTED, GatewayMetrics

NDJSON = "application/x-ndjson"
_JSON_TYPES = ("application/json", "text/json")
_NDJSON_TYPES = (NDJSON, "application/jsonl", "application/jsonlines", "application/x-jsonlines")
_GZIP_WINDOW = 16 + zlib.MAX_WBITS  # gzip header and trailer
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="iotbridge"'}


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


# --- request bodies -------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    def __init__(self, read: bytes, limit: int) -> None:
        super().__init__(f"body over {limit} bytes")
        self.read = read
        self.limit = limit


class BadEncoding(Exception):
    pass


async def read_body(chunks: AsyncIterator[bytes], encoding: str, limit: int) -> bytes:
    """The (decoded) body, read and counted chunk by chunk: BodyTooLarge once it passes `limit`
    bytes, whatever Content-Length said; a gzip body is capped after decoding."""
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise BadEncoding(f"Content-Encoding {encoding!r} not accepted (gzip or none)")
    inflate = zlib.decompressobj(_GZIP_WINDOW) if "gzip" in encoding else None
    body = bytearray()
    async for chunk in chunks:
        if inflate is not None:
            try:
                chunk = inflate.decompress(chunk, limit + 1 - len(body))  # noqa: PLW2901
            except zlib.error as exc:
                raise BadEncoding(f"not gzip: {exc}") from exc
            if inflate.unconsumed_tail:  # decoded past the limit
                body += chunk
                raise BodyTooLarge(bytes(body[: limit + 1]), limit)
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(bytes(body[: limit + 1]), limit)
    if inflate is not None and not inflate.eof and body:
        raise BadEncoding("gzip stream truncated")
    return bytes(body)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


_RESPONSES: dict[int | str, dict[str, Any]] = {
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


def _request_body_schema() -> dict[str, Any]:
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


# --- the app ----------------------------------------------------------------------------------------


# An answer: status, extra headers, JSON body.
Answer = tuple[int, dict[str, str], bytes]


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Answer:
    return status, headers or {}, json.dumps(body, separators=(",", ":")).encode()


def _refuse(status: int, error: str, headers: dict[str, str] | None = None) -> Answer:
    return _json(status, {"error": error}, headers)


class _Ingest:
    """The ingest endpoint, apart from any web framework: headers and body chunks in, an Answer
    out. Served by `IngestFastPath` ahead of FastAPI's router, and by the FastAPI route (which
    documents it in /openapi.json) for whatever reaches the router."""

    def __init__(
        self, ctx: GatewayContext, ingestor: Ingestor, tokens: TokenStore, metrics: GatewayMetrics
    ) -> None:
        gw = ctx.settings.gateway
        self.ctx = ctx
        self.ingestor = ingestor
        self.tokens = tokens
        self.metrics = metrics
        self.throttle = FailureThrottle(gw.auth_failures, gw.auth_penalty_ms / 1000)
        # Labelled children looked up once, not per request.
        self._requests: dict[tuple[str, int], Any] = {}
        self._duration = {e: metrics.duration.labels(e) for e in ("ingest", "bulk")}
        self._messages: dict[tuple[str, str], Any] = {}

    async def authorize(self, authorization: str, client: str, asset: str | None) -> Answer | None:
        """None when the bearer token may post for `asset` (None: no route, any valid token);
        otherwise the 401 or 403 to answer, after the failing client's penalty delay."""
        scheme, _, token = authorization.strip().partition(" ")
        record: TokenRecord | None = None
        if scheme.lower() == "bearer" and token:
            record = await self.tokens.check(token.strip())
        if record is not None and (asset is None or record.allows(asset)):
            self.throttle.succeeded(client)
            return None
        status = 401 if record is None else 403
        self.metrics.auth_failures.labels(str(status)).inc()
        delay = self.throttle.failed(client)
        if delay:
            await asyncio.sleep(delay)
        if status == 401:
            return _refuse(401, "a valid device token is required", _CHALLENGE)
        return _refuse(403, f"this token is not valid for asset {asset!r}")

    async def handle(
        self, topic: str, headers: Mapping[str, str], chunks: AsyncIterator[bytes], client: str
    ) -> Answer:
        """`headers`: lower-case names."""
        started = time.perf_counter()
        media = headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
        bulk = media in _NDJSON_TYPES
        endpoint = "bulk" if bulk else "ingest"
        route_asset = self.ingestor.asset_of(topic)
        route = route_asset[0] if route_asset else UNROUTED
        asset = route_asset[1] if route_asset else None
        refusal = await self.authorize(headers.get("authorization", ""), client, asset)
        answer: Answer
        if refusal is not None:
            answer = refusal
        elif not bulk and media not in _JSON_TYPES and not media.endswith("+json"):
            answer = _refuse(415, f"Content-Type {media!r}: send application/json or {NDJSON}")
        else:
            encoding = headers.get("content-encoding", "").strip().lower()
            answer = await self._ingest(topic, route, encoding, chunks, bulk)
        counter = self._requests.get((endpoint, answer[0]))
        if counter is None:
            counter = self._requests[endpoint, answer[0]] = self.metrics.requests.labels(
                endpoint, str(answer[0])
            )
        counter.inc()
        self._duration[endpoint].observe(time.perf_counter() - started)
        return answer

    async def _ingest(
        self, topic: str, route: str, encoding: str, chunks: AsyncIterator[bytes], bulk: bool
    ) -> Answer:
        settings = self.ctx.settings
        limit = settings.gateway.max_bulk_bytes if bulk else settings.bridge.max_payload_bytes
        try:
            body = await read_body(chunks, encoding, limit)
        except BadEncoding as exc:
            return _refuse(415, str(exc))
        except BodyTooLarge as exc:
            if bulk:
                return _refuse(413, f"bulk body over gateway.max_bulk_bytes ({limit} bytes)")
            # What was read (limit + 1 bytes) fails the contract's size check first: the same
            # dead letter (reason size) as over MQTT, then 413.
            return await self._answer(route, topic, exc.read, 413)
        if bulk:
            return await self._bulk(topic, route, body)
        return await self._answer(route, topic, body, 422)

    async def _answer(self, route: str, topic: str, body: bytes, rejected_status: int) -> Answer:
        try:
            outcome = await self.ingestor.ingest(topic, body)
        except RateLimited as exc:
            return _refuse(429, exc.detail, _retry_after(exc.retry_after_s))
        except Unavailable as exc:
            return _refuse(503, exc.detail, _retry_after(exc.retry_after_s))
        self._count(route, [outcome])
        if outcome.status == "rejected":
            return _json(rejected_status, {"reason": outcome.reason, "error": outcome.error})
        return _json(200, {"status": outcome.status, "id": outcome.id})

    async def _bulk(self, topic: str, route: str, body: bytes) -> Answer:
        lines = [line for line in body.split(b"\n") if line.strip(b"\r")]
        most = self.ctx.settings.gateway.max_bulk_lines
        if len(lines) > most:
            return _refuse(413, f"{len(lines)} lines: at most {most} a request "
                           "(gateway.max_bulk_lines)")  # fmt: skip
        try:
            outcomes = await self.ingestor.ingest_many(topic, [ln.rstrip(b"\r") for ln in lines])
        except Unavailable as exc:
            return _refuse(503, exc.detail, _retry_after(exc.retry_after_s))
        self._count(route, outcomes)
        results = [{k: v for k, v in (("status", o.status), ("id", o.id), ("reason", o.reason),
                                      ("error", o.error)) if v is not None}
                   for o in outcomes]  # fmt: skip
        counts = {
            s: sum(o.status == s for o in outcomes) for s in ("stored", "duplicate", "rejected")
        }
        return _json(200, {**counts, "results": results})

    def _count(self, route: str, outcomes: list[IngestOutcome]) -> None:
        for outcome in outcomes:
            counter = self._messages.get((route, outcome.status))
            if counter is None:
                counter = self._messages[route, outcome.status] = self.metrics.messages.labels(
                    route, outcome.status
                )
            counter.inc()
            if outcome.reason is not None:
                self.metrics.rejected.labels(route, outcome.reason).inc()


class _Disconnected(Exception):
    pass


class IngestFastPath:
    """ASGI middleware answering `POST /api/v1/topics/...` itself, ahead of FastAPI's router.

    Measured under cProfile at 64 connections: FastAPI's routing, dependency resolution and
    Request/Response objects cost more than twice the ingest handler's own time; devices post
    every reading, so their endpoint skips them. Everything else goes to the app.
    """

    PREFIX = "/api/v1/topics/"

    def __init__(self, app: ASGIApp, ingest: _Ingest) -> None:
        self.app = app
        self.ingest = ingest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] != "POST" or not path.startswith(self.PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = scope.get("client")

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        try:
            status, extra, body = await self.ingest.handle(
                path[len(self.PREFIX) :], headers, chunks(), client[0] if client else "unknown"
            )
        except _Disconnected:
            return
        response = [(b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    *((k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": response})
        await send({"type": "http.response.body", "body": body})


def ingest_router(ingest: _Ingest) -> APIRouter:
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
            **_RESPONSES,
        },
        openapi_extra={"requestBody": _request_body_schema()},
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
    ingest = _Ingest(ctx, ingestor, tokens, metrics)
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
