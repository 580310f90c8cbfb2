"""The publishing engine: one thread drives a share of the fleet over its MQTT connections.

Phases: open the connections at the ramp rate and wait for their CONNACKs (`ready`), wait for the
common start time (`start`), publish every scheduled message when it is due, wait (bounded) for
the PUBACKs still outstanding, disconnect, and report (`final`). Everything the app learns comes
through `emit(message)`: `ready`, `progress` (cumulative counts, twice a second), `truth` (one
ground-truth record) and `final` (counts, latencies, the acknowledged set).

Memory stays bounded whatever the broker does: a message is built only when its connection can
take it (`Connection.ready`, and at most `simulator.max_outstanding` unacknowledged per process);
otherwise the asset waits on its connection, and its messages more than `simulator.max_lag_s`
late are skipped and counted (`behind_schedule`), so sent + skipped = scheduled.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from simulators.acklog import AckLog, write_records
from simulators.connection import Connection
from simulators.fleet import Fleet
from simulators.injection import Injector, bad_payload
from simulators.outbox import EXTRA, Outbox
from simulators.scenario import Event
from simulators.schedule import TICK_S, Schedule
from simulators.stats import PublishStats
from simulators.wire import topic_field

log = logging.getLogger(__name__)

PROGRESS_S = 0.5
HOUSEKEEPING_S = 0.05
MISC_PERIOD_S = 1.0  # every connection's keepalive (and its waiting assets) checked this often
# Messages not sent this long after the duration are given up (skipped as behind_schedule), so
# an engine that cannot keep up with the schedule still ends on time.
LATE_GRACE_S = 1.0
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """A process's share: `count` assets from `first`, on whole connections."""

    shard: int
    first: int
    count: int
    connect_rate_per_s: float
    acked_part: str | None = None  # where to write this share of the acknowledged set


def as_sent(ts: float) -> float:
    """A device time as the payload carries it (six decimals), so the audit compares equals."""
    return round(ts, 6)


