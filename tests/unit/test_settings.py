"""Settings: every shipped YAML file loads, and bad files name each problem by its YAML path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import loader
from config.errors import ConfigError
from config.settings import Settings

CONFIG_DIR = Path(__file__).parents[2] / "config"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_file_in_config_loads(path: Path) -> None:
    assert isinstance(loader.load(path), Settings)


def test_shipped_file_states_the_model_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("IOTBRIDGE_")]:
        monkeypatch.delenv(name)
    assert loader.load(CONFIG_DIR / "settings.yaml") == Settings()


def _problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        loader.parse(text)
    return {p.path: p.message for p in caught.value.problems}


def test_unknown_key_and_negative_batch_size_are_both_named() -> None:
    problems = _problems("bridge:\n  batch:\n    max_size: -5\n  colour: red\n")
    assert problems == {"bridge.batch.max_size": "must be > 0", "bridge.colour": "unknown key"}


def test_list_items_are_named_by_index() -> None:
    problems = _problems(
        "bridge:\n  routes:\n    - name: ok\n      topic: a/{asset}\n    - name: bad name\n      topic: b/{asset}\n"
    )
    assert list(problems) == ["bridge.routes[1].name"]


def test_route_template_rules() -> None:
    assert "bridge.routes[0].topic" in _problems(
        "bridge:\n  routes:\n    - {name: r, topic: a/+/b}\n"
    )
    assert "bridge.routes[0].topic" in _problems(
        "bridge:\n  routes:\n    - {name: r, topic: a/#/b}\n"
    )
    assert "bridge.routes[0]" in _problems(
        'bridge:\n  routes:\n    - {name: r, topic: "a/{site}"}\n'
    )


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTBRIDGE_MQTT__URL", "mqtts://broker.plant:8883")
    monkeypatch.setenv("IOTBRIDGE_REDIS__URL", "redis://cache:6380/2")
    monkeypatch.setenv("IOTBRIDGE_WORKER__METRICS_PORT", "9300")
    settings = loader.parse("mqtt:\n  url: mqtt://ignored:1883\nworker:\n  batch_size: 7\n")
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.tls_enabled) == (
        "broker.plant",
        8883,
        True,
    )
    assert settings.redis.url == "redis://cache:6380/2"
    assert (settings.worker.metrics_port, settings.worker.batch_size) == (9300, 7)


def test_variables_are_substituted_and_missing_ones_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PLANT_BROKER_PORT", "2883")
    settings = loader.parse(
        "mqtt:\n  url: mqtt://gw:${PLANT_BROKER_PORT}\nbridge:\n  metrics_port: ${PLANT_BROKER_PORT}\n"
    )
    assert settings.mqtt.port == 2883
    assert settings.bridge.metrics_port == 2883
    assert (
        loader.parse("redis:\n  key_prefix: ${NOT_SET_ANYWHERE:-plant7}\n").redis.key_prefix
        == "plant7"
    )
    assert _problems("redis:\n  url: ${NOT_SET_ANYWHERE}\n")["redis.url"] == (
        "environment variable NOT_SET_ANYWHERE is not set"
    )


def test_secrets_are_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTBRIDGE_MQTT__PASSWORD", "hunter2-mqtt")
    monkeypatch.setenv("IOTBRIDGE_REDIS__PASSWORD", "hunter2-redis")
    settings = loader.parse("")
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "hunter2-mqtt"
    for text in (repr(settings), str(settings.model_dump()), loader.summary(settings)):
        assert "hunter2" not in text


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, check=False,
                          text=True, timeout=60, env=env)  # fmt: skip


def test_check_config_names_every_problem_and_exits_non_zero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("bridge:\n  batch:\n    max_size: -1\nmqtt:\n  keepalive: 30\n")
    result = _cli("check-config", str(bad))
    assert result.returncode != 0
    assert f"{bad}: bridge.batch.max_size: must be > 0" in result.stderr
    assert f"{bad}: mqtt.keepalive: unknown key" in result.stderr
    assert result.stdout == ""


def test_check_config_summarises_a_valid_file_in_one_line() -> None:
    result = _cli("check-config", str(CONFIG_DIR / "settings.yaml"))
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert "ok: mqtt 127.0.0.1:1883" in line


def test_check_config_reports_an_unreadable_file(tmp_path: Path) -> None:
    result = _cli("check-config", str(tmp_path / "missing.yaml"))
    assert result.returncode != 0
    assert "cannot read" in result.stderr


def test_a_route_must_name_an_existing_contract() -> None:
    problems = _problems(
        "bridge:\n  routes:\n    - {name: r, topic: 'a/{asset}', contract: pump}\n"
    )
    assert problems == {"bridge": "route r: no contract named 'pump'"}


def test_contract_fields_are_checked() -> None:
    problems = _problems(
        "bridge:\n  contracts:\n    pump:\n      values:\n        mode: {type: number, enum: [a]}\n"
    )
    assert problems == {"bridge.contracts.pump.values.mode": "enum applies to string fields only"}


def test_a_cluster_is_named_by_seed_nodes_and_database_0() -> None:
    assert _problems("redis:\n  url: redis://a:7000,b:7001/0\n") == {
        "redis": "url names several nodes: set cluster: true, or name one Redis"
    }
    assert _problems("redis:\n  url: redis://a:7000/2\n  cluster: true\n") == {
        "redis": "a Redis Cluster has database 0 only: end the url with /0"
    }
    redis = Settings(redis={"url": "redis://u:p@a:7000,[::1]:7001,c/0", "cluster": True}).redis
    assert redis.seeds() == [("a", 7000), ("::1", 7001), ("c", 6379)]
    assert redis.node_url("10.0.0.9", 7002) == "redis://u:p@10.0.0.9:7002/0"


def test_durability_bounds_are_checked() -> None:
    problems = _problems("redis:\n  durability: {replicas: -1, timeout_ms: 0}\n")
    assert problems == {
        "redis.durability.replicas": "must be >= 0",
        "redis.durability.timeout_ms": "must be >= 1",
    }
