"""Helpers of the fault tests: the bridge as a real process, brokers and Redis with the settings a
fault needs, and publishers that remember what the broker acknowledged (for `simulators.audit`).

Run as a module it is the flooding publisher of the rate-limit test (a process of its own, so the
flood does not share the test's interpreter): `python -m tests.faults flood URL TOPIC SECONDS MAX`
publishes QoS 1 telemetry as fast as paho goes and prints a JSON line of what was acknowledged.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simulators.audit import Pair, SeqSet, read_stream
from tests.services import (
    Service,
    free_port,
    http_get,
    metric_total,
    mosquitto_service,
    redis_service,
    require,
    scrape,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
TOPIC = "plant/s1/l1/{asset}/telemetry"  # the shipped default route, on a broker of the test's own
ASSET_LEVEL = 3
CLOCK_TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def topic(asset: str) -> str:
    return TOPIC.format(asset=asset)


def payload(seq: int, ts: float | None = None) -> bytes:
    ts = time.time() if ts is None else ts
    return (
        f'{{"ts": {ts!r}, "seq": {seq}, "values": {{"temperature": {50 + seq % 40}.5, '
        f'"vibration": {seq % 7}.25}}}}'
    ).encode()


# --- servers --------------------------------------------------------------------------------------


def mosquitto(workdir: Path, *conf: str, port: int | None = None) -> Service:
    """A mosquitto of the test's own. Only the given lines beyond the listener: no
    `max_queued_messages` unless asked for, so mosquitto's default (1,000) applies."""
    extra = "".join(f"{line}\n" for line in conf)
    return require(mosquitto_service(workdir, port, extra, tuned=False), "mosquitto")


def redis(workdir: Path, *extra: str) -> Service:
    """A redis-server of the test's own, its files in `workdir` (its --dir)."""
    return require(redis_service(workdir, None, *extra), "redis-server")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * CLOCK_TICK_S


def cpu_wait_s(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a CPU (schedstat run delay):
    how much a busy machine held it back."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def cont_and_stop(service: Service) -> None:
    """Teardown: a stopped (SIGSTOP) server cannot act on SIGTERM, so continue it first."""
    service.signal(signal.SIGCONT)
    service.stop()


# --- the bridge as a process ----------------------------------------------------------------------


class Bridge:
    """`python -m bridge.cli bridge`, configured by environment, with its /metrics read back."""

    def __init__(
        self,
        workdir: Path,
        *,
        mqtt_url: str,
        redis_url: str,
        name: str,
        protocol: str = "5",
        spool_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.name = name
        self.env = {
            "IOTBRIDGE_MQTT__URL": mqtt_url,
            "IOTBRIDGE_MQTT__PROTOCOL": protocol,
            "IOTBRIDGE_MQTT__CLIENT_ID": f"{name}-bridge",  # fixed: the session survives restarts
            "IOTBRIDGE_REDIS__URL": redis_url,
            "IOTBRIDGE_REDIS__KEY_PREFIX": name,
            "IOTBRIDGE_REDIS__SOCKET_TIMEOUT_S": "0.5",
            "IOTBRIDGE_REDIS__CONNECT_TIMEOUT_S": "0.5",
            "IOTBRIDGE_BACKOFF__MAX_S": "1",
            "IOTBRIDGE_BRIDGE__METRICS_PORT": str(self.port),
            **({"IOTBRIDGE_BRIDGE__SPOOL__DIR": str(spool_dir)} if spool_dir else {}),
            **(env or {}),
        }
        argv = [sys.executable, "-m", "bridge.cli", "bridge"]
        self.service = Service("bridge", argv, self.port, workdir, self.env)
        self.starts = 0

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.service.proc

    @property
    def pid(self) -> int:
        return self.service.pid

    @property
    def log_path(self) -> Path:
        return self.service.log_path

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ready_timeout_s: float = 30) -> Bridge:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts}\n".encode())
        self.service.start(ready_timeout_s)  # its HTTP server is up: then wait for /readyz
        self.wait_ready(ready_timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 30) -> None:
        try:
            wait_until(lambda: self.ready() or not self.alive, timeout_s, "the bridge's /readyz")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tail()}") from None
        assert self.alive, (
            f"the bridge exited with {self.proc and self.proc.returncode}:\n{self.tail()}"
        )

    def ready(self) -> bool:
        return http_get(self.port, "/readyz")[0] == 200

    def metrics(self) -> dict[str, float]:
        return scrape(self.port)

    def total(self, name: str, metrics: dict[str, float] | None = None) -> float:
        """A metric summed over all its label sets."""
        return metric_total(self.metrics() if metrics is None else metrics, name)

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.service.kill()

    def terminate(self, timeout_s: float = 20) -> int | None:
        """SIGTERM, and its exit code (killed after `timeout_s`)."""
        return self.service.stop(timeout_s)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def tail(self, lines: int = 30) -> str:
        return self.service.tail(lines)

    def close(self) -> None:
        self.service.stop(15)


# --- publishers -----------------------------------------------------------------------------------


