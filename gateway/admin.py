"""The admin API: dead letters, streams, anomalies and routes, behind the admin token.

Every endpoint takes `Authorization: Bearer <IOTBRIDGE_GATEWAY__ADMIN_TOKEN>` (the `adminToken`
scheme in /openapi.json), separate from the device tokens of the ingest endpoints. A Redis error
in any of them is answered 503 with `Retry-After`, never 500 (`gateway.admin_http`).

`close_live_streams(ctx)` ends the live anomaly streams (`event: closing`); the server calls it
before it stops, or an open stream holds it until uvicorn's graceful-shutdown timeout.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.admin_anomalies import anomaly_router, close_live_streams
from gateway.admin_auth import AUTH_RESPONSES, admin_guard
from gateway.admin_dead_letters import dead_letter_router
from gateway.admin_http import AdminRoute
from gateway.admin_streams import stream_router
from gateway.context import GatewayContext

__all__ = ["admin_router", "close_live_streams"]


def admin_router(ctx: GatewayContext) -> APIRouter:
    router = APIRouter(
        dependencies=[Depends(admin_guard(ctx.settings))],
        responses=AUTH_RESPONSES,
        route_class=AdminRoute,
    )
    for part in (dead_letter_router(ctx), stream_router(ctx), anomaly_router(ctx)):
        router.include_router(part)
    return router
