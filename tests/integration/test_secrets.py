"""Secrets (the MQTT and Redis passwords) never appear in logs, metrics, dead letters, the process
command line or check-config's output, even when the servers refuse them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from config.settings import Settings
from tests.services import free_port, http_get, wait_until

pytestmark = pytest.mark.integration

MQTT_SECRET = "mqtt-Secret-7f3a9c"
REDIS_SECRET = "redis-Secret-2b8e4d"


def test_secrets_never_leave_the_process(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path
) -> None:
    settings = make_settings()
    port = free_port()
    env = {**os.environ, "IOTBRIDGE_MQTT__URL": settings.mqtt.url, "IOTBRIDGE_MQTT__PROTOCOL": settings.mqtt.protocol,
           "IOTBRIDGE_MQTT__CLIENT_ID": f"{unique}-s", "IOTBRIDGE_MQTT__USERNAME": "bridge",
           "IOTBRIDGE_MQTT__PASSWORD": MQTT_SECRET, "IOTBRIDGE_REDIS__URL": settings.redis.url,
           "IOTBRIDGE_REDIS__PASSWORD": REDIS_SECRET, "IOTBRIDGE_REDIS__KEY_PREFIX": unique,
           "IOTBRIDGE_BRIDGE__METRICS_PORT": str(port), "IOTBRIDGE_LOGGING__LEVEL": "DEBUG"}  # fmt: skip
    # The test servers accept any credentials: the secrets are sent, logged around and served.
    check = subprocess.run([sys.executable, "-m", "bridge.cli", "check-config"], env=env, capture_output=True,
                           text=True, timeout=60, check=False)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "bridge"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: http_get(port, "/healthz")[0] != 0, 20, "the bridge's HTTP server")
        wait_until(
            lambda: http_get(port, "/readyz")[1] == "ready\n" or proc.poll() is not None,
            20,
            "the bridge ready",
        )
        metrics = http_get(port, "/metrics")[1]
        readyz = http_get(port, "/readyz")[1]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        proc.kill()
    output = _peek(tmp_path, proc)
    if proc.stdout is not None:
        proc.stdout.close()
    with redis.Redis.from_url(settings.redis.url) as db:
        letters = db.xrange(f"{unique}:dlq")
    for where, text in {"check-config": check.stdout + check.stderr, "log": output,
                        "/metrics": metrics, "/readyz": readyz, "command line": cmdline,
                        "dead letters": repr(letters)}.items():  # fmt: skip
        assert MQTT_SECRET not in text, f"MQTT password in {where}"
        assert REDIS_SECRET not in text, f"Redis password in {where}"
    assert check.returncode == 0
    assert "mqtt connected" in output


_seen: dict[int, str] = {}


def _peek(tmp_path: Path, proc: subprocess.Popen[bytes]) -> str:
    """What the process logged so far (read without blocking)."""
    if proc.stdout is None:
        return ""
    if proc.stdout.closed:
        return _seen.get(proc.pid, "")
    os.set_blocking(proc.stdout.fileno(), False)
    chunk = proc.stdout.read() or b""
    _seen[proc.pid] = _seen.get(proc.pid, "") + chunk.decode(errors="replace")
    return _seen[proc.pid]
