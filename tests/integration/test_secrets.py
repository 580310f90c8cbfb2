"""Secrets (the MQTT and Redis passwords, the contents of key files) never appear in logs, metrics,
dead letters, the process command line or check-config's output, even when the servers refuse
them."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from config.settings import Settings
from tests.faults import ROOT
from tests.faults import redis as own_redis
from tests.services import free_port, http_get, mosquitto_service, require, wait_until

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


def _pem_body(path: Path) -> str:
    """A line from the middle of a PEM key: what would show if the file's contents leaked."""
    return path.read_text().splitlines()[5]


def test_key_files_contents_never_leave_the_process(tmp_path: Path, unique: str) -> None:
    """The bridge with every key file in use: the MQTT client key (mutual TLS to the broker), the
    Redis client key (rediss://) and the metrics server's key (HTTPS), logging at DEBUG."""
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(ROOT / "broker" / "make-dev-certs.sh"), str(certs), "bridge"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    tls_conf = (f"cafile {certs / 'ca.crt'}\ncertfile {certs / 'server.crt'}\n"
                f"keyfile {certs / 'server.key'}\nrequire_certificate true\n")  # fmt: skip
    broker = require(mosquitto_service(tmp_path / "mosquitto", extra_conf=tls_conf), "mosquitto")
    redis_port = free_port()
    db = own_redis(tmp_path / "redis", "--port", "0", "--tls-port", str(redis_port),
                   "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file",
                   str(certs / "server.key"), "--tls-ca-cert-file", str(certs / "ca.crt"))  # fmt: skip
    db.port = redis_port  # its only port, which start() waits for
    client_tls = {"ca_file": str(certs / "ca.crt"), "cert_file": str(certs / "bridge.crt"),
                  "key_file": str(certs / "bridge.key")}  # fmt: skip
    port = free_port()
    env = {**os.environ, "IOTBRIDGE_MQTT__URL": f"mqtts://localhost:{broker.port}",
           "IOTBRIDGE_MQTT__TLS": json.dumps(client_tls), "IOTBRIDGE_MQTT__CLIENT_ID": f"{unique}-k",
           "IOTBRIDGE_REDIS__URL": f"rediss://localhost:{redis_port}/0",
           "IOTBRIDGE_REDIS__TLS": json.dumps(client_tls), "IOTBRIDGE_REDIS__KEY_PREFIX": unique,
           "IOTBRIDGE_HTTP__TLS": json.dumps({"cert_file": str(certs / "server.crt"),
                                              "key_file": str(certs / "server.key")}),
           "IOTBRIDGE_BRIDGE__METRICS_PORT": str(port), "IOTBRIDGE_LOGGING__LEVEL": "DEBUG"}  # fmt: skip
    secrets = {name: _pem_body(certs / f"{name}.key") for name in ("bridge", "server", "ca")}
    https = ssl.create_default_context(cafile=str(certs / "ca.crt"))

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"https://localhost:{port}{path}", timeout=2,
                                        context=https) as response:  # fmt: skip
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    broker.start()
    db.start()
    check = subprocess.run([sys.executable, "-m", "bridge.cli", "check-config"], env=env,
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "bridge"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: get("/readyz") == (200, "ready\n") or proc.poll() is not None, 30,
                   "the bridge ready over TLS on both links")  # fmt: skip
        # One dead letter, sent over the broker's TLS port with the same client certificate.
        subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(broker.port), "-q", "1",
                        "--cafile", str(certs / "ca.crt"), "--cert", str(certs / "bridge.crt"),
                        "--key", str(certs / "bridge.key"), "-t", "plant/s1/l1/a1/telemetry",
                        "-m", "{not json"], check=True, timeout=10)  # fmt: skip
        admin = redis.Redis(host="localhost", port=redis_port, ssl=True, decode_responses=True,
                            ssl_ca_certs=str(certs / "ca.crt"), ssl_certfile=str(certs / "bridge.crt"),
                            ssl_keyfile=str(certs / "bridge.key"))  # fmt: skip
        wait_until(lambda: admin.xlen(f"{unique}:dlq") == 1, 20, "the dead letter")
        letters = admin.xrange(f"{unique}:dlq")
        admin.close()
        metrics, readyz = get("/metrics")[1], get("/readyz")[1]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        broker.stop()
        db.stop()
    output = _peek(tmp_path, proc)
    if proc.stdout is not None:
        proc.stdout.close()
    assert check.returncode == 0, check.stdout + check.stderr
    assert "mqtt connected" in output
    assert "iotbridge_bridge_messages_received_total" in metrics
    for where, text in {"check-config": check.stdout + check.stderr, "log": output,
                        "/metrics": metrics, "/readyz": readyz, "command line": cmdline,
                        "dead letters": repr(letters)}.items():  # fmt: skip
        for name, line in secrets.items():
            assert line not in text, f"the contents of {name}.key in {where}"
