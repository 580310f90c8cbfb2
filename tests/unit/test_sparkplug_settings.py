"""The sparkplug settings section: defaults, the environment, and bad values named by path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.sparkplug.host import Host
from bridge.sparkplug.topic import subscriptions
from config import loader
from config.errors import ConfigError
from config.settings import Settings


def _problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        loader.parse(text)
    return {p.path: p.message for p in caught.value.problems}


def test_defaults_leave_the_host_off() -> None:
    settings = Settings().sparkplug
    assert (settings.enabled, settings.host_id, settings.groups, settings.primary) == (
        False,
        "iotbridge",
        ["#"],
        True,
    )
    assert (settings.reorder_timeout_ms, settings.rebirth_min_interval_s) == (2000, 10.0)


def test_the_environment_and_the_file_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTBRIDGE_SPARKPLUG__REORDER_TIMEOUT_MS", "750")
    settings = loader.parse(
        "sparkplug:\n  host_id: scada-2\n  groups: [Plant 1, Plant 2]\n"
    ).sparkplug
    assert (settings.enabled, settings.reorder_timeout_ms, settings.host_id) == (
        False,
        750,
        "scada-2",
    )
    assert subscriptions(settings.groups, settings.host_id) == [
        "spBv1.0/STATE/scada-2",
        "spBv1.0/Plant 1/#",
        "spBv1.0/Plant 2/#",
    ]
    host = Host.from_settings(settings)
    assert host.host_id == "scada-2"


def test_bad_values_are_named_by_their_path() -> None:
    problems = _problems(
        "sparkplug:\n  groups: [a/b]\n  host_id: 'no spaces'\n  rebirth_min_interval_s: 0\n"
        "  reorder_timeout_ms: -1\n  colour: red\n"
    )
    assert set(problems) == {
        "sparkplug.groups",
        "sparkplug.host_id",
        "sparkplug.rebirth_min_interval_s",
        "sparkplug.reorder_timeout_ms",
        "sparkplug.colour",
    }
    assert "without + / or #" in problems["sparkplug.groups"]
    assert "sparkplug.groups" in _problems("sparkplug:\n  groups: []\n")


def test_enabling_the_host_adds_its_route_for_the_workers() -> None:
    settings = loader.parse("sparkplug:\n  enabled: true\n")
    assert settings.sparkplug.enabled
    assert settings.telemetry_routes == ["telemetry", "sparkplug"]
    assert Settings().telemetry_routes == ["telemetry"]


@pytest.mark.parametrize(
    ("route", "says"),
    [
        ("{name: sparkplug, topic: 'x/{asset}'}", "bridge.routes.0.name 'sparkplug'"),
        ("{name: sp, topic: 'spBv1.0/{group}/{kind}/{asset}'}", "bridge.routes.0.topic"),
    ],
)
def test_a_bridge_route_that_clashes_with_the_host_is_refused_by_path(
    route: str, says: str
) -> None:
    text = f"sparkplug:\n  enabled: true\nbridge:\n  routes: [{route}]\n"
    [(path, message)] = _problems(text).items()
    assert message.startswith(f"sparkplug.enabled: {says}"), (path, message)
    # The same routes are fine while the host is off.
    assert loader.parse(text.replace("enabled: true", "enabled: false")).bridge.routes


def test_check_config_exits_non_zero_on_a_bad_sparkplug_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sparkplug:\n  enabled: true\n  reorder_timeout_ms: 90000\n")
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "sparkplug.reorder_timeout_ms" in done.stdout + done.stderr
