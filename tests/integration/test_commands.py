"""Every long-running command: serves /metrics (promtool-clean), /healthz and /readyz, logs JSON
lines with --log-format json, and exits 0 within its grace period on SIGTERM and SIGINT."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from config.settings import Settings
from tests.services import REQUIRE_SERVICES, free_port, http_get, wait_until

pytestmark = pytest.mark.integration

COMMANDS = {
    "bridge": ["bridge"],
    "worker": ["worker"],
    "simulate": ["simulate", "--assets", "20", "--rate", "1", "--duration", "600"],
    "broker": ["broker"],
}


def _promtool() -> str | None:
    found = shutil.which("promtool")
    if found is None and REQUIRE_SERVICES:
        pytest.fail("promtool (Debian package prometheus) is not installed")
    return found


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_command_serves_health_and_metrics_logs_json_and_stops_cleanly(
    make_settings: Callable[..., Settings], unique: str, command: str, signum: int
) -> None:
    settings = make_settings()
    port = free_port()
    section = {"simulate": "SIMULATOR"}.get(command, command.upper())
    env = {
        **os.environ,
        "IOTBRIDGE_MQTT__URL": settings.mqtt.url,
        "IOTBRIDGE_MQTT__PROTOCOL": settings.mqtt.protocol,
        "IOTBRIDGE_MQTT__CLIENT_ID": f"{unique}-cli",
        "IOTBRIDGE_REDIS__URL": settings.redis.url,
        "IOTBRIDGE_REDIS__KEY_PREFIX": unique,
        "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": unique,
        f"IOTBRIDGE_{section}__METRICS_PORT": str(port),
        "IOTBRIDGE_BROKER__PORT": str(free_port()),
    }
    argv = [sys.executable, "-m", "bridge.cli", *COMMANDS[command], "--log-format", "json"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(
            lambda: http_get(port, "/readyz")[0] == 200 or proc.poll() is not None,
            20,
            f"{command} ready",
        )
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert http_get(port, "/healthz")[0] == 200
        status, metrics = http_get(port, "/metrics")
        assert status == 200
        assert "iotbridge_build_info{" in metrics
        component = {"simulate": "simulator"}.get(command, command)
        assert f'iotbridge_ready{{component="{component}"}} 1.0' in metrics
        if promtool := _promtool():
            check = subprocess.run([promtool, "check", "metrics"], input=metrics, capture_output=True,
                                   text=True, timeout=30, check=False)  # fmt: skip
            assert check.returncode == 0, check.stdout + check.stderr
        assert http_get(port, "/nope")[0] == 404
        proc.send_signal(signum)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        out, err = proc.communicate()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert lines, "no log lines"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records)
    assert any("received, stopping" in r["msg"] for r in records)
    if command == "simulate":
        report = json.loads(out.decode().strip().splitlines()[-1])
        assert report["sent"] == report["acked"] + report["failed"]
