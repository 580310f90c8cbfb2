"""Redis over TLS with client certificates (`rediss://` and `redis.tls`): a real redis-server with
only a TLS port and `--tls-auth-clients yes`, certificates made by broker/make-dev-certs.sh. The
bridge writes through it, a worker consumes through it, `audit` and `check-config` read it, and a
client without a certificate is refused without bringing the bridge down."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis as AsyncRedis

from bridge.app import BridgeApp
from config.keys import Keys
from config.settings import Settings
from simulators import acked
from tests.clients import Publisher, running_bridge, sample, telemetry, wait_for
from tests.faults import redis as own_redis
from tests.integration.test_worker import THRESHOLDS_ONLY, all_acked, eventually, running
from tests.integration.test_worker import telemetry as entry
from tests.services import Service, free_port
from workers.app import WorkerApp

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "broker" / "make-dev-certs.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run(["sh", str(SCRIPT), str(directory), "bridge", "worker"], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    return directory


@pytest.fixture(scope="module")
def tls_redis(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """redis-server with its plain port off and a TLS port that requires a client certificate."""
    port = free_port()
    service = own_redis(
        tmp_path_factory.mktemp("redis-tls"),
        "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes",
    )  # fmt: skip
    service.port = port  # the one port it listens on, which start() waits for
    service.start()
    yield service
    service.stop()


def tls(certs: Path, client: str | None) -> dict[str, Any]:
    return {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / f"{client}.crt") if client else None,
        "key_file": str(certs / f"{client}.key") if client else None,
    }


def url(service: Service) -> str:
    return f"rediss://localhost:{service.port}/0"


def admin(service: Service, certs: Path) -> redis.Redis:
    """A TLS client of the test's own, to look at what was written."""
    r = Settings(redis={"url": url(service), "tls": tls(certs, "bridge")}).redis
    return redis.Redis.from_url(r.url, decode_responses=True, **r.client_options())


async def test_the_bridge_writes_over_mutual_tls_and_audit_reads_it_back(
    make_settings: Callable[..., Settings],
    tls_redis: Service,
    certs: Path,
    unique: str,
    tmp_path: Path,
) -> None:
    settings = make_settings(redis={"url": url(tls_redis), "tls": tls(certs, "bridge")})
    stream = Keys(unique).telemetry_streams("telemetry")[0]
    db = admin(tls_redis, certs)
    publisher = Publisher(settings.mqtt.url, f"{unique}-pub", settings.mqtt.protocol)
    try:
        async with running_bridge(settings) as app:
            for seq in range(20):
                publisher.publish(f"{unique}/plant/s1/l1/a1/telemetry", telemetry(seq))
            await wait_for(lambda: db.xlen(stream) >= 20, 15, "20 entries in the stream")
            await wait_for(
                lambda: (
                    sample(app, "iotbridge_bridge_messages_forwarded_total", route="telemetry")
                    == 20
                ),
                10,
                "20 messages forwarded",
            )
        assert publisher.wait_acked(10) == 20
        assert db.xlen(stream) == 20
        assert [int(fields["seq"]) for _, fields in db.xrange(stream)] == list(range(20))
    finally:
        publisher.close()
        db.close()

    acked_file = tmp_path / "acked.jsonl"
    with acked_file.open("w") as out:
        acked.write(out, {"route": "telemetry"}, [{"asset": "a1", "acked": [[0, 0, 19]]}])
    env = {**os.environ, **environment(tls_redis, certs, "bridge"),
           "IOTBRIDGE_REDIS__KEY_PREFIX": unique}  # fmt: skip
    argv = [sys.executable, "-m", "bridge.cli", "audit", "--acked", str(acked_file)]
    result = await asyncio.to_thread(subprocess.run, argv, env=env, cwd=ROOT, capture_output=True,
                                     text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["ok"], report["lost"], report["duplicated"]) == (True, 0, 0), report


async def test_a_worker_consumes_and_flags_over_mutual_tls(
    make_settings: Callable[..., Settings], tls_redis: Service, certs: Path, unique: str
) -> None:
    settings = make_settings(
        redis={"url": url(tls_redis), "tls": tls(certs, "worker")}, worker=THRESHOLDS_ONLY
    )
    keys = Keys(unique)
    [stream] = keys.telemetry_streams("telemetry")
    r = settings.redis
    db = AsyncRedis.from_url(r.url, decode_responses=True, **r.client_options())
    try:
        for seq, temperature in enumerate([50.0, 51.0, 120.0, 52.0]):
            await db.xadd(stream, entry(unique, "a1", seq, temperature=temperature))
        app = WorkerApp(settings, CollectorRegistry())
        async with running(app, settings):
            await eventually(all_acked(db, stream, 4), "all 4 entries acknowledged", 15)
            assert app.readiness() == (True, "ready")
        events = await db.xrange(keys.anomalies)
        assert [(e["event"], e["detector"], e["value"]) for _, e in events] == [
            ("start", "threshold", "120.0"),
            ("ended", "threshold", "52.0"),
        ]
    finally:
        await db.aclose()


async def test_without_a_client_certificate_redis_refuses_and_the_bridge_retries_not_ready(
    make_settings: Callable[..., Settings], tls_redis: Service, certs: Path
) -> None:
    settings = make_settings(
        redis={"url": url(tls_redis), "tls": tls(certs, None), "connect_timeout_s": 1}
    )
    app = BridgeApp(settings, CollectorRegistry())
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop), name="bridge-without-certificate")
    try:
        await wait_for(
            lambda: (
                sample(app, "iotbridge_bridge_reconnects_total", target="redis") >= 3 or task.done()
            ),
            20,
            "repeated refused Redis connections",
        )
        assert not task.done(), "the bridge stopped instead of retrying"
        ready, reason = app.readiness()
        assert not ready
        assert reason.startswith("redis unavailable")
        assert sample(app, "iotbridge_bridge_connected", target="redis") == 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def environment(service: Service, certs: Path, client: str) -> dict[str, str]:
    return {
        "IOTBRIDGE_REDIS__URL": url(service),
        "IOTBRIDGE_REDIS__TLS__CA_FILE": str(certs / "ca.crt"),
        "IOTBRIDGE_REDIS__TLS__CERT_FILE": str(certs / f"{client}.crt"),
        "IOTBRIDGE_REDIS__TLS__KEY_FILE": str(certs / f"{client}.key"),
    }


def test_check_config_accepts_redis_tls_and_refuses_it_with_a_plaintext_url(
    tls_redis: Service, certs: Path
) -> None:
    def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bridge.cli", "check-config"],
                              env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip

    good = check(environment(tls_redis, certs, "bridge"))
    assert good.returncode == 0, good.stderr
    assert f"redis rediss://localhost:{tls_redis.port}/0" in good.stdout
    plain = check({**environment(tls_redis, certs, "bridge"),
                   "IOTBRIDGE_REDIS__URL": f"redis://localhost:{tls_redis.port}/0"})  # fmt: skip
    assert plain.returncode == 1
    assert "redis: tls is set but url is not rediss://" in plain.stderr
