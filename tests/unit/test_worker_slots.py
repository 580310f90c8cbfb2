"""On a Redis Cluster every transaction and every lease script of the worker names keys of one hash
slot; on one Redis a batch stays one transaction under the old key names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from bridge.redis_nodes import slot_of
from config.keys import Keys
from workers.anomaly import AnomalyEvent, Event
from workers.leases import Leases
from workers.outputs import EMIT_ONCE, Outputs, transactions
from workers.state import Shard, shards_of

GROUP = "workers"
OWNER = "w1"
ROUTES = ["telemetry", "power"]


def keys_of(command: Sequence[str]) -> list[str]:
    """The keys a command of the worker's transactions names (as COMMAND GETKEYS would say)."""
    name = command[0]
    if name in ("WATCH", "EXISTS"):
        return list(command[1:])
    if name == "EVAL":
        return list(command[3 : 3 + int(command[2])])
    if name in ("XADD", "XACK", "HSET"):
        return [command[1]]
    assert name in ("MULTI", "EXEC"), name
    return []


def batch(shards: list[Shard]) -> Outputs:
    """A batch touching every shard: an anomaly, a dead letter, acks and a checkpoint on each."""
    outputs = Outputs()
    for n, shard in enumerate(shards):
        source_id = f"{n + 1}-0"
        event = AnomalyEvent(Event.START, f"m{n}", shard.route, "threshold", "temperature", 95.0,
                             90.0, 95.0, "1700000000.0", source_id, "critical")  # fmt: skip
        outputs.events.append((shard, event))
        outputs.dead_letters.append((shard, "malformed", {"source_id": f"{n + 1}-1"}))
        outputs.acks[shard] = [source_id, f"{n + 1}-1"]
        outputs.checkpoints[shard] = {"a.m0": "AAAA", "meta": "{}"}
        outputs.processed_by_shard[shard] = 1
    return outputs


@pytest.mark.parametrize("shards", [1, 8])
def test_on_a_cluster_each_transaction_is_one_slot_and_each_shard_index_one_transaction(
    shards: int,
) -> None:
    keys = Keys("iotbridge", shards, cluster=True)
    all_shards = shards_of(keys, GROUP, ROUTES)
    outputs = batch(all_shards)
    found = transactions(keys, GROUP, OWNER, outputs, 60_000)

    assert len(found) == shards  # both routes' shard n share the hash tag {n}
    written: list[tuple[str, ...]] = []
    for transaction in found:
        slots = {slot_of(key) for command in transaction.commands for key in keys_of(command)}
        assert len(slots) == 1, transaction.commands
        assert {s.index for s in transaction.shards} == {transaction.shards[0].index}
        # The watched keys are queued too, so EXEC is refused whenever WATCH was (a moving slot).
        watch, *_, exists, exec_ = transaction.commands
        assert (exists[0], exec_[0]) == ("EXISTS", "EXEC")
        assert exists[1:] == watch[1:]
        written += [c for c in transaction.commands if c[0] in ("EVAL", "XADD", "XACK", "HSET")]
    # Every output of the batch is in one of them, the fence of each transaction besides.
    assert len(written) == len(found) + 4 * len(all_shards)
    streams = {c[4] for c in written if c[:2] == ("EVAL", EMIT_ONCE)}
    assert streams == {keys.anomalies_of(n) for n in range(shards)}
    assert {c[1] for c in written if c[0] == "XADD"} == set(keys.worker_dead_letter_streams())


def test_on_one_redis_a_batch_is_one_transaction_under_the_old_key_names() -> None:
    keys = Keys("iotbridge", 8)
    all_shards = shards_of(keys, GROUP, ROUTES)
    [transaction] = transactions(keys, GROUP, OWNER, batch(all_shards), 60_000)

    assert transaction.shards == sorted(all_shards, key=lambda s: s.stream)
    watched = transaction.commands[0]
    assert watched[:2] == ("WATCH", "iotbridge:worker:workers:members:fence:w1")
    names = {key for command in transaction.commands for key in keys_of(command)}
    assert {"iotbridge:anomalies", "iotbridge:dlq:worker"} <= names
    assert not any(name.startswith(("iotbridge:anomalies:", "iotbridge:dlq:worker:"))
                   for name in names)  # fmt: skip


def test_a_split_batch_keeps_each_shards_outputs_and_counts() -> None:
    keys = Keys("iotbridge", 4, cluster=True)
    all_shards = shards_of(keys, GROUP, ["telemetry"])
    outputs = batch(all_shards)
    part = outputs.only({all_shards[1]})
    assert [shard for shard, _ in part.events] == [all_shards[1]]
    assert list(part.acks) == list(part.checkpoints) == [all_shards[1]]
    assert part.processed == {"telemetry": 1}
    assert outputs.processed == {"telemetry": 4}


class Recorder:
    """Stands for the client: records each EVAL's keys and answers as if every lease were ours
    (renew), free (acquire) or released."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def eval(self, script: str, numkeys: int, *args: Any) -> Any:
        keys = [str(a) for a in args[:numkeys]]
        self.calls.append(keys)
        if "NX" in script:  # acquire: the first ARGV[3] of them
            return list(range(1, min(numkeys, int(args[numkeys + 2])) + 1))
        return list(range(1, numkeys + 1))


@pytest.mark.parametrize("cluster", [True, False])
async def test_lease_scripts_run_once_per_slot_on_a_cluster_and_once_on_one_redis(
    cluster: bool,
) -> None:
    keys = Keys("iotbridge", 8, cluster=cluster)
    shards = shards_of(keys, GROUP, ROUTES)
    leases = Leases(keys.worker_members(GROUP), OWNER, shards, 10_000, by_slot=cluster)
    client: Any = Recorder()

    held = await leases.renew(client, shards)
    taken = await leases.acquire(client, leases.preferred, 5)
    await leases.release(client, shards)

    assert sorted(s.lease for s in held) == sorted(s.lease for s in shards)
    # Taken in the order of preference, as many as wanted.
    assert taken == leases.preferred[:5]
    for keys_named in client.calls:
        assert len({slot_of(key) for key in keys_named}) == 1 or not cluster
    if cluster:
        renewed = client.calls[:8]
        assert sorted(len(named) for named in renewed) == [2] * 8  # both routes of a shard
    else:
        assert len(client.calls) == 3  # renew, acquire, release: one script each
