"""The admin token: one bearer token from the environment, apart from the device tokens.

Compared in constant time (`hmac.compare_digest` over SHA-256 digests, so not even the length
leaks). With no token configured every admin endpoint answers 403 and says how to turn it on:
an admin API open to anyone who can reach the port would let them delete and replay dead letters.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import HTTPException, Security, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from config.settings import Settings

SCHEME = HTTPBearer(
    scheme_name="adminToken",
    description="The admin token: `Authorization: Bearer <IOTBRIDGE_GATEWAY__ADMIN_TOKEN>`.",
    auto_error=False,
)

DISABLED = (
    "the admin API is disabled: no admin token is configured; set IOTBRIDGE_GATEWAY__ADMIN_TOKEN "
    "(16 characters or more) in the gateway's environment and restart it"
)

# Every admin endpoint documents these next to its own responses.
AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"description": "No admin token, or not this one (`WWW-Authenticate: Bearer`)."},
    403: {"description": "The admin API is disabled: no admin token is configured."},
}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def admin_guard(settings: Settings) -> Callable[..., None]:
    """A dependency that lets a request through only with the admin token."""
    configured = settings.gateway.admin_token
    expected = _digest(configured.get_secret_value()) if configured is not None else None

    def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(SCHEME)],
    ) -> None:
        if expected is None:
            raise HTTPException(status.HTTP_403_FORBIDDEN, DISABLED)
        if credentials is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "admin token required: Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="iotbridge-admin"'},
            )
        if not hmac.compare_digest(_digest(credentials.credentials), expected):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "invalid admin token",
                headers={
                    "WWW-Authenticate": 'Bearer realm="iotbridge-admin", error="invalid_token"'
                },
            )

    return check
