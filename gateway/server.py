"""The running gateway: intake, group commit and the HTTP API, served by uvicorn in-process.

Serving starts at once; /readyz and ingest answer 503 until Redis answers (checked with backoff,
like the bridge). A signal stops accepting connections, lets the requests under way finish, and
then stops the writer, which fails what is still queued with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from bridge.intake import Intake
from bridge.redis_nodes import connect
from bridge.sink import make_sink
from config.errors import SinkUnavailable
from config.keys import Keys
from config.settings import Settings
from gateway.admin import close_live_streams
from gateway.app import create_app
from gateway.commit import GroupCommit
from gateway.context import GatewayContext
from gateway.ingest import Ingestor
from gateway.ingest_http import IngestFastPath
from observability.lifecycle import Backoff, gc_thresholds
from observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process's stop event drives it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class GatewayApp:
    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics(registry)
        self.keys = Keys.of(settings.redis)
        self.intake = Intake(settings.bridge, self.keys)
        self.sink = make_sink(settings.redis, self.intake.write_keys, entry_ids=True)
        self.reader = connect(settings.redis, client_name="iotbridge-gateway")
        self.commit = GroupCommit(self.sink, settings.gateway, Backoff(settings.backoff),
                                  self.metrics)  # fmt: skip
        self.ingestor = Ingestor(settings, self.intake, self.commit)
        self.context = GatewayContext(settings, self.keys, self.intake, self.reader,
                                      self.ingestor.ingest)  # fmt: skip
        self.redis_checked = False
        self.app: FastAPI = create_app(self.context, ingestor=self.ingestor, registry=registry,
                                       readiness=self.readiness, metrics=self.metrics)  # fmt: skip
        self.server: uvicorn.Server | None = None

    def readiness(self) -> tuple[bool, str]:
        if not self.redis_checked or not self.commit.redis_ok:
            return False, "redis unavailable"
        if self.server is None or not self.server.started:
            return False, "not serving yet"
        return True, "ready"

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self.server is not None and self.server.servers:
            return int(self.server.servers[0].sockets[0].getsockname()[1])
        return self.settings.gateway.port

    async def _check_redis(self, stop: asyncio.Event) -> None:
        backoff = Backoff(self.settings.backoff)
        while not stop.is_set():
            try:
                await self.sink.check()
            except SinkUnavailable as exc:
                if backoff.attempts == 0:
                    log.warning("redis unavailable, retrying with backoff",
                                extra={"error": str(exc)})  # fmt: skip
                if await backoff.wait(stop):
                    return
                continue
            self.redis_checked = True
            log.info("redis connected", extra={"url": self.settings.redis.url.split("@")[-1]})
            return

    async def run(self, stop: asyncio.Event) -> None:
        # Python's 700 rescanned the objects of the requests in flight again and again, and full
        # collections stalled every request under way.
        with gc_thresholds():
            await self._run(stop)

    async def _run(self, stop: asyncio.Event) -> None:
        gw = self.settings.gateway
        # uvicorn's start and stop lines repeat ours; its warnings and errors stay.
        uvicorn_log = logging.getLogger("uvicorn")
        uvicorn_log.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
        # Ingest requests are answered before FastAPI's own middleware stack (see IngestFastPath).
        asgi = IngestFastPath(self.app, self.app.state.ingest)
        tls = self.settings.http.tls  # HTTPS on the whole port, as for every process
        config = uvicorn.Config(asgi, host=gw.host, port=gw.port, log_config=None,
                                access_log=False, lifespan="off", server_header=False,
                                timeout_graceful_shutdown=math.ceil(gw.write_timeout_ms / 1000) + 1,
                                ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file,
                                ssl_ca_certs=tls.client_ca_file,
                                ssl_cert_reqs=ssl.CERT_REQUIRED if tls.client_ca_file else ssl.CERT_NONE)  # fmt: skip
        config.load()  # here, so a missing certificate is an OSError (one line, exit 2)
        self.server = server = _Server(config)
        # Bound here, not by uvicorn: a port in use is an OSError (one line, exit 2), where
        # uvicorn would sys.exit() from inside its task.
        listener = _listen(gw.host, gw.port)
        writer_stop = asyncio.Event()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._check_redis(stop), name="redis-check")
                writer = tasks.create_task(self.commit.run(writer_stop), name="gateway-writer")
                serving = tasks.create_task(server.serve([listener]), name="uvicorn")
                port = listener.getsockname()[1]
                scheme = "https" if config.ssl else "http"
                log.info("gateway serving", extra={"url": f"{scheme}://{gw.host}:{port}"})
                stopped = asyncio.ensure_future(stop.wait())
                await asyncio.wait([stopped, serving], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
                close_live_streams(self.context)  # an open SSE stream would hold the stop
                server.should_exit = True
                await serving
                writer_stop.set()
                await writer
        finally:
            listener.close()
            await self.sink.close()
            await self.reader.aclose()
            log.info("gateway stopped")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and an
    # accepted socket inherits it (with proto 0 an answer waited 40 ms for the delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
