"""The fleet simulator: virtual assets publishing telemetry over a pool of MQTT connections.

`run()` connects every connection, publishes the schedule for `duration_s`, waits (bounded) for
the acknowledgements still outstanding, then disconnects. Publishing runs in one worker thread
that paces itself against the schedule; paho's network threads handle the sockets. The asyncio
loop only coordinates, so /metrics and /readyz stay responsive under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from config.settings import Settings
from observability.metrics import SimulatorMetrics
from simulators.connection import Connection
from simulators.fleet import Fleet
from simulators.schedule import Schedule
from simulators.stats import PublishStats

log = logging.getLogger(__name__)

# After the duration, how long to wait for acknowledgements still outstanding.
DRAIN_TIMEOUT_S = 10.0
# Slots not sent this long after the duration are given up (reported as unsent), so a simulator
# that cannot keep up with the schedule still ends on time.
LATE_GRACE_S = 1.0
# The publishing thread sleeps at least this long between batches: shorter sleeps cost more in
# wake-ups than they gain in evenness (2 ms is far below any sample period in a plant).
MIN_SLEEP_S = 0.002
# Slots sent per batch before the thread looks at the clock and the stop flag again.
MAX_BATCH = 1000


class SimulatorApp:
    """Drives `simulator.assets` virtual assets; see `report()` for what a run achieved."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        sim = settings.simulator
        self._settings = settings
        self._metrics = SimulatorMetrics(registry)
        self._stats = PublishStats(self._metrics)
        self._fleet = Fleet(sim, settings.bridge.routes[0])
        self._schedule = Schedule(sim.assets, sim.rate_hz, sim.duration_s)
        self._connection_count = math.ceil(sim.assets / sim.assets_per_connection)
        self._connections: list[Connection] = []
        self._attempted = 0
        self._elapsed_s = 0.0
        self._finished = False
        self._halt = threading.Event()  # set to end publishing: stop signal, or run() ending
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._metrics.assets.set(sim.assets)

    def readiness(self) -> tuple[bool, str]:
        if self._finished:
            return False, "finished"
        up = sum(connection.connected for connection in self._connections)
        status = f"{up}/{self._connection_count} mqtt connections up"
        return up == self._connection_count, status

    async def run(self, stop: asyncio.Event) -> None:
        """Publish the schedule, or until `stop` is set; then drain acks and disconnect."""
        self._loop = asyncio.get_running_loop()
        relay = asyncio.create_task(self._relay_stop(stop), name="simulator-stop-relay")
        try:
            await self._run_phases()
        finally:
            relay.cancel()
            # wait() collects the relay without raising its CancelledError, while a cancellation
            # of run() itself still propagates. (A TaskGroup would wrap our errors in a group.)
            await asyncio.wait([relay])

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._halt.set()  # the publishing thread cannot wait on an asyncio.Event
        self._changed.set()

    async def _run_phases(self) -> None:
        self._connections = await asyncio.to_thread(self._open)
        try:
            if await self._await_connections():
                await asyncio.to_thread(self._publish_schedule)
                await self._drain()
        finally:
            self._halt.set()  # also when cancelled: the publishing thread must not outlive run()
            # Whatever is still outstanding now will never be acknowledged: the clients go away.
            self._stats.record_failed("unacked", self._stats.outstanding)
            await asyncio.to_thread(self._close)
            self._finished = True
            log.info("simulator finished", extra=self._summary())

    def report(self) -> dict[str, Any]:
        """What the run asked for and what it achieved; JSON-able."""
        sim = self._settings.simulator
        counts = self._stats.snapshot()
        achieved = counts["sent"] / self._elapsed_s if self._elapsed_s > 0 else 0.0
        return {
            "assets": sim.assets,
            "connections": self._connection_count,
            "qos": sim.qos,
            "rate_hz": sim.rate_hz,
            "target_rate": self._schedule.target_rate,
            "duration_s": sim.duration_s,
            "elapsed_s": round(self._elapsed_s, 3),
            "scheduled": self._schedule.total,
            "unsent": self._schedule.total - self._attempted,
            **counts,
            "achieved_rate_msgs_per_s": round(achieved, 1),
            "publish_ack_latency_s": self._stats.latency_quantiles(),
        }

    def _open(self) -> list[Connection]:
        connections = [
            Connection(self._settings, index, self._stats, self._metrics, self._notify)
            for index in range(self._connection_count)
        ]
        for connection in connections:
            connection.start()
        return connections

    def _close(self) -> None:
        for connection in self._connections:
            connection.close()

    async def _await_connections(self) -> bool:
        """Wait until every connection is up; False when stopped first.

        After the connect timeout the run goes ahead with the connections it has: publishes on
        the others fail as not_connected, which the report shows, while paho keeps reconnecting.
        """
        timeout_s = self._settings.mqtt.connect_timeout_s
        all_up = await self._wait_for(lambda: self.readiness()[0] or self._halt.is_set(), timeout_s)
        if self._halt.is_set():
            return False
        context = {
            "connections_up": sum(connection.connected for connection in self._connections),
            "connections": self._connection_count,
        }
        if all_up:
            log.info("simulator connected", extra=context)
        else:
            log.warning(
                "not every connection is up; publishing anyway",
                extra={**context, "timeout_s": timeout_s},
            )
        self._warn_receive_maximum()
        return True

    def _warn_receive_maximum(self) -> None:
        limits = [c.receive_maximum for c in self._connections if c.receive_maximum is not None]
        wanted = self._settings.simulator.max_in_flight
        if self._settings.simulator.qos == 1 and limits and min(limits) < wanted:
            log.warning(
                "broker receive maximum is below simulator.max_in_flight",
                extra={"receive_maximum": min(limits), "max_in_flight": wanted},
            )

    def _publish_schedule(self) -> None:
        """Send every slot when it is due (runs in a worker thread); bounded in count and time."""
        schedule, halt = self._schedule, self._halt
        started = time.monotonic()
        deadline_s = schedule.duration_s + LATE_GRACE_S
        sent_up_to = 0
        while sent_up_to < schedule.total and not halt.is_set():
            elapsed_s = time.monotonic() - started
            if elapsed_s > deadline_s:
                log.warning(
                    "publishing fell behind the schedule; giving up the rest",
                    extra={"unsent": schedule.total - sent_up_to},
                )
                break
            due = min(schedule.due(elapsed_s), sent_up_to + MAX_BATCH)
            for number in range(sent_up_to, due):
                self._send(number)
            sent_up_to = max(sent_up_to, due)
            self._attempted = sent_up_to
            wait_s = schedule.time_of(sent_up_to) - (time.monotonic() - started)
            if sent_up_to < schedule.total and wait_s > 0:
                halt.wait(max(wait_s, MIN_SLEEP_S))
        # The run lasts the whole duration even though the last slot is due a little before it.
        halt.wait(max(0.0, schedule.duration_s - (time.monotonic() - started)))
        self._elapsed_s = time.monotonic() - started

    def _send(self, number: int) -> None:
        index, seq = self._schedule.slot(number)
        topic, payload, anomaly = self._fleet.message(index, seq, time.time())
        connection = self._connections[index // self._settings.simulator.assets_per_connection]
        connection.publish(topic, payload, anomaly is not None)

    async def _drain(self) -> None:
        self._stats.on_idle = self._notify
        try:
            drained = await self._wait_for(lambda: self._stats.outstanding == 0, DRAIN_TIMEOUT_S)
        finally:
            self._stats.on_idle = None
        if not drained:
            log.warning(
                "acknowledgements still outstanding after the drain timeout",
                extra={"outstanding": self._stats.outstanding, "timeout_s": DRAIN_TIMEOUT_S},
            )

    def _notify(self) -> None:
        """Wake `_wait_for` (called from paho's threads)."""
        if self._loop is None:
            return
        # The loop is closed only if run() was abandoned; then nobody is waiting.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._changed.set)

    async def _wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait until `condition` holds (True) or `timeout_s` passes (False).

        Whatever can change the condition (a connection, an ack, the stop signal) sets `_changed`.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    self._changed.clear()
                    # Checked after clear(), so a change that lands in between is not lost.
                    if condition():
                        return True
                    await self._changed.wait()
        except TimeoutError:
            return False

    def _summary(self) -> dict[str, Any]:
        counts = self._stats.snapshot()
        return {key: counts[key] for key in ("sent", "acked", "failed")} | {
            "elapsed_s": round(self._elapsed_s, 3)
        }