class TrackedPublisher:
    """A QoS 1 paho publisher on its own network thread that remembers, per message, whether the
    broker acknowledged it: `acked_set()` is what the audit checks the streams against.

    paho queues publishes made while the broker is away (no queue bound here) and resends the
    unacknowledged ones when it reconnects, so a broker restart loses nothing on this side.
    """

    def __init__(
        self,
        url: str,
        client_id: str,
        protocol: str = "5",
        max_inflight: int = 1000,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        v5 = protocol == "5"
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
        )
        if credentials is not None:
            self.client.username_pw_set(*credentials)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 2)
        self._lock = threading.Lock()
        self._ack_count = 0
        self.client.on_publish = self._on_publish
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 600
        self.client.connect(
            parts.hostname or "127.0.0.1", parts.port or 1883, 30, properties=properties
        )
        self.client.loop_start()
        self.sent: list[tuple[Pair | None, mqtt.MQTTMessageInfo]] = []

    def _on_publish(self, *_args: Any) -> None:
        with self._lock:
            self._ack_count += 1

    @property
    def acked(self) -> int:
        """PUBACKs received so far (a live count; `acked_set()` is the exact answer)."""
        with self._lock:
            return self._ack_count

    def publish(self, topic: str, body: bytes, pair: Pair | None = None) -> None:
        self.sent.append((pair, self.client.publish(topic, body, qos=1)))

    def wait_acked(self, timeout_s: float) -> int:
        """Wait (bounded) for every PUBACK; returns how many came."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(_acked(i) for _, i in self.sent):
            time.sleep(0.05)
        return sum(1 for _, info in self.sent if _acked(info))

    def acked_set(self) -> SeqSet:
        return SeqSet.of(pair for pair, info in self.sent if pair and _acked(info))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _acked(info: mqtt.MQTTMessageInfo) -> bool:
    # paho leaves rc at MQTT_ERR_NO_CONN on a message published while the broker was away, even
    # after it sent it on reconnect and got its PUBACK; is_published() then raises. The flag it
    # sets on PUBACK is the answer.
    return bool(info._published)


class PacedRun(threading.Thread):
    """Publishes a plan of (asset, seq) at `rate_hz` on a background thread, each payload stamped
    with the wall time it is handed to paho. Bounded in count (the plan) and time (`max_s`)."""

    def __init__(
        self,
        publisher: TrackedPublisher,
        plan: Sequence[Pair],
        rate_hz: float,
        max_s: float,
        body: Callable[[int], bytes] = payload,
        topic_of: Callable[[str], str] = topic,
    ) -> None:
        super().__init__(name="paced-publisher", daemon=True)
        self.publisher = publisher
        self.plan = plan
        self.rate_hz = rate_hz
        self.max_s = max_s
        self.body = body
        self.topic_of = topic_of
        self.published = 0
        self.error: Exception | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while self.published < len(self.plan) and not self._stop_event.is_set():
                now = time.monotonic()
                if now - started > self.max_s:
                    return
                due = min(len(self.plan), int((now - started) * self.rate_hz) + 1)
                while self.published < due:
                    asset, seq = self.plan[self.published]
                    self.publisher.publish(self.topic_of(asset), self.body(seq), (asset, seq))
                    self.published += 1
                self._stop_event.wait(0.005)
        except Exception as exc:  # noqa: BLE001 -- handed to the test thread by finish()
            self.error = exc

    def finish(self, timeout_s: float) -> int:
        """Wait for the plan to be published (bounded); returns how many were."""
        self.join(timeout_s)
        self._stop_event.set()
        self.join(5)
        if self.error is not None:
            raise self.error
        return self.published


def rows(client: Any, key: str) -> list[tuple[str, dict[str, bytes]]]:
    """A stream's entries (via `simulators.audit.read_stream`) with str ids and field names; the
    values stay bytes (a dead letter's payload need not be UTF-8)."""
    out = []
    for entry_id, fields in read_stream(client, key):
        fid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        out.append(
            (fid, {_str(k): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()})
        )
    return out


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def plan(assets: int, per_asset: int, prefix: str = "a") -> list[Pair]:
    """Round-robin over the assets, each numbering its messages from 0."""
    return [(f"{prefix}{a}", seq) for seq in range(per_asset) for a in range(assets)]


# --- the flooding publisher process ---------------------------------------------------------------


def flood(url: str, flood_topic: str, seconds: float, limit: int) -> dict[str, Any]:
    """Publish QoS 1 on one topic as fast as paho goes, for `seconds` or `limit` messages; the
    rate is measured up to the last PUBACK, so it is the rate the broker took them at."""
    parts = urlsplit(url)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"flood-{os.getpid()}",
        protocol=mqtt.MQTTv311,
    )
    # No in-flight bound (paho's bookkeeping per PUBACK grows with it) and the limit below the
    # 16-bit packet-id space, so no id is reused while still unacknowledged.
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    limit = min(limit, 60_000)
    last_ack = [0.0]

    def on_publish(*_args: Any) -> None:
        last_ack[0] = time.monotonic()

    client.on_publish = on_publish
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    infos: list[mqtt.MQTTMessageInfo] = []
    started = time.monotonic()
    full = 0
    while len(infos) < limit and time.monotonic() - started < seconds:
        info = client.publish(flood_topic, payload(len(infos)), qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            full += 1
            time.sleep(0.001)
            continue
        infos.append(info)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(_acked(i) for i in infos):
        time.sleep(0.05)
    unacked = [seq for seq, info in enumerate(infos) if not _acked(info)]
    client.disconnect()
    client.loop_stop()
    span = max(last_ack[0] - started, 1e-9)
    return {"published": len(infos), "seconds": span, "rate": (len(infos) - len(unacked)) / span,
            "unacked": unacked, "queue_full": full}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "flood":
        result = flood(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stderr.write("usage: python -m tests.faults flood URL TOPIC SECONDS MAX\n")
        sys.exit(2)
