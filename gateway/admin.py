"""The admin API: dead letters, streams, anomalies and routes."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.context import GatewayContext


def admin_router(ctx: GatewayContext) -> APIRouter:
    return APIRouter()
