"""The publishing engine: one thread drives a share of the fleet over its MQTT connections.

Phases: open the connections at the ramp rate and wait for their CONNACKs (`ready`), wait for the
common start time (`start`), publish every scheduled message when it is due, wait (bounded) for
the PUBACKs still outstanding, disconnect, and report (`final`). Everything the app learns comes
through `emit(message)`: `ready`, `progress` (cumulative counts, twice a second), `truth` (one
ground-truth record) and `final` (counts, latencies, the acknowledged set).

Scheduling is a timing wheel of 5 ms ticks: a tick's bucket lists the assets due in it, each is
sent and put back in the bucket of its next message. Per message this costs a list append, where a
heap would cost a tuple and two O(log n) operations; per asset it costs two array slots.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.settings import Settings
from simulators.acklog import AckLog, write_records
from simulators.connection import Connection, publish_qos0
from simulators.fleet import Fleet
from simulators.injection import Injector
from simulators.scenario import Event
from simulators.stats import PublishStats

log = logging.getLogger(__name__)

TICK_S = 0.005
WHEEL_SLOTS = 4096  # 20 s of ticks; longer intervals wait a few laps (`due_tick` says when)
PROGRESS_S = 0.5
HOUSEKEEPING_S = 0.05
MISC_PERIOD_S = 1.0  # every connection's keepalive is checked this often
# Messages not sent this long after the duration are given up (reported as unsent), so an engine
# that cannot keep up with the schedule still ends on time.
LATE_GRACE_S = 1.0
# Sentinel epochs of an in-flight message: a fault's extra message (not audited), a bad one.
EXTRA = -1

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
        self.stats = PublishStats(seed=spec.shard)
        self._halt = threading.Event()
        self._started = threading.Event()
        self._start_wall = 0.0
        self.conns: list[Connection] = []
        self.connected = 0
        self.unsent = 0
        self.sent_in_schedule = (
            0  # handed to paho while the schedule ran (not from a backlog after)
        )
        self.elapsed_s = 0.0
        self._dirty: list[Connection] = []
        self._backlogged: set[Connection] = set()
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
        self.acks = AckLog(spec.first, spec.count)
        self.injector = Injector(self.fleet, self._events, self._truth)
        self.stats.anomalies = self.injector.counts
        self.topic_bytes = [t.encode() for t in self.fleet.topics] if self.qos == 0 else []
        count = -(-spec.count // self.apc)
        first_conn = spec.first // self.apc
        self.conns = [
            Connection(self.settings, first_conn + j, self._on_ack, self._on_state, self._on_socket)
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
                self.unsent = self.fleet.count * self.fleet.per_asset(sim.duration_s)
            self._drain()
        finally:
            self.stats.fail("unacked", self.stats.outstanding)
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
        self._mark(conn)

    def _publish_schedule(self) -> None:
        fleet, duration = self.fleet, self.settings.simulator.duration_s
        per_asset = fleet.per_asset(duration)
        n = fleet.count
        self.next_k = array("l", bytes(8 * n))
        self.due_tick = array("l", (int(fleet.due_s(i, 0) / TICK_S) for i in range(n)))
        wheel: list[list[int]] = [[] for _ in range(WHEEL_SLOTS)]
        for local in range(n):
            wheel[self.due_tick[local] % WHEEL_SLOTS].append(local)
        self.held: dict[int, tuple[Connection, str, bytes, int, int, int]] = {}
        t0 = time.monotonic() + (self._start_wall - time.time())
        remaining, tick = n, -1
        next_housekeeping = 0.0
        while remaining and not self._halt.is_set():
            now = time.monotonic()
            elapsed = now - t0
            if elapsed > duration + LATE_GRACE_S:
                log.warning("publishing fell behind the schedule; giving up the rest",
                            extra={"unsent": sum(per_asset - k for k in self.next_k)})  # fmt: skip
                break
            wall = time.time()
            due = int(elapsed / TICK_S)
            while tick < due:
                tick += 1
                slot = tick % WHEEL_SLOTS
                bucket, wheel[slot] = wheel[slot], []
                for local in bucket:
                    d = self.due_tick[local]
                    if d > tick:
                        wheel[d % WHEEL_SLOTS].append(local)
                        continue
                    k = self.next_k[local]
                    self._message(local, k, wall)
                    k += 1
                    self.next_k[local] = k
                    if k < per_asset:
                        d = max(tick + 1, int(fleet.due_s(local, k) / TICK_S))
                        self.due_tick[local] = d
                        wheel[d % WHEEL_SLOTS].append(local)
                    else:
                        remaining -= 1
                        self._release_held(local)
            if now >= next_housekeeping:
                self._housekeeping(now, elapsed)
                next_housekeeping = now + HOUSEKEEPING_S
            wait = t0 + (tick + 1) * TICK_S - time.monotonic()
            self._pump(max(0.0, wait) if remaining else 0.0)
        self.unsent = sum(per_asset - k for k in self.next_k)  # stopped or late: never sent
        self.sent_in_schedule = self.stats.sent
        for local in list(self.held):
            self._release_held(local)
        # The run lasts the whole duration even though the last message is due a little before.
        while not self._halt.is_set() and time.monotonic() - t0 < duration:
            self._pump(min(0.05, max(0.0, duration - (time.monotonic() - t0))))
            self._housekeeping(time.monotonic(), time.monotonic() - t0)
        self.elapsed_s = time.monotonic() - t0

    def _message(self, local: int, k: int, wall: float) -> None:
        """Build and publish message k of an asset, with whatever is injected into it."""
        fleet = self.fleet
        values = fleet.values(local, k)
        conn = self.conns[local // self.apc]
        topic = fleet.topics[local]
        if local not in self.injector.by_asset and local not in self.injector.restarts:
            seq = k
            r = fleet.random_anomaly(local, k)
            if r is not None:
                values[r] = self.injector.random_anomaly(local, k, as_sent(wall), seq, r)
            self._publish(conn, topic, fleet.encode(local, wall, seq, values), local, 0, seq)
            return
        m = self.injector.apply(local, k, wall, values)
        if m.silenced:
            self.stats.silenced += 1
            return
        payload = fleet.encode(local, m.ts, m.seq, values)
        if m.restarted:
            self.acks.restarted(local, as_sent(m.ts))
        epoch = -2 - m.epoch if m.bad else m.epoch
        if m.bad:
            self._count_fault("clock_skew")
        if m.hold:
            self._count_fault("out_of_order")
            self._release_held(local)
            self.held[local] = (conn, topic, payload, local, epoch, m.seq)
            return
        self._publish(conn, topic, payload, local, epoch, m.seq)
        self._release_held(local)
        if m.restarted:
            self._count_fault("restart")
        if m.duplicate:
            self._count_fault("duplicate")
            self._publish(conn, topic, payload, local, epoch, m.seq)
        for kind in m.extras:
            self._count_fault(kind)
            self._publish(
                conn, topic, self._bad_payload(kind, payload, m.ts, m.seq), local, EXTRA, 0
            )

    def _release_held(self, local: int) -> None:
        held = self.held.pop(local, None) if self.held else None
        if held is not None:
            self._publish(*held)

    def _count_fault(self, kind: str) -> None:
        faults = self.stats.faults
        faults[kind] = faults.get(kind, 0) + 1

    def _bad_payload(self, kind: str, payload: bytes, ts: float, seq: int) -> bytes:
        if kind == "malformed":
            return payload[: len(payload) // 2]  # cut mid-object: not JSON
        if kind == "wrong_type":
            return b'{"ts":%.6f,"seq":"%d","values":{"temperature":"hot"}}' % (ts, seq)
        pad = self._max_payload + 1024 - len(payload)  # oversized: past bridge.max_payload_bytes
        return payload[:-1] + b',"blob":"' + b"x" * max(pad, 1) + b'"}'

    def _truth(self, record: dict[str, Any]) -> None:
        self._emit({"type": "truth", "record": record})

    # --- publishing and acks ----------------------------------------------------------------------

    def _publish(
        self, conn: Connection, topic: str, payload: bytes, local: int, epoch: int, seq: int
    ) -> None:
        stats = self.stats
        if not conn.up:
            stats.fail("not_connected")
            return
        if self.qos == 1:
            if conn.backlog or conn.full:
                if len(conn.backlog) >= conn.queue_limit:
                    stats.fail("queue_full")
                    return
                conn.backlog.append((topic, payload, (local, epoch, seq)))
                self._backlogged.add(conn)
                return
            if not self._publish_qos1(conn, topic, payload, local, epoch, seq):
                return
        elif not publish_qos0(conn.client, self.topic_bytes[local], payload):
            stats.fail("error")
            return
        else:
            stats.sent += 1
            conn.unflushed += 1
            self._record(local, epoch, seq)
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def _publish_qos1(
        self, conn: Connection, topic: str, payload: bytes, local: int, epoch: int, seq: int
    ) -> bool:
        """Hand a QoS 1 publish to paho and await its PUBACK; False if paho refused it."""
        info = conn.client.publish(topic, payload, 1)
        if info.rc:
            self.stats.fail("error")
            return False
        conn.pending[info.mid] = (local, epoch, seq, time.perf_counter())
        self.stats.sent += 1
        return True

    def _record(self, local: int, epoch: int, seq: int) -> None:
        if epoch >= 0:
            self.acks.add(local, epoch, seq)
        elif epoch < EXTRA:
            self.acks.add_bad(local, -2 - epoch, seq)

    def _on_ack(self, conn: Connection, mid: int, failed: bool) -> None:
        entry = conn.pending.pop(mid, None)
        if entry is None:
            return
        local, epoch, seq, started = entry
        if failed:  # an MQTT 5 PUBACK with an error reason, e.g. not authorized
            self.stats.fail("rejected")
        else:
            self.stats.acked += 1
            self.stats.observe(time.perf_counter() - started)
            self._record(local, epoch, seq)
        if conn.backlog:
            self._backlogged.add(conn)

    def _drain_backlogs(self) -> None:
        for conn in list(self._backlogged):
            self._backlogged.discard(conn)
            while conn.backlog and not conn.full and conn.up:
                topic, payload, (local, epoch, seq) = conn.backlog.popleft()
                self._publish_qos1(conn, topic, payload, local, epoch, seq)
            self._mark(conn)

    def _mark(self, conn: Connection) -> None:
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    # --- the network ------------------------------------------------------------------------------

    def _pump(self, timeout_s: float) -> None:
        """Write what is queued, wait for readable sockets up to `timeout_s`, read them."""
        self._flush()
        for key, _ in self._selector.select(timeout_s):
            conn: Connection = key.data
            conn.read()
        if self._backlogged:
            self._drain_backlogs()
        self._flush()

    def _flush(self) -> None:
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            written = conn.unflushed
            if conn.flush():
                if self.qos == 0:
                    self.stats.acked += written
            else:
                self._mark(conn)  # the kernel buffer is full: try again next pass

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
        return {
            "type": "progress",
            "connected": self.connected,
            **self.stats.snapshot(),
        }

    def _drain(self) -> None:
        """Wait for outstanding PUBACKs, bounded by simulator.ack_timeout_s."""
        deadline = time.monotonic() + self.settings.simulator.ack_timeout_s
        while (self.stats.outstanding or any(c.backlog for c in self.conns)) and (
            time.monotonic() < deadline
        ):
            self._pump(0.02)
            self._progress_maybe(time.monotonic())
        queued = sum(len(c.backlog) for c in self.conns)
        self.stats.fail("queue_full", queued)
        if self.stats.outstanding:
            log.warning("acknowledgements still outstanding after the drain timeout",
                        extra={"outstanding": self.stats.outstanding})  # fmt: skip

    def _close(self) -> None:
        for conn in self.conns:
            conn.close()
        self._flush()
        self._selector.close()

    def _final(self) -> dict[str, Any]:
        self._write_acked()
        return {
            **self._progress(),
            "type": "final",
            "connected": 0,
            "unsent": self.unsent,
            "sent_in_schedule": self.sent_in_schedule,
            "elapsed_s": self.elapsed_s,
            "latencies": self.stats.latencies,
        }

    def _write_acked(self) -> None:
        if self.spec.acked_part is None:
            return
        with open(self.spec.acked_part, "w", encoding="utf-8") as out:
            write_records(out, self.acks.records())
