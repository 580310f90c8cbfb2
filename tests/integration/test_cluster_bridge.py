"""The bridge on a Redis Cluster of 3 masters and 3 replicas (tests/cluster.py): every message
lands once in its shard's stream on the master of its slot, through a master killed with -9, three
coordinated failovers, a frozen replica and slots moved while messages flow."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.app import BridgeApp
from config.keys import Keys
from config.settings import Settings
from tests.clients import running_bridge, sample, wait_for
from tests.cluster import LocalCluster
from tests.services import Service, mosquitto_service, require

pytestmark = pytest.mark.integration

TEL = "iotbridge_bridge_messages_"
SHARDS = 12  # 4 per master
ASSETS = 1000
ROUTE = "telemetry"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A mosquitto of the module's own: the publisher's topics are the shipped route's."""
    service = require(mosquitto_service(tmp_path_factory.mktemp("mosquitto")), "mosquitto")
    service.start()
    yield service
    service.stop()


@pytest.fixture
def healed(redis_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The module's cluster, healed after the test (killed nodes back, frozen ones thawed)."""
    yield redis_cluster
    redis_cluster.heal()


def _settings(
    make_settings: Callable[..., Settings], cluster: LocalCluster, broker: Service, unique: str,
    **durability: Any,
) -> Settings:  # fmt: skip
    return make_settings(
        mqtt={"url": f"mqtt://127.0.0.1:{broker.port}", "protocol": "5",
              "client_id": f"{unique}-bridge", "keepalive_s": 10},
        redis={"url": cluster.url, "key_prefix": unique, "cluster": True,
               "stream_shards": SHARDS, "durability": durability},
        bridge={"routes": [{"name": ROUTE, "topic": "plant/{site}/{line}/{asset}/telemetry"}],
                "metrics_port": 0, "shutdown_grace_s": 5},
    )  # fmt: skip


class Publishers:
    """A bench/publisher.py process publishing `count` QoS 1 messages round-robin over ASSETS
    assets (`a<k>`, seqs from `start_seq` on) as fast as the broker takes them."""

    def __init__(
        self, broker: Service, tag: str, count: int, workdir: Path, start_seq: int = 0,
        assets: int = ASSETS, sites: int = 1,
    ) -> None:  # fmt: skip
        self.start_seq, self.assets = start_seq, assets
        argv = [sys.executable, str(ROOT / "bench" / "publisher.py"), "--mqtt-url",
                f"mqtt://127.0.0.1:{broker.port}", "--client-id", f"{tag}-pub",
                "--assets", str(assets), "--count", str(count), "--start-seq", str(start_seq),
                "--ack-timeout", "120", "--sites", str(sites)]  # fmt: skip
        with (workdir / f"{tag}-publisher.err").open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=ROOT)

    def sent(self, timeout_s: float = 150) -> set[tuple[str, int]]:
        """What the broker acknowledged, once the publisher is done."""
        out, _ = self.proc.communicate(timeout=timeout_s)
        published = json.loads(out)["published"]
        n = self.assets
        return {(f"a{i % n}", self.start_seq + i // n) for i in range(published)}

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _stored(cluster: LocalCluster, keys: Keys) -> Counter[tuple[str, int]]:
    """Every (asset, seq) in the route's shard streams, with how often it is there."""
    db = cluster.cluster_client()
    found: Counter[tuple[str, int]] = Counter()
    for stream in keys.telemetry_streams(ROUTE):
        last = "-"
        while page := db.xrange(stream, min=last, count=10_000):
            if last != "-":
                page = page[1:]
                if not page:
                    break
            found.update((entry["asset"], int(entry["seq"])) for _, entry in page)
            last = page[-1][0]
    db.close()
    return found


def _acked(app: BridgeApp) -> float:
    """Messages the bridge acknowledged: written, or recognised as already written."""
    return sum(
        sample(app, TEL + name, route=ROUTE) for name in ("forwarded_total", "duplicate_total")
    )


async def _flowing(app: BridgeApp, at_least: int, timeout_s: float = 60) -> None:
    await wait_for(lambda: _acked(app) >= at_least, timeout_s, f"{at_least} messages acknowledged")


async def _drained(app: BridgeApp, publishers: Publishers) -> set[tuple[str, int]]:
    sent = await asyncio.to_thread(publishers.sent)
    await wait_for(lambda: _acked(app) >= len(sent) and app.in_flight() == 0, 120,
                   "every message acknowledged")  # fmt: skip
    return sent


def _master_of_shard(cluster: LocalCluster, keys: Keys, shard: int) -> int:
    return cluster.master_of_key(keys.telemetry(ROUTE, shard))


async def test_every_message_lands_once_in_its_shard(
    make_settings: Callable[..., Settings], redis_cluster: LocalCluster, broker: Service,
    unique: str, tmp_path: Path,
) -> None:  # fmt: skip
    settings = _settings(make_settings, redis_cluster, broker, unique)
    keys = Keys.of(settings.redis)
    async with running_bridge(settings) as app:
        publishers = Publishers(broker, unique, 20_000, tmp_path)
        sent = await _drained(app, publishers)
    stored = _stored(redis_cluster, keys)
    assert set(stored) == sent
    assert max(stored.values()) == 1
    # Every master holds shards: the layout spreads over the cluster.
    owners = {_master_of_shard(redis_cluster, keys, shard) for shard in range(SHARDS)}
    assert len(owners) == 3


async def test_a_master_killed_mid_flow_loses_nothing_when_a_replica_confirms_each_write(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cluster = healed
    settings = _settings(make_settings, cluster, broker, unique, replicas=1, timeout_ms=500)
    keys = Keys.of(settings.redis)
    victim = _master_of_shard(cluster, keys, 0)
    async with running_bridge(settings) as app:
        publishers = Publishers(broker, unique, 100_000, tmp_path)
        try:
            await _flowing(app, 20_000)
            cluster.kill(victim)
            promoted = await asyncio.to_thread(cluster.wait_promoted, victim)
            # The promoted replica has no replica of its own to confirm its writes: the bridge
            # holds its acks until the failed node is back, as a replica (durability over
            # availability; a master with two replicas keeps going without it).
            await wait_for(lambda: app.in_flight() > 0 and not app.readiness()[0], 30,
                           "acks held while no replica confirms")  # fmt: skip
            await asyncio.to_thread(cluster.restart, victim)
            sent = await _drained(app, publishers)
        finally:
            publishers.kill()
    stored = _stored(cluster, keys)
    lost, doubled = sent - set(stored), [k for k, n in stored.items() if n > 1]
    print(f"killed {victim}, promoted {promoted}: sent {len(sent)}, lost {len(lost)}, "
          f"duplicated {len(doubled)}")  # fmt: skip
    assert len(sent) == 100_000
    assert not lost
    assert not doubled


async def test_without_replica_confirmation_a_kill_loses_what_the_master_had_acknowledged(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The control: replicas 0, the victim's replica frozen and its link cut before the kill (a
    frozen process still has what its socket buffers held when it is thawed). The writes the
    master acknowledged and never replicated die with it (the test above could fail)."""
    cluster = healed
    settings = _settings(make_settings, cluster, broker, unique)
    keys = Keys.of(settings.redis)
    victim = _master_of_shard(cluster, keys, 0)
    replica = cluster.replica_of(victim)
    async with running_bridge(settings) as app:
        cluster.freeze(replica)
        cluster.client(victim).execute_command("CLIENT", "KILL", "TYPE", "replica")
        publishers = Publishers(broker, unique, 30_000, tmp_path)
        try:
            await _flowing(app, 10_000)
            cluster.kill(victim)
            cluster.thaw(replica)
            await asyncio.to_thread(cluster.wait_promoted, victim)
            sent = await _drained(app, publishers)
        finally:
            publishers.kill()
    lost = sent - set(_stored(cluster, keys))
    print(f"replicas 0, replica frozen: sent {len(sent)}, lost {len(lost)}")
    assert len(lost) >= 1_000


async def test_three_coordinated_failovers_while_messages_flow_lose_nothing(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cluster = healed
    settings = _settings(make_settings, cluster, broker, unique)
    keys = Keys.of(settings.redis)
    async with running_bridge(settings) as app:
        publishers = Publishers(broker, unique, 60_000, tmp_path)
        try:
            for round_ in range(3):
                await _flowing(app, 10_000 * (round_ + 1))
                master = _master_of_shard(cluster, keys, round_)
                await asyncio.to_thread(cluster.failover, cluster.replica_of(master))
            sent = await _drained(app, publishers)
        finally:
            publishers.kill()
    stored = _stored(cluster, keys)
    assert set(stored) == sent
    assert max(stored.values()) == 1


async def test_a_frozen_replica_holds_the_acks_of_every_batch_until_it_confirms(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cluster = healed
    settings = _settings(make_settings, cluster, broker, unique, replicas=1, timeout_ms=200)
    keys = Keys.of(settings.redis)
    replica = cluster.replica_of(_master_of_shard(cluster, keys, 0))
    async with running_bridge(settings) as app:
        cluster.freeze(replica)
        publishers = Publishers(broker, unique, 5_000, tmp_path)
        try:
            await wait_for(lambda: not app.readiness()[0], 20, "the bridge to say why")
            assert "0 of 1 replicas confirmed the write" in app.readiness()[1]
            # Batches carry messages of every shard: each waits on the frozen replica.
            held = _acked(app)
            await wait_for(lambda: app.in_flight() >= 1_000, 20, "messages held")
            assert _acked(app) == held
            cluster.thaw(replica)
            sent = await _drained(app, publishers)
        finally:
            publishers.kill()
    stored = _stored(cluster, keys)
    assert set(stored) == sent
    assert max(stored.values()) == 1


async def test_a_script_is_loaded_again_on_a_promoted_replica(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Redis 7 does not replicate SCRIPT LOAD: the new master answers NOSCRIPT, once."""
    cluster = healed
    settings = _settings(make_settings, cluster, broker, unique)
    keys = Keys.of(settings.redis)
    master = _master_of_shard(cluster, keys, 0)
    replica = cluster.replica_of(master)
    async with running_bridge(settings) as app:
        publishers = Publishers(broker, unique, 2_000, tmp_path)
        await _drained(app, publishers)
        # As a replica that was never a master (an earlier test's failover made it one).
        cluster.client(replica).script_flush()
        await asyncio.to_thread(cluster.failover, replica)
        assert _cached_scripts(cluster, replica) == 0
        publishers = Publishers(broker, f"{unique}-2", 2_000, tmp_path, start_seq=2)
        sent = await _drained(app, publishers)
        assert _cached_scripts(cluster, replica) >= 1
    assert sent <= set(_stored(cluster, keys))


async def test_slots_moved_while_messages_flow_lose_nothing(
    make_settings: Callable[..., Settings], healed: LocalCluster, broker: Service, unique: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    cluster = healed
    settings = _settings(make_settings, cluster, broker, unique)
    keys = Keys.of(settings.redis)
    async with running_bridge(settings) as app:
        publishers = Publishers(broker, unique, 60_000, tmp_path)
        stalls: list[float] = []
        try:
            await _flowing(app, 10_000)
            watch = asyncio.create_task(_longest_stall(app, stalls))
            for shard in (0, 1):
                key = keys.telemetry(ROUTE, shard)
                source = cluster.master_of_key(key)
                target = next(p for p in cluster.masters() if p != source)
                await asyncio.to_thread(cluster.reshard, key, target)
                assert cluster.master_of_key(key) == target
            watch.cancel()
            sent = await _drained(app, publishers)
        finally:
            publishers.kill()
    stored = _stored(cluster, keys)
    print(f"resharding: longest write stall {max(stalls, default=0.0) * 1000:.0f} ms")
    assert set(stored) == sent
    assert max(stored.values()) == 1


async def _longest_stall(app: BridgeApp, stalls: list[float]) -> None:
    """Record how long the acknowledged count stood still while messages were held."""
    last, since = _acked(app), time.monotonic()
    while True:
        await asyncio.sleep(0.01)
        now, acked = time.monotonic(), _acked(app)
        if acked != last or app.in_flight() == 0:
            stalls.append(now - since)
            last, since = acked, now


def _cached_scripts(cluster: LocalCluster, port: int) -> int:
    return int(cluster.client(port).info("memory")["number_of_cached_scripts"])


async def test_two_bridges_share_session_partitions_through_leases_on_the_cluster(
    make_settings: Callable[..., Settings], redis_cluster: LocalCluster, broker: Service,
    unique: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Partition leases are keys of their own slots: each lease script runs per slot."""
    base = _settings(make_settings, redis_cluster, broker, unique)
    partitions = [{"name": f"s{n}", "filters": [f"plant/s{n}/#"]} for n in range(1, 5)]
    bridge = {**base.bridge.model_dump(), "partitions": partitions,
              "partition_coverage": "declared", "partition_lease_ttl_s": 3.0}  # fmt: skip
    settings = [base.model_copy(update={"bridge": base.bridge.model_validate(bridge)})] * 2
    keys = Keys.of(base.redis)
    owned = "iotbridge_bridge_partitions_owned"
    async with running_bridge(settings[0]) as one, running_bridge(settings[1]) as two:
        await wait_for(lambda: sample(one, owned) == sample(two, owned) == 2, 30,
                       "two partitions each")  # fmt: skip
        publishers = Publishers(broker, unique, 8_000, tmp_path, sites=4)
        sent = await asyncio.to_thread(publishers.sent)
        await wait_for(lambda: _acked(one) + _acked(two) >= len(sent), 60, "every message")
        assert _acked(one) > 0
        assert _acked(two) > 0
    stored = _stored(redis_cluster, keys)
    assert set(stored) == sent
    assert max(stored.values()) == 1
