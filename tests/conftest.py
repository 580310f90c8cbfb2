"""Session fixtures: real mosquitto and redis-server processes, and per-test names; a module's own
Redis Cluster."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from tests.cluster import LocalCluster
from tests.services import (
    REQUIRE_SERVICES,
    Service,
    amqtt_service,
    missing,
    mosquitto_service,
    redis_service,
)


@pytest.fixture(scope="session")
def services_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_url(services_dir: Path) -> Iterator[str]:
    """A real Redis: IOTBRIDGE_TEST_REDIS_URL, else redis-server (or embedded Valkey) on a free port."""
    if url := os.environ.get("IOTBRIDGE_TEST_REDIS_URL"):
        yield url
        return
    service = redis_service(services_dir / "redis")
    if service is None:
        missing("redis-server (or IOTBRIDGE_TEST_REDIS_URL)")
        return
    service.start()
    yield f"redis://127.0.0.1:{service.port}/0"
    service.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of the module's own: 3 masters with a replica each, redis-server on loopback
    ports (tests/cluster.py), healthy when handed over. One module's faults (kills, failovers,
    resharding) stay in that module; a test that leaves nodes killed or frozen calls `heal()`."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def mqtt_broker(services_dir: Path) -> Iterator[tuple[str, str]]:
    """A real broker: (url, protocol). mosquitto on a free port, else the embedded amqtt (3.1.1)."""
    if url := os.environ.get("IOTBRIDGE_TEST_MQTT_URL"):
        yield url, os.environ.get("IOTBRIDGE_TEST_MQTT_PROTOCOL", "5")
        return
    service: Service | None = mosquitto_service(services_dir / "mosquitto")
    protocol = "5"
    if service is None:
        if REQUIRE_SERVICES:
            missing("mosquitto")
        service, protocol = amqtt_service(services_dir / "amqtt"), "3.1.1"
    service.start()
    yield f"mqtt://127.0.0.1:{service.port}", protocol
    service.stop()


@pytest.fixture
def mqtt_url(mqtt_broker: tuple[str, str]) -> str:
    return mqtt_broker[0]


@pytest.fixture
def unique() -> str:
    """A short name unique to this test, for topic and key prefixes and client ids."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def make_settings(
    mqtt_broker: tuple[str, str], redis_url: str, unique: str
) -> Callable[..., Settings]:
    """Settings pointing at the test servers, with this test's own topic root, key prefix and
    client ids, and metrics on free ports. Keyword arguments replace whole sections."""

    def build(**sections: Any) -> Settings:
        url, protocol = mqtt_broker
        data: dict[str, Any] = {
            "mqtt": {
                "url": url,
                "protocol": protocol,
                "client_id": f"{unique}-bridge",
                "keepalive_s": 10,
            },
            "redis": {"url": redis_url, "key_prefix": unique},
            "backoff": {"initial_s": 0.05, "max_s": 1.0},
            "bridge": {
                "routes": [
                    {
                        "name": "telemetry",
                        "topic": f"{unique}/plant/{{site}}/{{line}}/{{asset}}/telemetry",
                    }
                ],
                "metrics_port": 0,
                "shutdown_grace_s": 5,
            },
            "worker": {"metrics_port": 0, "block_ms": 100, "shutdown_grace_s": 5},
            "simulator": {"metrics_port": 0, "client_id_prefix": f"{unique}-sim"},
            "broker": {"metrics_port": 0},
        }
        for name, section in sections.items():
            data[name] = {**data.get(name, {}), **section}
        return Settings(**data)

    return build
