"""A real Prometheus scrapes a running pipeline, deployed as compose.yaml deploys it.

The test starts mosquitto with the shipped broker/mosquitto.conf, broker/acl and a password file;
redis-server with the Redis users of compose.yaml's ACL; two bridges sharing one subscription
group under distinct client ids, a worker and the simulator (injecting anomalies), each logged in
as its own user; and Prometheus with observability/prometheus/prometheus.yml, its targets and
intervals changed for loopback ports and 1 s. Then every dashboard panel's queries and every
recording rule must return data, every rule must evaluate without error, and the key panels
render to a PNG. What the ACLs refuse is tests/integration/test_security.py's subject.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from observability.render import (
    DASHBOARDS,
    KEY_PANELS,
    Prometheus,
    expand,
    panels,
    queries,
    render,
    variables_of,
)
from tests.compose_config import (
    PASSWORDS,
    mosquitto_as_compose_runs_it,
    redis_with_compose_acl,
    require,
)
from tests.services import Service, free_port, http_get, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PROMETHEUS_DIR = ROOT / "observability" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
# As compose.yaml: telemetry streams split by asset, divided among the workers.
SHARDS = 4
# Time allowed for data to appear: a few scrapes, evaluations and retention passes.
DATA_TIMEOUT_S = 45


def prometheus_config(workdir: Path, ports: dict[str, list[int]], own_port: int) -> Path:
    """observability/prometheus/prometheus.yml with loopback targets and 1 s intervals."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"bridge", "worker", "simulator"} <= jobs.keys()
    for name, job in jobs.items():
        targets = ports.get(name, [own_port] if name == "prometheus" else [])
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{p}" for p in targets]}]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Pipeline:
    prometheus: Prometheus
    prefix: str
    redis_port: int
    bridge_ports: list[int]
    services: list[Service] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.tail(8)}" for s in self.services)


class BadDevice:
    """A device that keeps publishing what the bridge must dead-letter (json, schema), as the
    simulator's user, so the dead-letter rates stay above zero while the test reads them."""

    def __init__(self, port: int, interval_s: float = 0.2) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=f"bad-{uuid.uuid4().hex[:8]}")  # fmt: skip
        self.client.username_pw_set("simulator", PASSWORDS["MQTT_SIMULATOR_PASSWORD"])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bad-device", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stopping.wait(self.interval_s):
            n += 1
            for payload in (b"not json", f'{{"ts": {time.time()}, "seq": "{n}"}}'.encode()):
                self.client.publish("plant/s1/l1/bad-asset/telemetry", payload, qos=1)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()


def _component(name: str, command: list[str], workdir: Path, env: dict[str, str]) -> Service:
    """An `iotbridge <command>` process; its port is the metrics port set in `env`."""
    port = next(int(v) for k, v in env.items() if k.endswith("__METRICS_PORT"))
    return Service(name, [sys.executable, "-m", "bridge.cli", *command], port, workdir, env)


