"""The ingest endpoint apart from any web framework: token check, body reading (bounded as read,
gzip capped after decoding), the answer for each outcome, metrics; and the ASGI fast path that
serves it ahead of FastAPI."""

from __future__ import annotations

import asyncio
import json
import math
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.context import GatewayContext, IngestOutcome, Unavailable
from gateway.ingest import Ingestor, RateLimited
from gateway.ingest_models import NDJSON
from gateway.tokens import FailureThrottle, TokenRecord, TokenStore
from observability.metrics import UNROUTED, GatewayMetrics

_JSON_TYPES = ("application/json", "text/json")
_NDJSON_TYPES = (NDJSON, "application/jsonl", "application/jsonlines", "application/x-jsonlines")
_GZIP_WINDOW = 16 + zlib.MAX_WBITS  # gzip header and trailer
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="iotbridge"'}


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


# --- the app ----------------------------------------------------------------------------------------


# An answer: status, extra headers, JSON body.
Answer = tuple[int, dict[str, str], bytes]


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Answer:
    return status, headers or {}, json.dumps(body, separators=(",", ":")).encode()


def _refuse(status: int, error: str, headers: dict[str, str] | None = None) -> Answer:
    return _json(status, {"error": error}, headers)


class Ingest:
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

    def __init__(self, app: ASGIApp, ingest: Ingest) -> None:
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