class Engine:
    def __init__(self, settings: Settings, spec: ShardSpec, events: list[Event], emit: Emit):
        self.settings, self.spec, self._emit = settings, spec, emit
        self._events = events
        sim = settings.simulator
        self.apc = sim.assets_per_connection
        self.qos = sim.qos
        self.max_outstanding = sim.max_outstanding
        self.stats = PublishStats(seed=spec.shard)
        self._halt = threading.Event()
        self._started = threading.Event()
        self._start_wall = 0.0
        self.conns: list[Connection] = []
        self.connected = 0
        self.sent_in_schedule = 0  # handed over while the schedule ran (not from a backlog after)
        self.elapsed_s = 0.0
        self.tick = 0  # the schedule's current tick
        self._blocked: dict[Connection, None] = {}  # connections with waiting assets, in order
        self._behind_logged = False
        self._selector = selectors.DefaultSelector()
        self._max_payload = settings.bridge.max_payload_bytes
        self._misc_at = 0
        self._progress_at = 0.0

    # --- control, from any thread --------------------------------------------------------------

    def start(self, at_wall: float) -> None:
        self._start_wall = at_wall
        self._started.set()

    def stop(self) -> None:
        self._halt.set()
        self._started.set()

    # --- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        sim, spec = self.settings.simulator, self.spec
        route = self.settings.bridge.routes[0]
        self.fleet = Fleet(sim, route, spec.first, spec.count)
        self.schedule = Schedule(self.fleet, self.fleet.per_asset(sim.duration_s), sim.max_lag_s)
        self.acks = AckLog(spec.first, spec.count)
        self.outbox = Outbox(self.qos, self.stats, self.acks)
        self.injector = Injector(self.fleet, self._events, self._truth)
        self.stats.anomalies = self.injector.counts
        self.topics = [topic_field(t) for t in self.fleet.topics]
        self.fleet.topics = []  # kept once, as the PUBLISH carries it
        self.held: dict[int, tuple[Connection, bytes, bytes, tuple[int, int, int]]] = {}
        count = -(-spec.count // self.apc)
        first_conn = spec.first // self.apc
        self.conns = [
            Connection(
                self.settings, first_conn + j, self.outbox.on_ack, self._on_state, self._on_socket
            )
            for j in range(count)
        ]
        try:
            self._ramp()
            self._emit({"type": "ready", "connected": self.connected, "connections": count})
            while not self._started.wait(0.0) and not self._halt.is_set():
                self._pump(0.02)
                self._housekeeping(time.monotonic(), 0.0)
            if not self._halt.is_set():
                self._publish_schedule()
            else:
                self.stats.skip("stopped", self.schedule.unsent())
            self._drain()
        except Exception:
            # Said, and counted: what was not sent is skipped for `error`, a failure the report
            # and the exit code show, so sent + skipped = scheduled still holds.
            log.exception("simulator engine failed", extra={"shard": self.spec.shard})
            self.stats.skip("error", self.schedule.unsent())
            raise
        finally:
            for conn in self.conns:
                self.outbox.give_up(conn, "stopped")
            self.stats.fail("unacked", self.stats.outstanding)  # QoS 0: written, not flushed
            self._close()
            self.injector.finish(self.elapsed_s, final=True)
            self._emit(self._final())

    def _ramp(self) -> None:
        """Open connections at the ramp rate, then wait for every CONNACK (bounded)."""
        started = time.monotonic()
        rate = self.spec.connect_rate_per_s
        opened = 0
        while opened < len(self.conns) and not self._halt.is_set():
            allowed = min(len(self.conns), int((time.monotonic() - started) * rate) + 1)
            while opened < allowed:
                self._connect(self.conns[opened], time.monotonic())
                opened += 1
            self._pump(min(0.01, 1.0 / rate))
            self._progress_maybe(time.monotonic())
        deadline = time.monotonic() + self.settings.mqtt.connect_timeout_s
        while self.connected < len(self.conns) and not self._halt.is_set():
            now = time.monotonic()
            if now > deadline:
                log.warning("not every connection is up; publishing anyway",
                            extra={"connections_up": self.connected, "connections": len(self.conns)})  # fmt: skip
                break
            self._pump(0.01)
            self._housekeeping(now, 0.0)

    def _connect(self, conn: Connection, now: float) -> None:
        conn.opened = True
        try:
            conn.connect()
        except OSError as exc:
            backoff = self.settings.backoff
            conn.failed_to_connect(now, backoff.initial_s, backoff.max_s, backoff.jitter)
            if conn.failures == 1:
                log.warning("mqtt connect failed, retrying",
                            extra={"client_id": conn.client_id, "error": str(exc)})  # fmt: skip
            return
        conn.retry_at = now + self.settings.mqtt.connect_timeout_s
        self.outbox.mark(conn)

    # --- the schedule -----------------------------------------------------------------------------

    def _publish_schedule(self) -> None:
        duration, schedule = self.settings.simulator.duration_s, self.schedule
        t0 = time.monotonic() + (self._start_wall - time.time())
        tick, next_housekeeping = -1, 0.0
        while schedule.remaining and not self._halt.is_set():
            now = time.monotonic()
            elapsed = now - t0
            if elapsed > duration + LATE_GRACE_S:
                break
            wall = time.time()
            due = int(elapsed / TICK_S)
            while tick < due:
                tick += 1
                self.tick = tick
                for local in schedule.take(tick):
                    self._serve(local, wall)
            if now >= next_housekeeping:
                self._housekeeping(now, elapsed)
                next_housekeeping = now + HOUSEKEEPING_S
            wait = t0 + (tick + 1) * TICK_S - time.monotonic()
            self._pump(max(0.0, wait) if schedule.remaining else 0.0)
        # Stopped, or late: never sent. Held messages were counted when taken and go out below.
        self.stats.skip("stopped" if self._halt.is_set() else "behind_schedule", schedule.unsent())
        for conn in self._blocked:
            conn.waiting.clear()
        self._blocked.clear()
        self.sent_in_schedule = self.stats.sent
        for local in list(self.held):
            self._release_held(local)
        if self.stats.skipped:
            log.warning("scheduled messages were not sent", extra={
                "skipped": dict(self.stats.skipped), "sent": self.stats.sent,
            })  # fmt: skip
        # The run lasts the whole duration even though the last message is due a little before.
        while not self._halt.is_set() and time.monotonic() - t0 < duration:
            self._pump(min(0.05, max(0.0, duration - (time.monotonic() - t0))))
            self._housekeeping(time.monotonic(), time.monotonic() - t0)
        self.elapsed_s = time.monotonic() - t0

    def _serve(self, local: int, wall: float) -> None:
        """An asset's message is due: skip what is too late, publish the next one if its
        connection takes it now, or leave the asset waiting on the connection."""
        schedule, tick = self.schedule, self.tick
        late = schedule.skip_late(local, tick)
        if late:
            self._behind(late)
        if schedule.done(local):
            self._release_held(local)
            return
        if schedule.due_tick[local] > tick:
            schedule.place(local)
            return
        conn = self.conns[local // self.apc]
        if conn.up and not (conn.ready and self.outbox.in_flight < self.max_outstanding):
            conn.waiting.append(local)  # at most once: it left the wheel
            self._blocked[conn] = None
            return
        self._message(local, schedule.next_k[local], wall)
        if not schedule.advance(local, tick):
            self._release_held(local)

    def _serve_waiting(self) -> None:
        """Assets waiting on connections that can take a message again (or went down)."""
        wall, outbox, cap = time.time(), self.outbox, self.max_outstanding
        for conn in list(self._blocked):
            waiting = conn.waiting
            while waiting and (not conn.up or (conn.ready and outbox.in_flight < cap)):
                self._serve(waiting.popleft(), wall)
            if not waiting:
                del self._blocked[conn]

    def _skip_waiting(self, conn: Connection) -> None:
        """Count the late messages of a connection's waiting assets as they fall behind, not
        only when the connection takes messages again."""
        schedule, waiting = self.schedule, conn.waiting
        for _ in range(len(waiting)):
            local = waiting.popleft()
            late = schedule.skip_late(local, self.tick)
            if late:
                self._behind(late)
            if schedule.done(local):
                self._release_held(local)
            else:
                waiting.append(local)

    def _behind(self, count: int) -> None:
        self.stats.skip("behind_schedule", count)
        if not self._behind_logged:
            self._behind_logged = True
            log.warning(
                "publishing fell behind the schedule: messages more than %.1f s late are skipped",
                self.settings.simulator.max_lag_s,
                extra={"in_flight": self.outbox.in_flight, "waiting": len(self._blocked)},
            )

    def _message(self, local: int, k: int, wall: float) -> None:
        """Build and publish message k of an asset, with whatever is injected into it."""
        fleet, outbox = self.fleet, self.outbox
        values = fleet.values(local, k)
        conn = self.conns[local // self.apc]
        topic = self.topics[local]
        if local not in self.injector.by_asset and local not in self.injector.restarts:
            r = fleet.random_anomaly(local, k)
            if r is not None:
                values[r] = self.injector.random_anomaly(local, k, as_sent(wall), k, r)
            outbox.publish(conn, topic, fleet.encode(local, wall, k, values), (local, 0, k))
            return
        m = self.injector.apply(local, k, wall, values)
        if m.silenced:
            self.stats.skip("silenced")
            return
        payload = fleet.encode(local, m.ts, m.seq, values)
        if m.restarted:
            self.acks.restarted(local, as_sent(m.ts))
        ident = (local, -2 - m.epoch if m.bad else m.epoch, m.seq)
        if m.bad:
            self.stats.fault("clock_skew")
        if m.hold:
            self.stats.fault("out_of_order")
            self._release_held(local)
            self.held[local] = (conn, topic, payload, ident)
            return
        outbox.publish(conn, topic, payload, ident)
        self._release_held(local)
        if m.restarted:
            self.stats.fault("restart")
        if m.duplicate:
            self.stats.fault("duplicate")
            outbox.publish(conn, topic, payload, ident, scheduled=False)
        for kind in m.extras:
            self.stats.fault(kind)
            bad = bad_payload(kind, payload, m.ts, m.seq, self._max_payload)
            outbox.publish(conn, topic, bad, (local, EXTRA, 0), scheduled=False)

    def _release_held(self, local: int) -> None:
        held = self.held.pop(local, None) if self.held else None
        if held is not None:
            self.outbox.publish(*held)

    def _truth(self, record: dict[str, Any]) -> None:
        self._emit({"type": "truth", "record": record})

    # --- the network ------------------------------------------------------------------------------

    def _pump(self, timeout_s: float) -> None:
        """Write what is queued, wait for readable sockets up to `timeout_s`, read them; then
        what the acks made room for."""
        outbox = self.outbox
        outbox.flush()
        for key, _ in self._selector.select(timeout_s):
            conn: Connection = key.data
            conn.read()
        if outbox.backlogged:
            outbox.drain_backlogs()
        if self._blocked:
            self._serve_waiting()
        outbox.flush()

    def _on_socket(self, conn: Connection, sock: socket.socket | None) -> None:
        if conn.registered is not None:
            self._selector.unregister(conn.registered)
            conn.registered = None
        if sock is not None:
            self._selector.register(sock, selectors.EVENT_READ, conn)
            conn.registered = sock

    def _on_state(self, conn: Connection, up: bool) -> None:
        if up:
            self.connected += 1
            return
        self.connected -= 1
        self.outbox.give_up(conn)
        if self.qos == 0 and conn.unflushed:
            self.stats.fail("unacked", conn.unflushed)  # written to a socket that broke
            conn.unflushed = 0
        conn.retry_at = time.monotonic() + self.settings.backoff.initial_s

    def _housekeeping(self, now: float, elapsed: float) -> None:
        conns = self.conns
        if conns:
            share = max(1, int(len(conns) * HOUSEKEEPING_S / MISC_PERIOD_S))
            start = self._misc_at % len(conns)
            for conn in conns[start : start + share]:
                if conn.waiting:
                    self._skip_waiting(conn)
                if conn.up:
                    conn.misc()
                elif conn.opened and not conn.closing and now >= conn.retry_at:
                    if conn.client.socket() is not None:  # no CONNACK in time
                        conn.client.disconnect()
                        conn.flush()
                    self._connect(conn, now)
            self._misc_at = start + share
        self.injector.finish(elapsed)
        self._progress_maybe(now)

    def _progress_maybe(self, now: float) -> None:
        if now - self._progress_at >= PROGRESS_S:
            self._progress_at = now
            self._emit(self._progress())

    def _progress(self) -> dict[str, Any]:
        return {"type": "progress", "connected": self.connected, **self.stats.snapshot()}

    def _drain(self) -> None:
        """Wait for outstanding PUBACKs, bounded by simulator.ack_timeout_s; give up the rest."""
        outbox = self.outbox
        deadline = time.monotonic() + self.settings.simulator.ack_timeout_s
        while (outbox.in_flight or outbox.backlogged) and time.monotonic() < deadline:
            self._pump(0.02)
            self._progress_maybe(time.monotonic())
        if outbox.in_flight:
            log.warning("acknowledgements still outstanding after the drain timeout; given up as"
                        " unconfirmed", extra={"outstanding": outbox.in_flight})  # fmt: skip
        for conn in self.conns:
            outbox.give_up(conn, "behind_schedule")

    def _close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.outbox.flush()
        self._selector.close()

    def _final(self) -> dict[str, Any]:
        if self.spec.acked_part is not None:
            with open(self.spec.acked_part, "w", encoding="utf-8") as out:
                write_records(out, self.acks.records())
        return {
            **self._progress(),
            "type": "final",
            "connected": 0,
            "sent_in_schedule": self.sent_in_schedule,
            "elapsed_s": self.elapsed_s,
            "latencies": self.stats.latencies,
        }
