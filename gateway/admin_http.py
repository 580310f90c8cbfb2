"""What every admin router shares: Redis errors (of one Redis or of a cluster) answered 503 with
Retry-After, never 500."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute

from bridge.shard_reads import REDIS_ERRORS

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2


class AdminRoute(APIRoute):
    """Translates a Redis error of an admin endpoint into 503 + Retry-After at the boundary."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except REDIS_ERRORS as exc:
                log.warning("redis unavailable for an admin request", extra={"error": str(exc)})
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"redis unavailable: {exc}",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from exc

        return handle
