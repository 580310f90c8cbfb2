"""compose.cluster.yaml's Redis on real redis-server processes, configured as compose configures
them (tests/compose_config.py): its init script makes six new nodes a cluster, leaves a cluster
that is ok alone, and brings back one whose nodes came back on other addresses; replicas sync as
its replication user; the iotbridge users reach every stream shard through redis-py's cluster
client, and a replica confirms their writes (WAIT); the bridge's own sink writes a batch over every
shard as compose's bridge and gateway users."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from bridge.sink import Append, Dedup, make_sink
from config.keys import Keys
from config.settings import Settings
from tests.compose_config import PASSWORDS, REDIS_PASSWORDS, redis_cluster_as_compose_runs_it
from tests.services import redis_cli_binary, require

pytestmark = pytest.mark.integration

SHARDS = 12  # compose.cluster.yaml's IOTBRIDGE_REDIS__STREAM_SHARDS


class ComposeCluster:
    """compose.cluster.yaml's nodes and init script; `first_run` is the init's output on new nodes."""

    def __init__(self, workdir: Path, prefix: str) -> None:
        self.prefix = prefix
        self.nodes, self.script = redis_cluster_as_compose_runs_it(workdir, prefix)
        self.cli_dir = str(Path(require(redis_cli_binary(), "redis-cli")).parent)
        self.first_run: subprocess.CompletedProcess[str] | None = None

    def init(self) -> subprocess.CompletedProcess[str]:
        """The redis-cluster-init script, its nodes the loopback ones."""
        return subprocess.run(
            ["sh", "-c", self.script], capture_output=True, text=True, timeout=120, check=False,
            env={
                "PATH": f"{self.cli_dir}:/usr/bin:/bin",
                "REDIS_NODES": " ".join(f"127.0.0.1:{port}" for port in self.nodes.ports),
                "REDISCLI_AUTH": PASSWORDS["REDIS_ADMIN_PASSWORD"],
            },
        )  # fmt: skip

    def as_user(self, user: str) -> RedisCluster:
        return RedisCluster(
            host="127.0.0.1", port=self.nodes.ports[0], username=user,
            password=PASSWORDS[REDIS_PASSWORDS[user]], decode_responses=True,
        )  # fmt: skip

    def on_master(self, user: str, key: str) -> redis.Redis:
        """A plain connection, as `user`, to the master of `key`: what a write and its WAIT use."""
        return redis.Redis(
            port=self.nodes.master_of_key(key), username=user,
            password=PASSWORDS[REDIS_PASSWORDS[user]], decode_responses=True,
            single_connection_client=True,
        )  # fmt: skip


@pytest.fixture(scope="module")
def compose_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeCluster]:
    """Six new nodes made a cluster by the init script; healthy when handed over."""
    found = ComposeCluster(tmp_path_factory.mktemp("compose-cluster"), "tcc")
    try:
        found.nodes.spawn(6)
        found.first_run = found.init()
        assert found.first_run.returncode == 0, found.first_run.stdout + found.first_run.stderr
        found.nodes.created(replicas_per_master=1)
        yield found
    finally:
        found.nodes.stop()


@pytest.fixture
def cluster(compose_cluster: ComposeCluster) -> Iterator[ComposeCluster]:
    yield compose_cluster
    compose_cluster.nodes.heal()


def test_the_init_script_makes_new_nodes_three_masters_with_a_replica_each_once(
    cluster: ComposeCluster,
) -> None:
    assert cluster.first_run is not None
    assert "cluster_state:ok on every node" in cluster.first_run.stdout
    nodes = cluster.nodes.nodes()
    masters = [n.port for n in nodes if n.role == "master"]
    assert len(masters) == 3
    # Replicas signed in to their masters as the replication user (masteruser, masterauth).
    assert sorted(n.master_port or 0 for n in nodes if n.role == "replica") == sorted(masters)
    assert cluster.nodes.healthy()
    for port in cluster.nodes.ports:
        assert cluster.nodes.client(port).config_get("masteruser") == {"masteruser": "replication"}
    again = cluster.init()
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert cluster.nodes.nodes() == nodes


def test_the_init_script_brings_back_a_cluster_whose_nodes_came_back_on_other_addresses(
    cluster: ComposeCluster,
) -> None:
    # Containers recreated get new addresses; their nodes.conf keeps the old ones. Here every
    # node's nodes.conf is given an address nothing listens on (redis-server binds 127.0.0.1).
    nodes = cluster.nodes
    before = nodes.nodes()
    for port in nodes.ports:
        nodes.services[port].stop()
    for port in nodes.ports:
        conf = nodes.workdir / str(port) / "nodes.conf"
        conf.write_text(conf.read_text().replace("127.0.0.1:", "127.0.0.2:"))
        nodes.services[port].start()
    for port in nodes.ports:
        assert "127.0.0.1:" not in str(nodes.client(port).execute_command("CLUSTER", "NODES"))
    for master in (n.port for n in before if n.role == "master"):
        assert not nodes.cluster_ok(master)  # no majority of masters reachable
    result = cluster.init()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cluster_state:ok on every node" in result.stdout
    nodes.wait_healthy()
    assert [(n.port, n.role, n.master_port, n.slots) for n in nodes.nodes()] == [
        (n.port, n.role, n.master_port, n.slots) for n in before
    ]


def test_the_iotbridge_users_reach_every_shard_and_a_replica_confirms_their_writes(
    cluster: ComposeCluster,
) -> None:
    prefix = cluster.prefix
    with cluster.as_user("bridge") as bridge, cluster.as_user("worker") as worker:
        for shard in range(SHARDS):
            stream = f"{prefix}:tel:telemetry:{{{shard}}}"
            bridge.xadd(stream, {"asset": "a1", "seq": shard})
            bridge.hset(f"{prefix}:dedup:telemetry:{{{shard}}}", "a1", shard)
            worker.xadd(f"{prefix}:anomalies:{{{shard}}}", {"asset": "a1"})
            worker.xadd(f"{prefix}:dlq:worker:{{{shard}}}", {"asset": "a1"})
            assert worker.xrange(stream) == bridge.xrange(stream)
        with pytest.raises(redis.exceptions.NoPermissionError):
            bridge.xadd(f"{prefix}:anomalies:{{0}}", {"asset": "a1"})
    with cluster.as_user("gateway") as gateway:
        for shard in range(SHARDS):
            assert len(gateway.xrange(f"{prefix}:anomalies:{{{shard}}}")) == 1
            assert len(gateway.xrange(f"{prefix}:dlq:worker:{{{shard}}}")) == 1
    # The shard tags spread over the three masters.
    masters = {
        cluster.nodes.master_of_key(f"{prefix}:tel:telemetry:{{{s}}}") for s in range(SHARDS)
    }
    assert len(masters) == 3
    for user, key in [("bridge", f"{prefix}:tel:telemetry:{{5}}"),
                      ("worker", f"{prefix}:anomalies:{{5}}"),
                      ("gateway", f"{prefix}:tel:telemetry:{{5}}")]:  # fmt: skip
        with (
            cluster.on_master(user, key) as connection,
            connection.pipeline(transaction=False) as pipe,
        ):
            pipe.xadd(key, {"asset": "a2"})
            pipe.wait(1, 2000)
            assert pipe.execute()[1] == 1, user


def test_the_nodes_run_the_redis_settings_of_compose_yaml_as_cluster_nodes(
    cluster: ComposeCluster,
) -> None:
    for port in cluster.nodes.ports:
        config = cluster.nodes.client(port).config_get("*")
        assert config["cluster-enabled"] == "yes"
        assert config["cluster-preferred-endpoint-type"] == "hostname"
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
        assert config["maxmemory-policy"] == "noeviction"
        assert config["repl-diskless-sync-delay"] == "0"


@pytest.mark.parametrize("user", ["bridge", "gateway"])
async def test_the_sink_writes_a_batch_over_every_shard_as_compose_runs_it(
    cluster: ComposeCluster, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(redis={
        "url": f"redis://127.0.0.1:{cluster.nodes.ports[0]},127.0.0.1:{cluster.nodes.ports[1]}/0",
        "cluster": True, "stream_shards": SHARDS, "key_prefix": cluster.prefix,
        "durability": {"replicas": 1},
        "username": user, "password": PASSWORDS[REDIS_PASSWORDS[user]],
    })  # fmt: skip
    keys = Keys.of(settings.redis)
    streams = keys.telemetry_streams(user)
    dedups = [keys.dedup(user, shard) for shard in range(SHARDS)]
    sink = make_sink(settings.redis, [*streams, *dedups, keys.dead_letters])
    try:
        await sink.check()
        # Every master checked whole: a right the user lacks (INFO, CONFIG GET) is only a warning.
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        batch = [
            Append.of(stream, ["asset", f"a{shard}", "seq", "1"], Dedup(dedup, f"a{shard}", 1, 1.0))
            for shard, (stream, dedup) in enumerate(zip(streams, dedups, strict=True))
        ]
        written, _ = await sink.write([*batch, Append.of(keys.dead_letters, ["reason", user])])
        assert written == [1] * (SHARDS + 1)
        written, _ = await sink.write(batch)  # written again: every entry a duplicate
        assert written == [0] * SHARDS
    finally:
        await sink.close()
    with cluster.as_user("admin") as admin:
        assert [admin.xlen(stream) for stream in streams] == [1] * SHARDS
