"""observability/prometheus and observability/grafana, checked without a running pipeline: promtool
validates the config and rules and runs the rule unit tests; every alert carries its runbook, has
a unit test that fires it and a line in the README; every metric the rules and dashboards read is
one that observability/metrics.py declares (or a recording rule)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from observability import metrics
from observability.render import KEY_PANELS, OVERVIEW, panels
from tests.services import REQUIRE_SERVICES

ROOT = Path(__file__).parents[2]
PROMETHEUS = ROOT / "observability" / "prometheus"
DASHBOARDS = ROOT / "observability" / "grafana" / "dashboards"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
# Series Prometheus itself makes: scrape health and the alerts' own state.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool (Debian package prometheus) is not installed"
        if REQUIRE_SERVICES:
            pytest.fail(f"IOTBRIDGE_REQUIRE_SERVICES=1 and {message}", pytrace=False)
        pytest.skip(message)
    return found


def _promtool_run(*args: str) -> None:
    result = subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, check=False)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> Iterator[dict[str, Any]]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            yield from group["rules"]


ALERTS = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
RECORDS = {rule["record"] for rule in _rules() if "record" in rule}


def test_promtool_accepts_the_prometheus_config_and_its_rule_files() -> None:
    _promtool_run("check", "config", str(PROMETHEUS / "prometheus.yml"))


def test_promtool_accepts_every_rule_file() -> None:
    assert RULE_FILES
    _promtool_run("check", "rules", *map(str, RULE_FILES))


def test_promtool_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    _promtool_run("test", "rules", *map(str, RULE_TESTS))


def test_the_config_loads_every_rule_file() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    loaded = {(PROMETHEUS / f).resolve() for f in config["rule_files"]}
    assert loaded == {p.resolve() for p in RULE_FILES}
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert {"bridge", "worker", "simulator"} <= jobs


def test_the_issue_s_alerts_exist() -> None:
    wanted = {
        "IotbridgeBridgeDown", "IotbridgeWorkerDown", "IotbridgeBridgeNotReady",
        "IotbridgeWorkerNotReady", "IotbridgeDeadLetterRatioHigh", "IotbridgeUnackedMessageOld",
        "IotbridgeSpoolFilling", "IotbridgeConsumerLagGrowing", "IotbridgeRedisMemoryAtRisk",
        "IotbridgeAnomalyRateJump", "IotbridgeSimulatorLoss",
    }  # fmt: skip
    assert wanted <= ALERTS.keys()


@pytest.mark.parametrize("name", sorted(ALERTS))
def test_every_alert_has_a_severity_and_a_runbook(name: str) -> None:
    rule = ALERTS[name]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["labels"]["component"]
    annotations = rule["annotations"]
    assert {"summary", "description", "runbook"} <= annotations.keys()
    assert len(annotations["runbook"]) > 100, "a runbook says what to check and what to do"


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    fired = {
        case["alertname"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert sorted(ALERTS.keys() - fired) == []


def test_the_readme_explains_every_alert() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Alerts", 1)[1].split("\n## ", 1)[0]
    assert [name for name in ALERTS if f"`{name}`" not in section] == []


# --- metric names: rules and dashboards read only what exists ---------------------------------


def declared_series() -> set[str]:
    """The sample names every process can expose, from the metric sets in metrics.py."""
    registries = []
    for name in ("BridgeMetrics", "WorkerMetrics", "SimulatorMetrics", "BrokerMetrics"):
        registry = CollectorRegistry()
        getattr(metrics, name)(registry)
        registries.append(registry)
    names: set[str] = set()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                "info": ["_info"], "summary": ["_count", "_sum"]}  # fmt: skip
    for reg in registries:
        for family in reg.collect():
            names |= {family.name + s for s in suffixes.get(family.type, [""])}
    return names | {"iotbridge_ready"}  # observability.metrics.readiness_gauge, one per process


def used_series(expr: str) -> set[str]:
    """Metric names an expression selects (label names and functions excluded)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r'"[^"]*"', "", expr)
    return {m for m in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
            if m.startswith("iotbridge_") or ":" in m or m in PROMETHEUS_SERIES}  # fmt: skip


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            for target in panel["targets"]:
                yield f"{path.name}: {panel['title']}", target["expr"]
        for variable in dashboard["templating"]["list"]:
            yield f"{path.name}: ${variable['name']}", variable["definition"]


def test_rules_and_dashboards_read_only_declared_metrics_and_recording_rules() -> None:
    known = declared_series() | RECORDS | PROMETHEUS_SERIES
    exprs = [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in _rules()]
    unknown = [(where, name) for where, expr in [*exprs, *dashboard_exprs()]
               for name in sorted(used_series(expr) - known)]  # fmt: skip
    assert unknown == []


def test_dashboards_are_provisioned_with_template_variables_for_route_and_instance() -> None:
    provider = yaml.safe_load(
        (ROOT / "observability/grafana/provisioning/dashboards/iotbridge.yml").read_text()
    )
    datasource = yaml.safe_load(
        (ROOT / "observability/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert provider["providers"][0]["type"] == "file"
    uids = set()
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        assert {v["name"] for v in dashboard["templating"]["list"]} >= {"route", "instance"}
        for panel in panels(dashboard):
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["title"]
    assert len(uids) == len(list(DASHBOARDS.glob("*.json"))) >= 2


def test_render_s_key_panels_are_overview_panels() -> None:
    titles = {p["title"] for p in panels(json.loads(OVERVIEW.read_text()))}
    assert set(KEY_PANELS) <= titles


def test_the_committed_overview_image_is_a_small_png() -> None:
    image = ROOT / "observability" / "grafana" / "overview.png"
    data = image.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 200_000
    assert "observability/grafana/overview.png" in (ROOT / "README.md").read_text()
