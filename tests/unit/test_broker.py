"""broker/mosquitto.conf read as text, and the embedded broker before it runs (no processes)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from broker.embedded import EmbeddedBroker
from config.settings import Settings

MOSQUITTO_CONF = Path(__file__).parents[2] / "broker" / "mosquitto.conf"


def directives() -> list[tuple[int, str, str]]:
    """(line number, name, value) of every active directive."""
    found = []
    for number, line in enumerate(MOSQUITTO_CONF.read_text().splitlines(), start=1):
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            found.append((number, name, value.strip()))
    return found


def settings() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for _, name, value in directives():
        values.setdefault(name, []).append(value)
    return values


def test_every_directive_says_why() -> None:
    """Each directive follows a comment, or repeats the directive just above it (log_type)."""
    lines = MOSQUITTO_CONF.read_text().splitlines()
    bare = [
        f"{number}: {lines[number - 1]}"
        for number, name, _ in directives()
        if not (lines[number - 2].startswith("#") or lines[number - 2].startswith(f"{name} "))
    ]
    assert bare == []


def test_mosquitto_conf_is_safe_by_default() -> None:
    conf = settings()
    assert conf["listener"] == ["1883 127.0.0.1"]
    assert conf["allow_anonymous"] == ["false"]


def test_mosquitto_conf_saves_by_time_with_a_loss_window_of_seconds() -> None:
    conf = settings()
    assert conf["persistence"] == ["true"]
    assert conf["persistence_location"][0].endswith("/")
    # Saving on every change rewrites the whole queue per PUBACK (116-1,715 msg/s measured).
    assert conf["autosave_on_changes"] == ["false"]
    assert 1 <= int(conf["autosave_interval"][0]) <= 10


def test_mosquitto_conf_queues_are_bounded_and_sized_for_outages() -> None:
    conf = settings()
    assert int(conf["max_queued_messages"][0]) >= 100_000
    assert int(conf["max_queued_bytes"][0]) > 0
    assert int(conf["max_inflight_messages"][0]) >= Settings().mqtt.receive_maximum
    assert conf["persistent_client_expiration"] == ["2d"]
    assert conf["set_tcp_nodelay"] == ["true"]


def test_embedded_broker_is_not_ready_before_it_listens() -> None:
    registry = CollectorRegistry()
    component = EmbeddedBroker(Settings(broker={"host": "127.0.0.1", "port": 1999}), registry)

    assert component.readiness() == (False, "broker not listening on mqtt://127.0.0.1:1999")
    assert registry.get_sample_value("iotbridge_broker_listening") == 0.0
