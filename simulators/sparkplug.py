"""The simulator's Sparkplug B mode (`simulator.protocol: sparkplug`): edge nodes with devices.

Each connection is one edge node `spBv1.0/<sparkplug_group>/.../node<NNN>` and each asset of it a
device named by its asset id; the asset the host writes is then `<group>.node<NNN>.<asset id>`.
The readings, the schedule and the injections are the JSON fleet's (`Fleet`, `Injector`), so a
scenario replays the same anomalies; only the wire differs:

- NBIRTH (seq 0, bdSeq, `Node Control/Rebirth`) and a DBIRTH per device declare every metric with
  an alias (the value's position + 1), Double; DDATA then carries aliases only. One seq per node
  over all its messages, 0-255 and wrapping. The Will is an NDEATH with the connection's bdSeq; a
  clean end publishes it before DISCONNECT.
- An NCMD `Node Control/Rebirth` = true is answered with NBIRTH and the DBIRTHs of the devices
  online, carrying their last readings.
- Injections: a dropout takes its device offline (DDEATH) for the window and back with a DBIRTH;
  a restart is a rebirth of its node; out-of-order swaps the seqs of two consecutive messages of a
  node; a duplicate repeats a message (the host then asks for a rebirth); malformed sends half a
  payload, wrong_type a value in the wrong protobuf field, oversized a payload past the bridge's
  limit; clock_skew moves the metric timestamps. Spikes, drifts, stuck and out-of-range values
  change the readings as in JSON mode.

Ground truth names the Sparkplug asset, and its times are whole milliseconds (Sparkplug's
resolution) wide enough to hold the first and last message. QoS 0, as Sparkplug DATA is: there is
no acknowledged set to audit (`--acked` gets a header and no record).
"""

from __future__ import annotations

import heapq
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bridge.sparkplug import names
from bridge.sparkplug.payload import DataType, OutMetric, decode, encode
from bridge.sparkplug.publish import REBIRTH_METRIC
from config.settings import Settings
from simulators.engine import LATE_GRACE_S, PROGRESS_S, Emit, ShardSpec
from simulators.fleet import Fleet, asset_id, asset_index
from simulators.injection import Injector, Message
from simulators.scenario import Event
from simulators.stats import PublishStats

log = logging.getLogger(__name__)

HOUSEKEEPING_S = 0.05
SEQ_MODULUS = 256


def node_name(node: int) -> str:
    return f"node{node + 1:03d}"


@dataclass(slots=True)
class EdgeNode:
    """One simulated edge node: its connection, seq, bdSeq and the state of its devices."""

    index: int
    devices: list[int]  # local asset numbers
    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    seq: int = 0
    bd_seq: int = 0
    offline: set[int] = field(default_factory=set)  # devices taken offline (DDEATH)
    held: tuple[str, bytes] | None = None  # a message sent after the node's next (out of order)


