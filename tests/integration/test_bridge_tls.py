"""TLS and mutual TLS against a real mosquitto TLS listener, with throwaway certificates made by
broker/make-dev-certs.sh."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.app import BridgeApp
from config.settings import Settings
from tests.clients import running_bridge, sample, wait_for
from tests.services import Service, mosquitto_service

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parents[2] / "broker" / "make-dev-certs.sh"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["sh", str(SCRIPT), str(directory), "bridge"], check=True, capture_output=True, timeout=60
    )
    return directory


@pytest.fixture
def tls_broker(certs: Path, tmp_path: Path) -> Service:
    service = mosquitto_service(
        tmp_path / "mosquitto",
        extra_conf=f"cafile {certs / 'ca.crt'}\ncertfile {certs / 'server.crt'}\nkeyfile {certs / 'server.key'}\n"
        "require_certificate true\ntls_version tlsv1.2\n",
    )
    if service is None:
        pytest.fail("mosquitto is not installed")
    service.start()
    yield service
    service.stop()


def _tls(certs: Path, client_cert: bool) -> dict[str, str | None]:
    return {
        "ca_file": str(certs / "ca.crt"),
        "cert_file": str(certs / "bridge.crt") if client_cert else None,
        "key_file": str(certs / "bridge.key") if client_cert else None,
    }


async def test_the_bridge_connects_with_mutual_tls(
    make_settings: Callable[..., Settings], tls_broker: Service, certs: Path
) -> None:
    settings = make_settings(
        mqtt={"url": f"mqtts://localhost:{tls_broker.port}", "tls": _tls(certs, True)}
    )
    async with running_bridge(settings) as app:
        assert app.readiness() == (True, "ready")


async def _refused(settings: Settings) -> tuple[bool, str]:
    """Run a bridge that cannot connect until it has retried twice; its readiness then."""
    app = BridgeApp(settings, CollectorRegistry())
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        await wait_for(lambda: sample(app, "iotbridge_bridge_reconnects_total", target="mqtt") >= 2,
                       15, "repeated refused connection attempts")  # fmt: skip
        return app.readiness()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_without_a_client_certificate_the_broker_refuses_and_the_bridge_is_not_ready(
    make_settings: Callable[..., Settings], tls_broker: Service, certs: Path
) -> None:
    settings = make_settings(
        mqtt={"url": f"mqtts://localhost:{tls_broker.port}", "tls": _tls(certs, False)}
    )
    assert await _refused(settings) == (False, "mqtt not connected")


async def test_plaintext_to_the_tls_port_is_refused(
    make_settings: Callable[..., Settings], tls_broker: Service
) -> None:
    settings = make_settings(
        mqtt={"url": f"mqtt://127.0.0.1:{tls_broker.port}", "connect_timeout_s": 1}
    )
    assert await _refused(settings) == (False, "mqtt not connected")
