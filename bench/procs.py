"""The processes of a benchmark subject: started, watched and stopped by PID, measured from outside.

A subject is `baseline` (bench/baseline.py), `bridge` (one `iotbridge bridge`) or `bridge2` (two
bridges in one shared subscription group), each configured through its command line or environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SHARED_GROUP = "bench"
# What `python -m bridge.cli bridge` imports from the repository.
PACKAGES = ("bridge", "config", "observability")

# The integration tests' server helpers, imported by name so that `mypy bench` checks bench only.
services = importlib.import_module("tests.services")
free_port, wait_until = services.free_port, services.wait_until
# User + system CPU of a process (all its threads), from /proc/<pid>/stat.
cpu_seconds = importlib.import_module("tests.faults").cpu_s


@dataclass
class Proc:
    """One process of a subject, started and stopped by PID, its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path = ROOT
    metrics_port: int | None = None  # a bridge: ready when /readyz answers 200
    client_id: str = ""  # a subject's MQTT client id: its session is cleared after the run
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0  # the baseline prints `ready` once per start

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited: {self.tail()}")
        if self.metrics_port is None:
            return self.log.read_text(errors="replace").count("ready") >= self.starts
        status, _ = services.http_get(self.metrics_port, "/readyz", 0.5)
        return bool(status == 200)

    def terminate(self) -> None:
        """One SIGTERM: a second one would make the bridge exit without draining."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 30) -> int | None:
        if self.popen is None:
            return None
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        return self.popen.returncode

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def snapshot_code(dest: Path) -> tuple[Path, str]:
    """Copy the packages a bridge imports, so that every process of the run runs the same code
    even while someone edits the working tree; (the copy, a short hash of its sources)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        for path in sorted((dest / package).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return dest, digest.hexdigest()[:12]


def subject_procs(
    subject: str, mqtt_url: str, redis_url: str, prefix: str, workdir: Path, code: Path,
    bridge_env: dict[str, str] | None = None,
) -> list[Proc]:  # fmt: skip
    """The subject's processes; a bridge runs from `code` (its working directory comes first on
    sys.path, before the editable install's finder)."""
    if subject == "baseline":
        client_id = f"{prefix}-0"
        argv = [sys.executable, str(BENCH / "baseline.py"), "--mqtt-url", mqtt_url,
                "--redis-url", redis_url, "--prefix", prefix, "--client-id", client_id]  # fmt: skip
        return [Proc("baseline", argv, dict(os.environ), workdir / f"{prefix}-0.log",
                     client_id=client_id)]  # fmt: skip
    count = {"bridge": 1, "bridge2": 2}[subject]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("IOTBRIDGE_")}
    procs = []
    for index in range(count):
        port = free_port()
        client_id = f"{prefix}-{index}"
        env = base_env | {
            "IOTBRIDGE_MQTT__URL": mqtt_url,
            "IOTBRIDGE_MQTT__PROTOCOL": "5",
            "IOTBRIDGE_MQTT__CLIENT_ID": client_id,
            "IOTBRIDGE_REDIS__URL": redis_url,
            "IOTBRIDGE_REDIS__KEY_PREFIX": prefix,
            "IOTBRIDGE_BRIDGE__METRICS_PORT": str(port),
            "IOTBRIDGE_LOGGING__LEVEL": "WARNING",
        }
        if count > 1:
            env["IOTBRIDGE_BRIDGE__SHARED_GROUP"] = SHARED_GROUP
        env |= bridge_env or {}
        argv = [sys.executable, "-m", "bridge.cli", "bridge"]
        log = workdir / f"{prefix}-{index}.log"
        procs.append(Proc(f"bridge-{index}", argv, env, log, cwd=code, metrics_port=port,
                          client_id=client_id))  # fmt: skip
    return procs


def start_all(procs: list[Proc]) -> None:
    for proc in procs:
        proc.starts += 1
        proc.start()


def wait_ready(procs: list[Proc], timeout_s: float = 60) -> None:
    wait_until(lambda: all(p.ready() for p in procs), timeout_s, "subject ready", poll_s=0.05)


def stop_all(procs: list[Proc]) -> list[int | None]:
    for proc in procs:
        proc.terminate()
    return [proc.wait() for proc in procs]


def counters(proc: Proc) -> dict[str, int]:
    """The bridge process's own account, from its /metrics: messages received, forwarded,
    rejected, duplicate, dropped (each summed over its labels)."""
    if proc.metrics_port is None:
        return {}
    status, text = services.http_get(proc.metrics_port, "/metrics", 2)
    if status != 200:
        return {}  # a diagnostic only: the stream itself is what the check counts
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("iotbridge_bridge_messages_") and "_total" in line:
            name = line.removeprefix("iotbridge_bridge_messages_").split("_total", 1)[0]
            totals[name] = totals.get(name, 0) + int(float(line.rsplit(" ", 1)[1]))
    return totals


def clear_session(host: str, port: int, client_id: str) -> None:
    """Connect with clean start and session expiry 0: the broker forgets the session and queue."""
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv5)
    client.on_connect = lambda *_: connected.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(host, port, clean_start=True, properties=props)
    client.loop_start()
    try:
        connected.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()


# A busy loop for `fraction` of every 10 ms, asleep for the rest, ended after `seconds` at most.
_HOG = """
import sys, time
fraction, end = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    started = time.monotonic()
    while time.monotonic() - started < 0.01 * fraction:
        pass
    time.sleep(0.01 * (1 - fraction))
"""


@contextlib.contextmanager
def cpu_hog(fraction: float, seconds: float) -> Iterator[None]:
    """A neighbour that keeps `fraction` of one core busy while the block runs (0: none)."""
    if fraction <= 0:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", _HOG, str(fraction), str(seconds)])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()
