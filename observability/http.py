"""The HTTP server every process runs: `/metrics`, `/healthz` (alive) and `/readyz` (can do its job).

A small asyncio server rather than prometheus_client's threaded one, so the readiness check reads
the process's state on its own event loop, and one port serves all three paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

# Returns (ready, reason); reason explains a failure in the /readyz body.
ReadinessCheck = Callable[[], tuple[bool, str]]

_MAX_REQUEST_BYTES = 8192


class HealthServer:
    """Serves /metrics, /healthz and /readyz on one port."""

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, readiness: ReadinessCheck
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        log.info(
            "serving /metrics /healthz /readyz", extra={"url": f"http://{self._host}:{self.port}"}
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, reason = self._readiness()
            return (200 if ready else 503), "text/plain", (reason or "ready").encode() + b"\n"
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if len(head) > _MAX_REQUEST_BYTES:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = [*request_line, "", ""][:2]
            path = path.split("?", 1)[0]
            status, ctype, body = (
                (405, "text/plain", b"") if method not in ("GET", "HEAD") else self._respond(path)
            )
            reason = {
                200: "OK",
                404: "Not Found",
                405: "Method Not Allowed",
                503: "Service Unavailable",
            }[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method == "GET" else b"")
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
