"""The Redis Cluster of the integration tests (tests/cluster.py, the `redis_cluster` fixture) is
what the cluster tests take it for: three masters with a replica each over every slot, keys
reached through redis-py's cluster client, a failover that swaps a master and its replica, a frozen
replica that WAIT counts only once thawed, one slot moved live to another master, and a killed
master's replica promoted without the scripts loaded on its master."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import MovedError, NoScriptError

from tests.cluster import BUS_OFFSET, LocalCluster
from tests.services import port_open

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The module's cluster, healed after each test: nodes thawed, started again, in sync."""
    yield redis_cluster
    redis_cluster.heal()


def set_and_wait(client: redis.Redis, key: str, value: str, timeout_ms: int) -> int:
    """SET, then WAIT 1 on the same connection: how many replicas confirmed the write."""
    with client.pipeline(transaction=False) as pipe:
        pipe.set(key, value)
        pipe.wait(1, timeout_ms)
        return int(pipe.execute()[1])


def test_three_masters_each_with_a_replica_in_sync_serve_every_slot(cluster: LocalCluster) -> None:
    nodes = cluster.nodes()
    masters = [n for n in nodes if n.role == "master"]
    replicas = [n for n in nodes if n.role == "replica"]
    assert len(masters) == 3
    assert len(replicas) == 3
    assert sorted(r.master_port or 0 for r in replicas) == sorted(m.port for m in masters)
    served = sorted(
        slot for m in masters for first, last in m.slots for slot in range(first, last + 1)
    )
    assert served == list(range(REDIS_CLUSTER_HASH_SLOTS))
    for port in cluster.ports:
        info = cluster.cluster_info(port)
        assert (info["cluster_state"], info["cluster_slots_ok"], info["cluster_known_nodes"]) == (
            "ok", "16384", "6",
        )  # fmt: skip
        assert port_open(port + BUS_OFFSET)
        config = cluster.client(port).config_get("*")
        assert config["cluster-node-timeout"] == "2000"
        assert config["repl-diskless-sync-delay"] == "0"
        assert (config["appendonly"], config["appendfsync"]) == ("yes", "everysec")
    for master in masters:
        assert cluster.client(master.port).info("replication")["connected_slaves"] == 1
    for replica in replicas:
        assert cluster.client(replica.port).info("replication")["master_link_status"] == "up"
    first, second = sorted(masters, key=lambda m: m.slots)[:2]
    assert cluster.url == f"redis://127.0.0.1:{first.port},127.0.0.1:{second.port}/0"
    assert cluster.seed_url == f"redis://127.0.0.1:{first.port}/0"


def test_keys_written_through_the_cluster_client_are_read_back_from_their_masters(
    cluster: LocalCluster, unique: str
) -> None:
    keys = {f"{unique}:{i}": str(i) for i in range(60)}
    with cluster.cluster_client() as client:
        for key, value in keys.items():
            client.set(key, value)
        assert {key: client.get(key) for key in keys} == keys
    masters = {key: cluster.master_of_key(key) for key in keys}
    assert set(masters.values()) == set(cluster.masters())  # spread over all three
    for key, value in keys.items():
        assert cluster.client(masters[key]).get(key) == value


def test_failover_swaps_a_master_and_its_replica_and_the_key_stays_readable(
    cluster: LocalCluster, unique: str
) -> None:
    key = f"{unique}:failover"
    with cluster.cluster_client() as client:
        client.set(key, "before")
        master = cluster.master_of_key(key)
        replica = cluster.replica_of(master)
        cluster.failover(replica)
        assert (cluster.role(replica), cluster.role(master)) == ("master", "replica")
        assert cluster.master_of_key(key) == replica
        assert cluster.replica_of(replica) == master
        assert cluster.client(replica).get(key) == "before"
        assert client.get(key) == "before"  # after a MOVED from the former master
        client.set(key, "after")
    with pytest.raises(MovedError):
        cluster.client(master).get(key)


def test_wait_counts_a_frozen_replica_only_once_it_is_thawed(
    cluster: LocalCluster, unique: str
) -> None:
    key = f"{unique}:wait"
    master = cluster.master_of_key(key)
    replica = cluster.replica_of(master)
    writer = cluster.client(master)
    assert set_and_wait(writer, key, "1", 2000) == 1
    cluster.freeze(replica)
    started = time.monotonic()
    assert set_and_wait(writer, key, "2", 500) == 0
    assert time.monotonic() - started >= 0.45  # WAIT held the connection for its timeout
    cluster.thaw(replica)
    assert set_and_wait(writer, key, "3", 5000) == 1
    with redis.Redis(port=replica, decode_responses=True, single_connection_client=True) as reader:
        reader.execute_command("READONLY")  # a replica answers reads of its master's slots
        assert reader.get(key) == "3"


def test_reshard_moves_a_slot_with_its_keys_to_another_master(
    cluster: LocalCluster, unique: str
) -> None:
    # One hash tag: 250 keys in one slot, more than one MIGRATE batch.
    keys = {f"{{{unique}}}:{i}": str(i) for i in range(250)}
    with cluster.cluster_client() as client:
        for key, value in keys.items():
            client.set(key, value)
        source = cluster.master_of_key(f"{{{unique}}}")
        target = next(port for port in cluster.masters() if port != source)
        slot = cluster.reshard(f"{{{unique}}}", target)
        assert slot == key_slot(f"{{{unique}}}".encode())
        for port in cluster.live_ports():
            assert cluster.master_of_slot(slot, asked=port) == target
        # Other tests' keys may share the slot by chance: every one moved, ours among them.
        moved = cluster.client(target).execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
        assert set(keys) <= set(moved)
        assert cluster.client(source).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
        assert cluster.client(target).mget(list(keys)) == list(keys.values())
        with pytest.raises(MovedError):
            cluster.client(source).get(next(iter(keys)))
        assert {key: client.get(key) for key in keys} == keys  # after a MOVED
    assert any(first <= slot <= last for first, last in cluster.node(target).slots)
    assert not any(first <= slot <= last for first, last in cluster.node(source).slots)


def test_a_killed_masters_replica_takes_over_without_the_scripts_loaded_on_the_master(
    cluster: LocalCluster, unique: str
) -> None:
    key = f"{unique}:script"
    master = cluster.master_of_key(key)
    replica = cluster.replica_of(master)
    assert set_and_wait(cluster.client(master), key, "kept", 2000) == 1
    sha = cluster.client(master).script_load("return redis.call('GET', KEYS[1])")
    assert cluster.client(master).evalsha(sha, 1, key) == "kept"
    cluster.kill(master)  # SIGKILL
    promoted = cluster.wait_promoted(master)
    assert promoted == replica
    assert cluster.role(promoted) == "master"
    assert cluster.master_of_key(key) == promoted
    assert cluster.client(promoted).get(key) == "kept"
    # SCRIPT LOAD is not replicated: the new master answers NOSCRIPT until it is loaded there.
    assert cluster.client(promoted).script_exists(sha) == [False]
    with pytest.raises(NoScriptError):
        cluster.client(promoted).evalsha(sha, 1, key)
    cluster.restart(master)
    assert cluster.role(master) == "replica"
    assert cluster.replica_of(promoted) == master
