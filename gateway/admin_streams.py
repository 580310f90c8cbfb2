"""Streams and routes: what each telemetry stream holds and who reads it; the route table and
its contracts as JSON Schema. Read-only."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel
from redis.exceptions import ResponseError

from bridge.contracts import TelemetryPayload, compile_contract
from gateway.admin_http import AdminRoute
from gateway.admin_models import ConsumerGroup, ContractInfo, RouteInfo, StreamInfo
from gateway.context import GatewayContext


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _first_id(entry: Any) -> str | None:
    # XINFO STREAM's first-entry / last-entry: [id, [field, value, ...]], or nil when empty.
    return _text(entry[0]) if entry else None


class Streams:
    def __init__(self, ctx: GatewayContext) -> None:
        self._redis = ctx.redis
        self._keys = ctx.keys
        self._retention = ctx.settings.bridge.retention
        self._routes = [route.name for route in ctx.intake.routes.routes]

    async def all(self) -> list[StreamInfo]:
        # At once: on a cluster the shard streams are on several masters.
        return list(
            await asyncio.gather(
                *(
                    self.one(route, shard)
                    for route in self._routes
                    for shard in range(self._keys.shards)
                )
            )
        )

    async def one(self, route: str, shard: int) -> StreamInfo:
        key = self._keys.telemetry(route, shard)
        max_entries = self._retention.max_entries
        try:
            info = await self._redis.xinfo_stream(key)
            groups = await self._redis.xinfo_groups(key)
        except ResponseError:  # no such key: the route has not written yet
            return StreamInfo(route=route, shard=shard, key=key, exists=False, length=0,
                              max_entries=max_entries, fill_ratio=0.0,
                              max_age_s=self._retention.max_age_s, first_id=None, last_id=None,
                              groups=[])  # fmt: skip
        length = int(info["length"])
        return StreamInfo(
            route=route, shard=shard, key=key, exists=True, length=length,
            max_entries=max_entries, fill_ratio=length / max_entries,
            max_age_s=self._retention.max_age_s, first_id=_first_id(info.get("first-entry")),
            last_id=_first_id(info.get("last-entry")),
            groups=[
                ConsumerGroup(
                    name=_text(group["name"]), consumers=int(group["consumers"]),
                    pending=int(group["pending"]), lag=_int_or_none(group.get("lag")),
                    last_delivered_id=_text(group["last-delivered-id"]),
                )
                for group in groups
            ],
        )  # fmt: skip


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema()


def contracts(ctx: GatewayContext) -> dict[str, ContractInfo]:
    """Every contract a route names (and those declared but unused), as JSON Schema."""
    declared = ctx.settings.bridge.contracts
    users: dict[str, list[str]] = {}
    for route in ctx.settings.bridge.routes:
        users.setdefault(route.contract, []).append(route.name)
    schemas = {"telemetry": _schema(TelemetryPayload)}
    schemas |= {name: _schema(compile_contract(name, c)) for name, c in declared.items()}
    return {
        name: ContractInfo(name=name, routes=users.get(name, []), json_schema=schema)
        for name, schema in schemas.items()
    }


def stream_router(ctx: GatewayContext) -> APIRouter:
    streams = Streams(ctx)
    router = APIRouter(prefix="/api/v1", tags=["streams and routes"], route_class=AdminRoute)
    routes = [
        RouteInfo(
            name=route.name, topic=route.settings.topic, filter=route.filter,
            contract=route.settings.contract, qos=route.settings.qos,
            asset_level=route.settings.asset_level,
            streams=ctx.keys.telemetry_streams(route.name),
            http_path=f"/api/v1/topics/{route.settings.topic}",
        )
        for route in ctx.intake.routes.routes
    ]  # fmt: skip
    schemas = contracts(ctx)

    @router.get("/streams", response_model=list[StreamInfo], summary="Telemetry streams")
    async def list_streams() -> list[StreamInfo]:
        """Per route and shard: length, the retention bound and fill ratio, and each consumer
        group's consumers, pending entries and lag, as XINFO reports them now."""
        return await streams.all()

    @router.get("/routes", response_model=list[RouteInfo], summary="The route table")
    async def list_routes() -> list[RouteInfo]:
        """The ordered route table: the first route whose topic template matches a topic wins."""
        return routes

    @router.get("/contracts", response_model=list[ContractInfo], summary="Every contract")
    async def list_contracts() -> list[ContractInfo]:
        return list(schemas.values())

    @router.get("/contracts/{name}", response_model=ContractInfo, summary="One contract",
                responses={404: {"description": "No such contract."}})  # fmt: skip
    async def get_contract(
        name: Annotated[str, Path(description="A contract name (`telemetry` is built in).")],
    ) -> ContractInfo:
        """The contract's payload as JSON Schema: what a message of its routes must look like."""
        if name not in schemas:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no contract {name!r}")
        return schemas[name]

    return router
