"""The HTTP server every process runs: `/metrics`, `/healthz` (alive) and `/readyz` (can do its job).

A small asyncio server rather than prometheus_client's threaded one, so the readiness check reads
the process's state on its own event loop, and one port serves all three paths.

`http` settings add what Prometheus' exporter-toolkit offers: basic auth on /metrics and HTTPS
(optionally with client certificates) on the whole port. /healthz and /readyz stay open to anyone
who can reach the port: container and orchestrator probes carry no credentials, and the two
answer only "ok" or a one-line reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import ssl
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from config.settings import HttpSettings, HttpTlsSettings

log = logging.getLogger(__name__)

# Returns (ready, reason); reason explains a failure in the /readyz body.
ReadinessCheck = Callable[[], tuple[bool, str]]

_MAX_REQUEST_BYTES = 8192
_REQUEST_TIMEOUT_S = 5
_REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            503: "Service Unavailable"}  # fmt: skip
_CHALLENGE = 'WWW-Authenticate: Basic realm="iotbridge metrics", charset="UTF-8"\r\n'


def server_context(tls: HttpTlsSettings) -> ssl.SSLContext | None:
    """The TLS context of the server, or None for plain HTTP. Raises OSError (ssl.SSLError is
    one) when a file is missing or does not hold what it should."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class BasicAuth:
    """Checks an `Authorization: Basic ...` header against one user name and password."""

    def __init__(self, username: str, password: str) -> None:
        self._username = username.encode()
        self._password = password.encode()

    def allows(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, encoded = header.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        username, colon, password = decoded.partition(b":")
        # Both compared in constant time, and both always compared.
        user_ok = hmac.compare_digest(username, self._username)
        password_ok = hmac.compare_digest(password, self._password)
        return bool(colon) and user_ok and password_ok


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of the first header `name` (case-insensitive) of a request head."""
    for line in head.split(b"\r\n")[1:]:
        key, colon, value = line.partition(b":")
        if colon and key.strip().lower() == name:
            return value.strip()
    return None


class HealthServer:
    """Serves /metrics, /healthz and /readyz on one port."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: ReadinessCheck,
        http: HttpSettings | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._registry = registry
        self._readiness = readiness
        self._http = http or HttpSettings()
        self._auth: BasicAuth | None = None
        if self._http.username is not None and self._http.password is not None:
            self._auth = BasicAuth(self._http.username, self._http.password.get_secret_value())
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        context = server_context(self._http.tls)
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, ssl=context,
            ssl_handshake_timeout=_REQUEST_TIMEOUT_S if context else None,
        )  # fmt: skip
        scheme = "https" if context else "http"
        log.info("serving /metrics /healthz /readyz", extra={
            "url": f"{scheme}://{self._host}:{self.port}",
            "metrics_auth": "basic" if self._auth else "none",
            "client_certificates": context is not None and context.verify_mode == ssl.CERT_REQUIRED,
        })  # fmt: skip

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _respond(self, path: str, authorization: bytes | None) -> tuple[int, str, bytes]:
        if path == "/metrics":
            if self._auth is not None and not self._auth.allows(authorization):
                return 401, "text/plain", b"unauthorized\n"
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, reason = self._readiness()
            return (200 if ready else 503), "text/plain", (reason or "ready").encode() + b"\n"
        return 404, "text/plain", b"not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT_S)
            if len(head) > _MAX_REQUEST_BYTES:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = [*request_line, "", ""][:2]
            path = path.split("?", 1)[0]
            status, ctype, body = (
                (405, "text/plain", b"")
                if method not in ("GET", "HEAD")
                else self._respond(path, _header(head, b"authorization"))
            )
            challenge = _CHALLENGE if status == 401 else ""
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n{challenge}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method == "GET" else b"")
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            # TimeoutError, a reset, a TLS error after the handshake: the client is gone.
            pass
        finally:
            writer.close()