class SparkplugEngine:
    """Same interface as `simulators.engine.Engine`: `run()` on a thread, `start`, `stop`."""

    def __init__(self, settings: Settings, spec: ShardSpec, events: list[Event], emit: Emit):
        self.settings, self.spec, self._emit = settings, spec, emit
        self._events = events
        sim = settings.simulator
        self.group = sim.sparkplug_group
        self.stats = PublishStats(seed=spec.shard)
        self._halt = threading.Event()
        self._started = threading.Event()
        self._start_wall = 0.0
        self._rebirths: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.nodes: list[EdgeNode] = []
        self.last: dict[int, list[float]] = {}  # each device's last readings
        self.elapsed_s = 0.0
        self._progress_at = 0.0

    # --- control, from any thread -----------------------------------------------------------------

    def start(self, at_wall: float) -> None:
        self._start_wall = at_wall
        self._started.set()

    def stop(self) -> None:
        self._halt.set()
        self._started.set()

    # --- names ------------------------------------------------------------------------------------

    def asset(self, index: int) -> str:
        """The asset the host writes for fleet asset `index`."""
        node = index // self.settings.simulator.assets_per_connection
        return names.asset_id(self.group, node_name(node), asset_id(index))

    def _topic(self, node: EdgeNode, kind: str, local: int | None = None) -> str:
        tail = "" if local is None else f"/{asset_id(self.spec.first + local)}"
        return f"spBv1.0/{self.group}/{kind}/{node_name(node.index)}{tail}"

    def _value_names(self, local: int) -> list[str]:
        return [model.name for model in self.fleet.asset_class(local).values]

    # --- the thread -------------------------------------------------------------------------------

    def run(self) -> None:
        sim, spec = self.settings.simulator, self.spec
        self.fleet = Fleet(sim, self.settings.bridge.routes[0], spec.first, spec.count)
        self.injector = Injector(self.fleet, self._events, self._truth)
        self.stats.anomalies = self.injector.counts
        apc = sim.assets_per_connection
        first_node = spec.first // apc
        for j in range(-(-spec.count // apc)):
            devices = list(range(j * apc, min(spec.count, (j + 1) * apc)))
            self.nodes.append(EdgeNode(first_node + j, devices, self._client(first_node + j)))
        try:
            self._connect_all()
            self._emit({"type": "ready", "connected": self._connected(),
                        "connections": len(self.nodes)})  # fmt: skip
            self._started.wait()
            if not self._halt.is_set():
                self._publish_schedule()
        except Exception:
            log.exception("sparkplug simulator failed", extra={"shard": spec.shard})
            raise
        finally:
            self._close()
            self.injector.finish(self.elapsed_s, final=True)
            self._emit(self._final())

    def _client(self, node: int) -> mqtt.Client:
        sim = self.settings.simulator
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{sim.client_id_prefix}-spb-{node_name(node)}",
            protocol=mqtt.MQTTv5 if self.settings.mqtt.protocol == "5" else mqtt.MQTTv311,
        )
        if self.settings.mqtt.username:
            password = self.settings.mqtt.password
            client.username_pw_set(
                self.settings.mqtt.username, password.get_secret_value() if password else None
            )
        client.max_queued_messages_set(0)
        return client

    def _connect_all(self) -> None:
        m = self.settings.mqtt
        for node in self.nodes:
            will = encode(None, None, [OutMetric("bdSeq", DataType.INT64, node.bd_seq)])
            node.client.will_set(self._topic(node, "NDEATH"), will, qos=1, retain=False)
            node.client.on_connect = self._on_connect(node)
            node.client.on_message = self._on_command(node)
            node.client.connect(m.host, m.port, m.keepalive_s)
            node.client.loop_start()
        deadline = time.monotonic() + m.connect_timeout_s
        for node in self.nodes:
            node.connected.wait(max(0.0, deadline - time.monotonic()))

    def _on_connect(self, node: EdgeNode) -> Any:
        def connected(client: mqtt.Client, *_: Any) -> None:
            client.subscribe(f"spBv1.0/{self.group}/NCMD/{node_name(node.index)}", qos=0)
            node.connected.set()

        return connected

    def _on_command(self, node: EdgeNode) -> Any:
        def command(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            try:
                payload = decode(bytes(message.payload))
            except ValueError:
                return
            if any(m.name == REBIRTH_METRIC and m.raw is True for m in payload.metrics):
                self._rebirths.put(node.index)  # answered on the engine thread

        return command

    def _connected(self) -> int:
        return sum(1 for node in self.nodes if node.connected.is_set())

    def _publish_schedule(self) -> None:
        sim = self.settings.simulator
        per_asset = self.fleet.per_asset(sim.duration_s)
        t0 = time.monotonic() + (self._start_wall - time.time())
        for node in self.nodes:
            self._birth(node, {local: self.fleet.values(local, 0) for local in node.devices})
        due = [(self.fleet.due_s(local, 0), local, 0) for local in range(self.fleet.count)]
        heapq.heapify(due)
        next_housekeeping = 0.0
        while due and not self._halt.is_set():
            elapsed = time.monotonic() - t0
            if elapsed > sim.duration_s + LATE_GRACE_S:
                break
            while due and due[0][0] <= elapsed:
                _, local, k = heapq.heappop(due)
                self._message(local, k)
                if k + 1 < per_asset:
                    heapq.heappush(due, (self.fleet.due_s(local, k + 1), local, k + 1))
            self._answer_rebirths()
            now = time.monotonic()
            if now >= next_housekeeping:
                self.injector.finish(now - t0)
                self._progress_maybe(now)
                next_housekeeping = now + HOUSEKEEPING_S
            wait = (due[0][0] - (time.monotonic() - t0)) if due else 0.0
            self._halt.wait(min(HOUSEKEEPING_S, max(0.0, wait)))
        self.stats.skip("stopped" if self._halt.is_set() else "behind_schedule", len(due))
        while not self._halt.is_set() and time.monotonic() - t0 < sim.duration_s:
            self._answer_rebirths()
            self._halt.wait(HOUSEKEEPING_S)
        self.elapsed_s = time.monotonic() - t0

    # --- messages ---------------------------------------------------------------------------------

    def _send(self, node: EdgeNode, topic: str, data: bytes) -> None:
        node.client.publish(topic, data, qos=0)

    def _next_seq(self, node: EdgeNode) -> int:
        seq = node.seq
        node.seq = (seq + 1) % SEQ_MODULUS
        return seq

    def _metrics(self, local: int, values: list[float], ts_ms: int, birth: bool) -> list[OutMetric]:
        labels = self._value_names(local) if birth else [None] * len(values)
        return [OutMetric(label, DataType.DOUBLE, value, alias=v + 1, timestamp_ms=ts_ms)
                for v, (label, value) in enumerate(zip(labels, values, strict=True))]  # fmt: skip

    def _birth(self, node: EdgeNode, readings: dict[int, list[float]]) -> None:
        """NBIRTH (seq 0) and the DBIRTH of every device online."""
        self._release_held(node)  # sent under the session it was numbered in
        now_ms = round(time.time() * 1000)
        node.seq = 0
        metrics = [OutMetric("bdSeq", DataType.INT64, node.bd_seq, timestamp_ms=now_ms),
                   OutMetric(REBIRTH_METRIC, DataType.BOOLEAN, False, timestamp_ms=now_ms)]  # fmt: skip
        self._send(node, self._topic(node, "NBIRTH"), encode(now_ms, self._next_seq(node), metrics))
        for local, values in readings.items():
            if local not in node.offline:
                self._device_birth(node, local, values, now_ms)

    def _device_birth(self, node: EdgeNode, local: int, values: list[float], ts_ms: int) -> None:
        self.last[local] = values
        data = encode(ts_ms, self._next_seq(node), self._metrics(local, values, ts_ms, birth=True))
        self._send(node, self._topic(node, "DBIRTH", local), data)

    def _answer_rebirths(self) -> None:
        while True:
            try:
                index = self._rebirths.get_nowait()
            except queue.Empty:
                return
            node = next(n for n in self.nodes if n.index == index)
            self._birth(node, {local: self.last.get(local, self.fleet.values(local, 0))
                               for local in node.devices})  # fmt: skip

    def _message(self, local: int, k: int) -> None:
        """Message k of a device, with whatever is injected into it."""
        node = self.nodes[local // self.settings.simulator.assets_per_connection]
        wall = round(time.time() * 1000) / 1000
        values = self.fleet.values(local, k)
        m = (self.injector.apply(local, k, wall, values) if local in self.injector.by_asset
             else Message(wall, 0, k))  # fmt: skip
        if m.silenced:
            self.stats.skip("silenced")
            if local not in node.offline:
                node.offline.add(local)
                ts_ms = round(m.ts * 1000)
                self._send(node, self._topic(node, "DDEATH", local),
                           encode(ts_ms, self._next_seq(node), []))  # fmt: skip
            return
        ts_ms = round(m.ts * 1000)
        if m.restarted:
            self.stats.fault("restart")
            self._birth(node, {d: self.last.get(d, self.fleet.values(d, k)) for d in node.devices})
        if local in node.offline:  # back from a dropout: the device's birth carries the readings
            node.offline.discard(local)
            self._device_birth(node, local, values, ts_ms)
            self.stats.sent += 1
            return
        self.last[local] = values
        topic = self._topic(node, "DDATA", local)
        data = encode(ts_ms, self._next_seq(node), self._metrics(local, values, ts_ms, birth=False))
        if m.bad:
            self.stats.fault("clock_skew")
        self.stats.sent += 1
        if m.hold:
            self.stats.fault("out_of_order")
            self._release_held(node)
            node.held = (topic, data)
            return
        self._send(node, topic, data)
        self._release_held(node)
        if m.duplicate:
            self.stats.fault("duplicate")
            self._extra(node, topic, data)
        for kind in m.extras:
            self.stats.fault(kind)
            self._extra(node, topic, self._bad(kind, node, local, data, ts_ms))

    def _release_held(self, node: EdgeNode) -> None:
        if node.held is not None:
            held, node.held = node.held, None
            self._send(node, *held)

    def _extra(self, node: EdgeNode, topic: str, data: bytes) -> None:
        self.stats.extras_sent += 1
        self._send(node, topic, data)

    def _bad(self, kind: str, node: EdgeNode, local: int, data: bytes, ts_ms: int) -> bytes:
        if kind == "malformed":
            return data[: len(data) // 2]  # cut mid-message: no seq, or not protobuf at all
        if kind == "wrong_type":  # a Double sent as a string: the host refuses the metric
            metric = OutMetric(None, DataType.STRING, "hot", alias=1, timestamp_ms=ts_ms)
            return encode(ts_ms, self._next_seq(node), [metric])
        # oversized: past bridge.max_payload_bytes, without a seq (the host never reads it)
        blob = "x" * (self.settings.bridge.max_payload_bytes + 1024)
        return encode(ts_ms, None, [OutMetric("blob", DataType.STRING, blob, timestamp_ms=ts_ms)])

    # --- the end ----------------------------------------------------------------------------------

    def _truth(self, record: dict[str, Any]) -> None:
        index = asset_index(record["asset"])
        if index is not None:
            record["asset"] = self.asset(index)
        # Sparkplug timestamps are whole milliseconds: the window holds the messages it names.
        if record.get("start") is not None:
            record["start"] = math.floor(record["start"] * 1000) / 1000
        if record.get("end") is not None:
            record["end"] = math.ceil(record["end"] * 1000) / 1000
        self._emit({"type": "truth", "record": record})

    def _close(self) -> None:
        """A clean end: NDEATH with the connection's bdSeq, then DISCONNECT."""
        for node in self.nodes:
            self._release_held(node)
            if node.connected.is_set():
                death = encode(None, None, [OutMetric("bdSeq", DataType.INT64, node.bd_seq)])
                node.client.publish(self._topic(node, "NDEATH"), death, qos=1).wait_for_publish(2)
            node.client.disconnect()
            node.client.loop_stop()
            node.client._reset_sockets()

    def _progress(self) -> dict[str, Any]:
        return {"type": "progress", "connected": self._connected(), **self.stats.snapshot()}

    def _progress_maybe(self, now: float) -> None:
        if now - self._progress_at >= PROGRESS_S:
            self._progress_at = now
            self._emit(self._progress())

    def _final(self) -> dict[str, Any]:
        if self.spec.acked_part is not None:
            with open(self.spec.acked_part, "w", encoding="utf-8"):
                pass  # QoS 0: nothing acknowledged to audit
        return {**self._progress(), "type": "final", "connected": 0,
                "sent_in_schedule": self.stats.sent, "elapsed_s": self.elapsed_s,
                "latencies": []}  # fmt: skip
