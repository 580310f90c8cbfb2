"""Locust load test of iotbridge: MQTT device fleets, HTTP devices and an end-to-end probe.

    locust -f simulators/locustfile.py --host mqtt://127.0.0.1:1883 MqttFleetUser TelemetryProbeUser

- `MqttFleetUser`: one MQTT connection per user carrying `--devices-per-user` devices, each on
  its own schedule at `--device-rate` Hz (the simulator's asset classes and signal models,
  `simulators.fleet`). A QoS 1 PUBACK round trip is one request event named by route; a PUBACK
  that does not come within `--puback-timeout`, or refuses (MQTT 5 reason >= 0x80), is a failure.
- `GatewayUser`: the same devices posting to the HTTP gateway (`--gateway-url`) with a bearer
  token (`--gateway-token`), one reading a request or `--gateway-bulk` readings as NDJSON.
- `TelemetryProbeUser` (one per run): reads the telemetry streams and reports publish-to-stored
  latency (`E2E`, `<route> stored`) and messages missing from a device's seq run for longer than
  `--probe-grace` (`E2E`, `<route> missing`, a failure).

Device ids never collide between workers: worker w owns the `--devices-per-worker` ids from
`--first-device + w * devices-per-worker` on (index 0 is `a000001`),
and a user takes a free block of `--devices-per-user` of them (a stopped user's block, with its
devices' seq counters, goes to the next user); a user's MQTT client id names its block's first
device, so it is unique wherever the devices are. `--acked FILE` writes what the broker acknowledged
(or the gateway stored), per process (`FILE.w<index>` on a worker), for `iotbridge audit --acked`.

Settings (route, broker credentials, Redis) come from `--iotbridge-config` or config/settings.yaml,
with `IOTBRIDGE_*` environment variables winning, as for every iotbridge command. Plain TCP only.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event
from locust import FastHttpUser, User, constant, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from bridge.redis_nodes import connect_sync
from bridge.shard_reads import xread_each
from config import loader
from config.keys import Keys
from config.settings import RouteSettings, Settings
from simulators import acked as acked_file
from simulators.acklog import AckLog
from simulators.fleet import Fleet
from simulators.loadclient import Endpoint, MqttPublisher, MqttRefused
from simulators.wire import topic_field

log = logging.getLogger(__name__)

MAX_DEVICES_PER_USER = 10_000
MAX_DEVICE_RATE_HZ = 100.0
MAX_LAG_S = 2.0  # a message this late is skipped (a failure), never queued: as the simulator does
STOP_DRAIN_S = 5.0  # how long a stopping user waits for its outstanding PUBACKs
MAX_GAPS = 100_000  # seq gaps the probe watches at once; past that a gap is reported at once
RECONNECT_S = 1.0
MID_LIMIT = 65_535


# --- options -------------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--devices-per-user", type=int, default=100,
                        help="Devices one user (one MQTT connection) drives.")  # fmt: skip
    parser.add_argument("--device-rate", type=float, default=1.0,
                        help="Messages per second of each device.")  # fmt: skip
    parser.add_argument("--qos", type=int, default=1, choices=[0, 1], help="MQTT publish QoS.")
    parser.add_argument("--puback-timeout", type=float, default=10.0,
                        help="Seconds a QoS 1 publish may wait for its PUBACK.")  # fmt: skip
    parser.add_argument("--devices-per-worker", type=int, default=100_000, include_in_web_ui=False,
                        help="Device ids reserved per worker (worker w starts at w times this).")  # fmt: skip
    parser.add_argument("--first-device", type=int, default=0, include_in_web_ui=False,
                        help="Index of the first device id (0: a000001), so that runs side by side "
                        "do not publish as the same assets.")  # fmt: skip
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8000",
                        help="The HTTP gateway of GatewayUser.")  # fmt: skip
    parser.add_argument("--gateway-token", default="", is_secret=True,
                        env_var="IOTBRIDGE_LOAD_GATEWAY_TOKEN",
                        help="Bearer token of GatewayUser's devices (iotbridge token create).")  # fmt: skip
    parser.add_argument("--gateway-bulk", type=int, default=0,
                        help="Readings per NDJSON request of GatewayUser; 0: one POST each.")  # fmt: skip
    parser.add_argument("--probe-grace", type=float, default=10.0,
                        help="Seconds a seq gap may stay open before the probe reports it missing.")  # fmt: skip
    parser.add_argument("--iotbridge-config", default="", include_in_web_ui=False,
                        help="iotbridge settings file (default config/settings.yaml).")  # fmt: skip
    parser.add_argument("--acked", default="", include_in_web_ui=False,
                        help="Write what was acknowledged to this file (FILE.w<index> per worker).")  # fmt: skip


@dataclass(frozen=True, slots=True)
class LoadOptions:
    devices_per_user: int
    device_rate: float
    qos: int
    puback_timeout_s: float
    devices_per_worker: int
    first_device: int
    gateway_url: str
    gateway_token: str
    gateway_bulk: int
    probe_grace_s: float
    config: str
    acked: str

    @classmethod
    def of(cls, environment: Environment) -> LoadOptions:
        """The options as given (the web UI's form included), checked: ValueError when not."""
        o = environment.parsed_options
        if o is None:
            raise ValueError("Locust was started without its command line options")
        options = cls(
            int(o.devices_per_user), float(o.device_rate), int(o.qos), float(o.puback_timeout),
            int(o.devices_per_worker), int(o.first_device), str(o.gateway_url), str(o.gateway_token),
            int(o.gateway_bulk), float(o.probe_grace), str(o.iotbridge_config), str(o.acked),
        )  # fmt: skip
        options.check()
        return options

    def check(self) -> None:
        if not 1 <= self.devices_per_user <= MAX_DEVICES_PER_USER:
            raise ValueError(f"--devices-per-user must be 1..{MAX_DEVICES_PER_USER}")
        if not 0 < self.device_rate <= MAX_DEVICE_RATE_HZ:
            raise ValueError(f"--device-rate must be > 0 and <= {MAX_DEVICE_RATE_HZ}")
        if self.qos not in (0, 1):
            raise ValueError("--qos must be 0 or 1")
        if self.puback_timeout_s <= 0 or self.probe_grace_s <= 0:
            raise ValueError("--puback-timeout and --probe-grace must be > 0")
        if self.devices_per_worker < self.devices_per_user:
            raise ValueError("--devices-per-worker must be at least --devices-per-user")
        if self.first_device < 0:
            raise ValueError("--first-device must be >= 0")
        if not 0 <= self.gateway_bulk <= 10_000:
            raise ValueError("--gateway-bulk must be 0..10000")


@cache
def settings_of(path: str) -> Settings:
    return loader.load(Path(path) if path else None)


def route_of(settings: Settings) -> RouteSettings:
    return settings.bridge.routes[0]


def worker_index(environment: Environment) -> int:
    runner = environment.runner
    return runner.worker_index if isinstance(runner, WorkerRunner) else 0


# --- devices -------------------------------------------------------------------------------------


@dataclass
class DeviceBlock:
    """`count` devices from global index `first`: their signal models, topics, the next seq of
    each (kept when a user stops, so the next user continues them) and what was acknowledged."""

    fleet: Fleet
    topics: list[bytes]
    next_seq: list[int]
    acklog: AckLog
    stored: int = 0
    duplicate: int = 0


@dataclass
class Devices:
    """This process's device blocks, handed to users lowest free slot first."""

    blocks: dict[int, DeviceBlock] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    next_slot: int = 0
    shape: tuple[int, int, int] | None = None  # (per user, first, worker) of the blocks

    def take(self, environment: Environment, options: LoadOptions) -> tuple[int, DeviceBlock]:
        shape = (options.devices_per_user, options.first_device, worker_index(environment))
        if shape != self.shape:
            self.blocks.clear()
            self.free.clear()
            self.next_slot, self.shape = 0, shape
        slot = heapq.heappop(self.free) if self.free else self.next_slot
        self.next_slot = max(self.next_slot, slot + 1)
        count = options.devices_per_user
        if (slot + 1) * count > options.devices_per_worker:
            heapq.heappush(self.free, slot)
            raise ValueError(f"more than --devices-per-worker ({options.devices_per_worker}) "
                             "devices in one worker")  # fmt: skip
        if slot not in self.blocks:
            self.blocks[slot] = self._block(environment, options, slot)
        return slot, self.blocks[slot]

    def give_back(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    @staticmethod
    def _block(environment: Environment, options: LoadOptions, slot: int) -> DeviceBlock:
        settings = settings_of(options.config)
        count = options.devices_per_user
        first = (options.first_device + worker_index(environment) * options.devices_per_worker
                 + slot * count)  # fmt: skip
        simulator = settings.simulator.model_copy(
            update={"rate_hz": options.device_rate, "anomaly_rate": 0.0}
        )
        fleet = Fleet(simulator, route_of(settings), first, count)
        topics = [topic_field(topic) for topic in fleet.topics]
        return DeviceBlock(fleet, topics, [0] * count, AckLog(first, count))

    def records(self) -> Iterator[dict[str, Any]]:
        for slot in sorted(self.blocks):
            yield from self.blocks[slot].acklog.records()

    def reset_acks(self) -> None:
        for block in self.blocks.values():
            fleet = block.fleet
            block.acklog = AckLog(fleet.first, fleet.count)
            block.stored = block.duplicate = 0


DEVICES = Devices()


class Schedule:
    """When each device of a block sends next: its own phase and jitter (`Fleet.due_s`), from the
    moment a user took the block."""

    def __init__(self, block: DeviceBlock) -> None:
        self.block = block
        self.start = time.monotonic()
        self.first_seq = list(block.next_seq)
        fleet = block.fleet
        self.heap = [(self.start + fleet.due_s(local, 0), local) for local in range(fleet.count)]
        heapq.heapify(self.heap)

    def next_due(self) -> float:
        return self.heap[0][0]

    def pop(self) -> tuple[float, int, int]:
        """(due, device, seq) of the next message; the device's next one is scheduled."""
        due, local = heapq.heappop(self.heap)
        seq = self.block.next_seq[local]
        self.block.next_seq[local] = seq + 1
        k = seq + 1 - self.first_seq[local]
        heapq.heappush(self.heap, (self.start + self.block.fleet.due_s(local, k), local))
        return due, local, seq

    def payload(self, local: int, seq: int) -> bytes:
        fleet = self.block.fleet
        return fleet.encode(local, time.time(), seq, fleet.values(local, seq))


def fire(
    environment: Environment, kind: str, name: str, started: float, length: int,
    exception: BaseException | None = None,
) -> None:  # fmt: skip
    environment.events.request.fire(
        request_type=kind, name=name, response_time=(time.perf_counter() - started) * 1000,
        response_length=length, exception=exception, context={},
    )  # fmt: skip


class BehindSchedule(Exception):
    """A message skipped: it was due more than MAX_LAG_S ago."""


class PubackTimeout(Exception):
    """No PUBACK within --puback-timeout."""


# --- MQTT ----------------------------------------------------------------------------------------


class MqttFleetUser(User):
    """Many devices over one MQTT connection (`--host mqtt://host:port`, else mqtt.url)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.options = LoadOptions.of(self.environment)
        settings = settings_of(self.options.config)
        self.route = route_of(settings).name
        self.kind = f"MQTT QoS {self.options.qos}"
        self.slot, self.block = DEVICES.take(self.environment, self.options)
        self.schedule = Schedule(self.block)
        host = self.environment.host or ""
        url = urllib.parse.urlsplit(host if host.startswith("mqtt") else settings.mqtt.url)
        if url.scheme != "mqtt":
            raise ValueError(f"{url.geturl()}: only mqtt:// (plain TCP) is load-tested here")
        m = settings.mqtt
        endpoint = Endpoint(url.hostname or "127.0.0.1", url.port or 1883, v5=m.protocol == "5",
                            keepalive_s=m.keepalive_s, connect_timeout_s=m.connect_timeout_s,
                            username=m.username,
                            password=m.password.get_secret_value() if m.password else None)  # fmt: skip
        # Named after the block's first device, as device ids never collide: runs side by side
        # (separate --first-device) never take each other's connections over at the broker.
        client_id = f"{settings.simulator.client_id_prefix}-locust-{self.block.fleet.first}"
        self.client = MqttPublisher(endpoint, client_id)
        self.pending: dict[int, tuple[int, int, float, int]] = {}  # mid: device, seq, sent, size
        # Given up (timed out) but unacknowledged: still in flight for the broker, whose Receive
        # Maximum counts them until their PUBACK comes or the connection ends.
        self.abandoned: set[int] = set()
        self.room = Event()
        self.mids = itertools.cycle(range(1, MID_LIMIT + 1))
        self.window = 1
        self.reader: gevent.Greenlet[Any, Any] | None = None
        self.last_write = 0.0
        self._connect()

    def _connect(self) -> bool:
        try:
            window = self.client.connect()
        except OSError as exc:
            log.warning("MQTT connect failed, retrying in %.1f s: %s", RECONNECT_S, exc)
            return False
        self.window = max(1, min(window, MID_LIMIT - 1))
        self.last_write = time.monotonic()
        self.reader = gevent.spawn(self._read)
        return True

    def _read(self) -> None:
        try:
            while True:
                self.client.read(self._on_ack)
        except OSError as exc:  # ConnectionError and MqttRefused included
            self.client.close()
            self._give_up_pending(exc)

    def _on_ack(self, mid: int, refused: bool) -> None:
        found = self.pending.pop(mid, None)
        if found is None:
            self.abandoned.discard(mid)  # given up (timed out) before; its slot is free again
            self.room.set()
            return
        local, seq, sent, size = found
        if refused:
            fire(self.environment, self.kind, self.route, sent, size,
                 MqttRefused("PUBACK refused the message"))  # fmt: skip
        else:
            self.block.acklog.add(local, 0, seq)
            fire(self.environment, self.kind, self.route, sent, size)
        self.room.set()

    def _give_up_pending(self, exc: BaseException) -> None:
        for local, seq, sent, size in self.pending.values():
            self.block.acklog.add_unconfirmed(local, 0, seq)
            fire(self.environment, self.kind, self.route, sent, size, exc)
        self.pending.clear()
        self.abandoned.clear()
        self.room.set()

    def _expire(self, now: float) -> None:
        limit = self.options.puback_timeout_s
        while self.pending:
            mid, (local, seq, sent, size) = next(iter(self.pending.items()))
            if time.perf_counter() - sent < limit:
                return
            del self.pending[mid]
            self.abandoned.add(mid)
            self.block.acklog.add_unconfirmed(local, 0, seq)
            fire(self.environment, self.kind, self.route, sent, size,
                 PubackTimeout(f"no PUBACK within {limit:g} s"))  # fmt: skip

    @task
    def publish_due(self) -> None:
        """Publish every message that is due, then sleep until the next one (at most 1 s)."""
        now = time.monotonic()
        self._expire(now)
        if not self.client.connected and not self._connect():
            self._skip_until(now, ConnectionError("not connected"))
            gevent.sleep(RECONNECT_S)
            return
        self._skip_until(now - MAX_LAG_S, BehindSchedule(f"due more than {MAX_LAG_S:g} s ago"))
        while self.schedule.next_due() <= now and self.client.connected:
            if len(self.pending) + len(self.abandoned) >= self.window:
                self.room.clear()
                self.room.wait(1.0)  # a PUBACK frees a slot of the broker's Receive Maximum
                return
            self._publish_next()
        keepalive = self.client.endpoint.keepalive_s / 2
        if self.client.connected and time.monotonic() - self.last_write > keepalive:
            self._send(self.client.ping)
        gevent.sleep(max(0.0, min(self.schedule.next_due() - time.monotonic(), 1.0)))

    def _skip_until(self, deadline: float, reason: Exception) -> None:
        while self.schedule.next_due() < deadline:
            _, _, _ = self.schedule.pop()
            fire(self.environment, self.kind, self.route, time.perf_counter(), 0, reason)

    def _publish_next(self) -> None:
        _, local, seq = self.schedule.pop()
        payload = self.schedule.payload(local, seq)
        mid = 0
        if self.options.qos:
            mid = next(self.mids)
            while mid in self.pending or mid in self.abandoned:
                mid = next(self.mids)
        sent = time.perf_counter()
        if mid:
            self.pending[mid] = (local, seq, sent, len(payload))
        if not self._send(lambda: self.client.publish(self.block.topics[local], payload, mid)):
            return  # the reader gives the pending ones up
        if not mid:
            self.block.acklog.add(local, 0, seq)  # QoS 0: acknowledged means written
            fire(self.environment, self.kind, self.route, sent, len(payload))

    def _send(self, write: Any) -> bool:
        try:
            write()
        except OSError as exc:
            log.warning("MQTT write failed: %s", exc)
            self.client.close()
            return False
        self.last_write = time.monotonic()
        return True

    def on_stop(self) -> None:
        """Wait a bounded while for outstanding PUBACKs; what is still unacknowledged then is
        recorded as unconfirmed (the broker may have it) and reported as failed."""
        if not hasattr(self, "client"):
            return
        deadline = time.monotonic() + min(STOP_DRAIN_S, self.options.puback_timeout_s)
        while self.pending and self.client.connected and time.monotonic() < deadline:
            self.room.clear()
            self.room.wait(max(0.0, deadline - time.monotonic()))
        if self.pending:
            self._give_up_pending(PubackTimeout("still unacknowledged when the user stopped"))
        self.client.disconnect()
        if self.reader is not None:
            self.reader.kill(block=True, timeout=2)
        DEVICES.give_back(self.slot)


# --- HTTP gateway --------------------------------------------------------------------------------


class GatewayUser(FastHttpUser):
    """Devices posting their readings to the gateway with a bearer token: one reading per POST,
    or `--gateway-bulk` buffered readings of a device as one NDJSON request."""

    wait_time = constant(0)
    host = "http://127.0.0.1:8000"

    def __init__(self, environment: Environment) -> None:
        self.host = str(getattr(environment.parsed_options, "gateway_url", "") or self.host)
        super().__init__(environment)

    def on_start(self) -> None:
        self.options = LoadOptions.of(self.environment)
        self.route = route_of(settings_of(self.options.config)).name
        self.slot, self.block = DEVICES.take(self.environment, self.options)
        self.schedule = Schedule(self.block)
        self.headers = {"Authorization": f"Bearer {self.options.gateway_token}"}
        self.paths = [
            "/api/v1/topics/" + urllib.parse.quote(topic, safe="/")
            for topic in self.block.fleet.topics
        ]
        self.buffered: dict[int, list[tuple[int, bytes]]] = {}

    @task
    def post_due(self) -> None:
        now = time.monotonic()
        while self.schedule.next_due() <= now:
            due, local, seq = self.schedule.pop()
            if due < now - MAX_LAG_S:
                fire(self.environment, "POST", self.route, time.perf_counter(), 0,
                     BehindSchedule(f"due more than {MAX_LAG_S:g} s ago"))  # fmt: skip
                continue
            payload = self.schedule.payload(local, seq)
            if not self.options.gateway_bulk:
                self._post(local, [(seq, payload)], single=True)
                continue
            readings = self.buffered.setdefault(local, [])
            readings.append((seq, payload))
            if len(readings) >= self.options.gateway_bulk:
                self._post(local, self.buffered.pop(local), single=False)
        gevent.sleep(max(0.0, min(self.schedule.next_due() - time.monotonic(), 1.0)))

    def _post(self, local: int, readings: list[tuple[int, bytes]], *, single: bool) -> None:
        if single:
            body, kind = readings[0][1], "application/json"
        else:
            body, kind = b"\n".join(p for _, p in readings) + b"\n", "application/x-ndjson"
        name = self.route if single else f"{self.route} bulk"
        with self.client.post(self.paths[local], data=body.decode(), name=name, catch_response=True,
                              headers={**self.headers, "Content-Type": kind}) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            try:
                statuses = _statuses(response.text or "")
            except ValueError as exc:
                response.failure(f"unreadable answer: {exc}")
                return
            if len(statuses) != len(readings):
                response.failure(f"{len(statuses)} statuses for {len(readings)} readings")
                return
            refused = [s for s in statuses if s not in ("stored", "duplicate")]
            for (seq, _), status in zip(readings, statuses, strict=True):
                if status == "stored":
                    self.block.acklog.add(local, 0, seq)
                    self.block.stored += 1
                elif status == "duplicate":
                    self.block.duplicate += 1
            if refused:
                response.failure(f"not stored: {refused[0]}")

    def on_stop(self) -> None:
        if hasattr(self, "block"):
            for local, readings in sorted(self.buffered.items()):
                self._post(local, readings, single=False)
            self.buffered.clear()
            DEVICES.give_back(self.slot)


def _statuses(text: str) -> list[str]:
    """The status of each reading in a gateway answer: `{"status": ...}` for one reading, and for
    NDJSON either one JSON object a line or a JSON list (bare or under one key) of them."""
    text = text.strip()
    try:
        answer: Any = json.loads(text)
    except ValueError:
        answer = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(answer, dict) and "status" in answer:
        answer = [answer]
    elif isinstance(answer, dict):
        lists = [v for v in answer.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise ValueError("no list of statuses")
        answer = lists[0]
    if not isinstance(answer, list) or not all(isinstance(a, dict) for a in answer):
        raise ValueError("not a list of statuses")
    return [str(a.get("status")) for a in answer]


# --- the end-to-end probe -------------------------------------------------------------------------


class TelemetryProbeUser(User):
    """Reads the route's telemetry streams from the moment it starts: each entry's latency from
    its device time (`ts`) to its stream id (Redis's clock when stored); a seq a device skipped
    that is not stored `--probe-grace` seconds later is reported missing. Device and Redis clocks
    must agree (one machine, or NTP), and the last messages of a device cannot be missed yet."""

    fixed_count = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        self.options = LoadOptions.of(self.environment)
        settings = settings_of(self.options.config)
        self.route = route_of(settings).name
        r = settings.redis
        self.redis = connect_sync(r, decode_responses=True)
        self.cluster = r.cluster
        now_s, now_us = self.redis.time()
        start = f"{int(now_s) * 1000 + int(now_us) // 1000}-0"
        keys = Keys.of(r)
        self.after = dict.fromkeys(keys.telemetry_streams(self.route), start)
        self.last_seq: dict[str, int] = {}
        self.gaps: dict[tuple[str, int], float] = {}

    @task
    def read(self) -> None:
        # One XREAD of every shard stream on one Redis; one per shard's slot on a cluster.
        replies = xread_each(self.redis, self.after, count=1000, block_ms=500, cluster=self.cluster)
        now = time.time()
        for stream, entries in replies or []:
            for entry_id, fields in entries:
                self.after[stream] = entry_id
                self._seen(entry_id, fields, now)
        self._report_missing(time.monotonic())

    def _seen(self, entry_id: str, fields: dict[str, str], now: float) -> None:
        asset, seq, ts = fields.get("asset"), fields.get("seq", ""), fields.get("ts", "")
        if asset is None or not seq.isdigit():
            return
        number = int(seq)
        stored_ms = int(entry_id.split("-", 1)[0])
        try:
            latency_ms = max(0.0, stored_ms - float(ts) * 1000)
        except ValueError:
            return
        self.environment.events.request.fire(
            request_type="E2E", name=f"{self.route} stored", response_time=latency_ms,
            response_length=0, exception=None, context={},
        )  # fmt: skip
        last = self.last_seq.get(asset)
        if last is None or number > last:
            if last is not None:
                for missing in range(last + 1, min(number, last + 1 + MAX_GAPS)):
                    self._gap(asset, missing)
            self.last_seq[asset] = number
        else:
            self.gaps.pop((asset, number), None)

    def _gap(self, asset: str, seq: int) -> None:
        if len(self.gaps) >= MAX_GAPS:
            self._missing(asset, seq)
        else:
            self.gaps[(asset, seq)] = time.monotonic()

    def _report_missing(self, now: float) -> None:
        grace = self.options.probe_grace_s
        while self.gaps:
            (asset, seq), since = next(iter(self.gaps.items()))
            if now - since < grace:
                return
            del self.gaps[(asset, seq)]
            self._missing(asset, seq)

    def _missing(self, asset: str, seq: int) -> None:
        log.warning("not stored: %s seq %d", asset, seq)
        self.environment.events.request.fire(
            request_type="E2E", name=f"{self.route} missing",
            response_time=self.options.probe_grace_s * 1000, response_length=0,
            exception=LookupError(f"not stored within {self.options.probe_grace_s:g} s"),
            context={},
        )  # fmt: skip

    def on_stop(self) -> None:
        if hasattr(self, "redis"):
            self.redis.close()


# --- what was acknowledged ------------------------------------------------------------------------


@events.test_start.add_listener
def _reset(environment: Environment, **_: Any) -> None:
    DEVICES.reset_acks()


@events.test_stop.add_listener
def _write_acked(environment: Environment, **_: Any) -> None:
    """Each process that ran devices writes its own file; the audit reads them together."""
    path = str(getattr(environment.parsed_options, "acked", "") or "")
    if not path or not DEVICES.blocks:
        return
    options = LoadOptions.of(environment)
    settings = settings_of(options.config)
    route = route_of(settings)
    if isinstance(environment.runner, WorkerRunner):
        path = f"{path}.w{worker_index(environment)}"
    blocks = DEVICES.blocks.values()
    header = {"route": route.name, "topic": route.topic, "asset_level": route.asset_level,
              "assets": sum(b.fleet.count for b in blocks), "qos": options.qos,
              "seed": settings.simulator.seed, "prefix": settings.redis.key_prefix,
              "worker": worker_index(environment),
              "gateway_stored": sum(b.stored for b in blocks),
              "gateway_duplicate": sum(b.duplicate for b in blocks)}  # fmt: skip
    with Path(path).open("w", encoding="utf-8") as out:
        acked_file.write(out, header, DEVICES.records())
