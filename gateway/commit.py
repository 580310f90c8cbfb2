"""Group commit: concurrent requests share one batched atomic write to Redis.

Each request hands its appends (one, or one per NDJSON line) to `submit` and waits. A writer task
takes whatever has queued up while the previous writes were in flight (up to
`gateway.batch_max_size` messages; a request is never split) and sends it as one EVALSHA of the
bridge's append script, so the dedup decision and the XADD are one atomic step, exactly as for
MQTT. No request costs a Redis round trip of its own, and none waits for a batch to fill: under
light load a batch is one request, under heavy load hundreds.

While Redis is away, requests are refused at once (`Unavailable`, 503) until the backoff delay
has passed; the next batch then probes Redis. A request whose write is not confirmed within
`gateway.write_timeout_ms` is refused too; its write may still land, which the dedup makes safe
for a client that retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from bridge.sink import Append, Sink
from config.errors import SinkUnavailable
from config.gateway_settings import GatewaySettings
from gateway.context import Unavailable
from observability.lifecycle import Backoff, wait_any
from observability.metrics import GatewayMetrics

log = logging.getLogger(__name__)

# The Retry-After of a write that timed out, or of a full queue: Redis is slow, not away.
_BUSY_RETRY_S = 1.0


@dataclass(slots=True, eq=False)
class _Request:
    appends: Sequence[Append]
    done: asyncio.Future[list[bytes | None]]
    sent: bool = False
    abandoned: bool = field(default=False)


class GroupCommit:
    """The shared write path of every ingest request."""

    def __init__(
        self, sink: Sink, settings: GatewaySettings, backoff: Backoff, metrics: GatewayMetrics
    ) -> None:
        self._sink = sink
        self._settings = settings
        self._backoff = backoff
        self._metrics = metrics
        self._queue: deque[_Request] = deque()
        self._queued = 0  # messages in _queue
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.pipeline)
        self._writes: set[asyncio.Task[None]] = set()
        self._retry_at = 0.0  # monotonic time before which Redis is not tried again
        self.redis_ok = True
        metrics.pending.set_function(lambda: self._queued)
        metrics.connected.set(1)

    @property
    def retry_after_s(self) -> float:
        """Seconds until Redis is tried again (0: it is in use)."""
        return max(0.0, self._retry_at - time.monotonic())

    async def submit(self, appends: Sequence[Append]) -> list[bytes | None]:
        """Store `appends` in Redis; per append its entry id, or None for a duplicate. Raises
        Unavailable when Redis is away, the queue is full, or the write was not confirmed in time."""
        if not appends:
            return []
        if (wait := self.retry_after_s) > 0:
            raise Unavailable("redis unavailable", wait)
        if self._queued + len(appends) > self._settings.max_pending and self._queued:
            raise Unavailable(f"{self._queued} messages waiting to be written", _BUSY_RETRY_S)
        request = _Request(appends, asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._queued += len(appends)
        self._arrived.set()
        try:
            async with asyncio.timeout(self._settings.write_timeout_ms / 1000):
                return await asyncio.shield(request.done)
        except TimeoutError:
            if not request.sent:
                request.abandoned = True  # never sent: taken out of the queue by the writer
            raise Unavailable(
                f"write not confirmed within {self._settings.write_timeout_ms:g} ms",
                max(_BUSY_RETRY_S, self.retry_after_s),
            ) from None
        finally:
            if not request.done.done():
                request.done.cancel()  # nobody will read it now

    async def run(self, stop: asyncio.Event) -> None:
        """Write what is queued, `pipeline` batches at a time, until `stop` and the queue is empty."""
        try:
            while not (stop.is_set() and not self._queue):
                if not self._queue:
                    self._arrived.clear()
                    await wait_any(self._arrived, stop)
                    continue
                await self._slots.acquire()
                # One turn of the event loop first: the requests read in the same turn as the
                # one that woke us join this batch instead of each starting its own.
                await asyncio.sleep(0)
                batch = self._take()
                if not batch:
                    self._slots.release()
                    continue
                if (wait := self.retry_after_s) > 0:
                    self._slots.release()
                    self._fail(batch, Unavailable("redis unavailable", wait))
                    continue
                task = asyncio.create_task(self._write(batch), name="gateway-write")
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
        finally:
            for task in list(self._writes):
                task.cancel()
            await asyncio.gather(*self._writes, return_exceptions=True)
            self._fail(self._take_all(), Unavailable("gateway stopping", _BUSY_RETRY_S))

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        size, limit = 0, self._settings.batch_max_size
        while self._queue and (not batch or size + len(self._queue[0].appends) <= limit):
            request = self._queue.popleft()
            self._queued -= len(request.appends)
            if request.abandoned or request.done.done():
                continue
            request.sent = True
            batch.append(request)
            size += len(request.appends)
        return batch

    def _take_all(self) -> list[_Request]:
        batch = list(self._queue)
        self._queue.clear()
        self._queued = 0
        return batch

    async def _write(self, batch: list[_Request]) -> None:
        try:
            appends = [a for request in batch for a in request.appends]
            try:
                ids, duration = await self._sink.write_ids(appends)
            except SinkUnavailable as exc:
                self._failed(exc)
                self._fail(batch, Unavailable("redis unavailable", self.retry_after_s))
                return
            self._succeeded()
            self._metrics.batch_size.observe(len(appends))
            self._metrics.write_duration.observe(duration)
            at = 0
            for request in batch:
                n = len(request.appends)
                if not request.done.done():
                    request.done.set_result(ids[at : at + n])
                at += n
        finally:
            self._slots.release()

    @staticmethod
    def _fail(batch: list[_Request], exc: Unavailable) -> None:
        for request in batch:
            if not request.done.done():
                request.done.set_exception(exc)

    def _failed(self, exc: SinkUnavailable) -> None:
        if self.redis_ok:
            log.warning("redis unavailable, answering 503 and retrying with backoff",
                        extra={"error": str(exc)})  # fmt: skip
        self.redis_ok = False
        self._metrics.write_errors.inc()
        self._metrics.connected.set(0)
        # Several batches in flight fail together: one outage, one step of the backoff.
        if self.retry_after_s == 0:
            self._retry_at = time.monotonic() + self._backoff.next_delay()

    def _succeeded(self) -> None:
        if not self.redis_ok:
            log.info("redis available", extra={"retries": self._backoff.attempts})
        self.redis_ok = True
        self._backoff.reset()
        self._retry_at = 0.0
        self._metrics.connected.set(1)