def _wait_ready(service: Service) -> None:
    proc = service.proc
    assert proc is not None
    wait_until(
        lambda: http_get(service.port, "/readyz", 1)[0] == 200 or proc.poll() is not None,
        20,
        f"{service.name} ready",
    )
    assert proc.poll() is None, service.tail()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    prometheus_binary = require("prometheus", "/usr/bin/prometheus")
    workdir = tmp_path_factory.mktemp("observability")
    prefix = "o" + uuid.uuid4().hex[:8]
    services: list[Service] = []
    bad_device: BadDevice | None = None
    try:
        redis_server = redis_with_compose_acl(workdir, prefix)
        services.append(redis_server.start())
        mqtt_port = free_port()
        services.append(mosquitto_as_compose_runs_it(workdir / "mosquitto", mqtt_port).start())

        common = {
            "IOTBRIDGE_MQTT__URL": f"mqtt://127.0.0.1:{mqtt_port}",
            "IOTBRIDGE_REDIS__URL": f"redis://127.0.0.1:{redis_server.port}/0",
            "IOTBRIDGE_REDIS__KEY_PREFIX": prefix,
            "IOTBRIDGE_REDIS__STREAM_SHARDS": str(SHARDS),
            "IOTBRIDGE_BACKOFF__MAX_S": "1",
        }
        bridge_env = {
            **common,
            "IOTBRIDGE_MQTT__USERNAME": "iotbridge",
            "IOTBRIDGE_MQTT__PASSWORD": PASSWORDS["MQTT_PASSWORD"],
            "IOTBRIDGE_REDIS__USERNAME": "bridge",
            "IOTBRIDGE_REDIS__PASSWORD": PASSWORDS["REDIS_BRIDGE_PASSWORD"],
            "IOTBRIDGE_BRIDGE__SHARED_GROUP": f"{prefix}-bridges",
        }
        ports = {"bridge": [free_port(), free_port()], "worker": [free_port()],
                 "simulator": [free_port()]}  # fmt: skip
        children = []
        for n, port in enumerate(ports["bridge"], start=1):
            children.append(_component(f"bridge-{n}", ["bridge"], workdir, {
                **bridge_env,
                "IOTBRIDGE_MQTT__CLIENT_ID": f"{prefix}-bridge-{n}",
                "IOTBRIDGE_BRIDGE__METRICS_PORT": str(port),
                "IOTBRIDGE_BRIDGE__SPOOL__DIR": str(workdir / f"spool-{n}"),
            }))  # fmt: skip
        children.append(_component("worker", ["worker"], workdir, {
            **common,
            "IOTBRIDGE_REDIS__USERNAME": "worker",
            "IOTBRIDGE_REDIS__PASSWORD": PASSWORDS["REDIS_WORKER_PASSWORD"],
            "IOTBRIDGE_WORKER__METRICS_PORT": str(ports["worker"][0]),
            "IOTBRIDGE_WORKER__BLOCK_MS": "200",
        }))  # fmt: skip
        for child in children:
            services.append(child.start())
        for child in children:
            _wait_ready(child)
        simulate = ["simulate", "--assets", "20", "--rate", "5", "--duration", "600"]
        simulator = _component("simulator", simulate, workdir, {
            **common,
            "IOTBRIDGE_MQTT__USERNAME": "simulator",
            "IOTBRIDGE_MQTT__PASSWORD": PASSWORDS["MQTT_SIMULATOR_PASSWORD"],
            "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": f"{prefix}-sim",
            "IOTBRIDGE_SIMULATOR__METRICS_PORT": str(ports["simulator"][0]),
            # Injected out-of-range values, so the anomaly panels have data.
            "IOTBRIDGE_SIMULATOR__ANOMALY_RATE": "0.05",
        })  # fmt: skip
        services.append(simulator.start())
        bad_device = BadDevice(mqtt_port)

        port = free_port()
        argv = [prometheus_binary, f"--config.file={prometheus_config(workdir, ports, port)}",
                f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
        services.append(Service("prometheus", argv, port, workdir).start())
        wait_until(lambda: http_get(port, "/-/ready", 1)[0] == 200, 20, "prometheus ready")
        prometheus = Prometheus(f"http://127.0.0.1:{port}")
        yield Pipeline(prometheus, prefix, redis_server.port, ports["bridge"], services)
    finally:
        if bad_device is not None:
            bad_device.stop()
        # Producers first, so the bridges drain what they hold; servers last. By PID.
        for service in reversed(services):
            service.stop(timeout_s=15)


def wait_for_data(
    pipeline: Pipeline, exprs: dict[str, str], check: Callable[[list[dict[str, Any]]], bool]
) -> None:
    """Poll every expression until each passes `check`; fail naming those that never did."""
    failing = dict(exprs)
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while failing and time.monotonic() < deadline:
        failing = {k: e for k, e in failing.items() if not check(pipeline.prometheus.query(e))}
        if failing:
            time.sleep(0.5)
    assert not failing, (
        "no data for:\n" + "\n".join(f"  {k}: {e}" for k, e in failing.items()) + pipeline.logs()
    )


def finite(result: list[dict[str, Any]]) -> bool:
    """At least one series with a finite value (a quantile of nothing is NaN: no data)."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


def dashboard_queries(route: str = ".*") -> dict[str, str]:
    exprs: dict[str, str] = {}
    for path in sorted(DASHBOARDS.glob("*.json")):
        dashboard = json.loads(path.read_text())
        variables = {**variables_of(dashboard), "route": route}
        for panel in panels(dashboard):
            for n, query in enumerate(queries(panel)):
                exprs[f"{path.stem}: {panel['title']} [{n}]"] = expand(query.expr, variables)
    return exprs


def test_prometheus_scrapes_both_bridges_the_worker_and_the_simulator(pipeline: Pipeline) -> None:
    wait_for_data(pipeline, {"up": 'count(up{job=~"bridge|worker|simulator"} == 1) == 4'}, bool)
    bridges = pipeline.prometheus.query('iotbridge_ready{job="bridge"} == 1')
    assert {r["metric"]["instance"] for r in bridges} == {
        f"127.0.0.1:{p}" for p in pipeline.bridge_ports
    }


def test_every_dashboard_panel_query_returns_data(pipeline: Pipeline) -> None:
    exprs = dashboard_queries()
    assert len(exprs) > 30
    wait_for_data(pipeline, exprs, finite)


def test_dashboard_queries_return_data_for_one_concrete_route(pipeline: Pipeline) -> None:
    exprs = {k: e for k, e in dashboard_queries("telemetry").items() if "telemetry" in e}
    assert exprs
    wait_for_data(pipeline, exprs, finite)


def test_template_variables_list_the_routes_and_instances(pipeline: Pipeline) -> None:
    dashboard = json.loads((DASHBOARDS / "overview.json").read_text())
    definitions = {v["name"]: v["definition"] for v in dashboard["templating"]["list"]}
    pattern = re.compile(r"label_values\((.+), (\w+)\)")
    values: dict[str, set[str]] = {}
    for name, definition in definitions.items():
        match = pattern.fullmatch(definition)
        assert match, definition
        selector, label = match.groups()
        wait_for_data(pipeline, {name: f"count by ({label}) ({selector})"}, bool)
        values[name] = {r["metric"][label] for r in pipeline.prometheus.query(
            f"count by ({label}) ({selector})")}  # fmt: skip
    assert "telemetry" in values["route"]
    assert {f"127.0.0.1:{p}" for p in pipeline.bridge_ports} <= values["instance"]


def test_every_recording_rule_returns_data(pipeline: Pipeline) -> None:
    records = {
        rule["record"]: rule["record"]
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    assert len(records) >= 15
    wait_for_data(pipeline, records, finite)


def test_every_rule_evaluates_without_error_and_no_alert_fires(pipeline: Pipeline) -> None:
    wait_for_data(
        pipeline, {"dead letters": "route:iotbridge_bridge_dead_letter:ratio5m > 0"}, bool
    )
    groups = pipeline.prometheus.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    expected = sum(
        len(g["rules"]) for p in RULE_FILES for g in yaml.safe_load(p.read_text())["groups"]
    )
    assert len(rules) == expected
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    firing = [(r["name"], a["labels"]) for r in rules if r["type"] == "alerting"
              for a in r.get("alerts", []) if a["state"] == "firing"]  # fmt: skip
    assert firing == []


def test_render_draws_the_key_panels_to_a_png(pipeline: Pipeline, tmp_path: Path) -> None:
    wait_for_data(pipeline, {"anomalies": "sum(iotbridge_worker_anomalies_total) > 0"}, bool)
    out = render(pipeline.prometheus, tmp_path / "overview.png", minutes=2)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 600
    assert height >= 100 * len(KEY_PANELS) // 2
    assert 10_000 < len(data) < 1_000_000
