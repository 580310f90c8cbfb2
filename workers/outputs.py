"""The outputs of one batch and the transactions that write them.

Anomaly events, dead letters, the XACK of every entry handled and the checkpoint of every shard
touched go in one MULTI/EXEC: either all land or none does, so the checkpoint always matches the
acknowledged entries, and entries that were not acknowledged are not in the saved state. On one
Redis the whole batch is one transaction; on a Redis Cluster it is one transaction per slot: every
key of shard n (its routes' streams and checkpoints, its anomaly and dead-letter streams, its
leases and this worker's fence key) carries the hash tag `{n}`, and each slot's transaction goes to
the master of that slot. The shards of one transaction land or fail together; the batch's other
transactions land or fail on their own.

A transaction is fenced by the shard leases: the lease keys are WATCHed, then a script reads
them (`_FENCE`) and, if one is not ours, writes a watched key of this worker's own, so EXEC
aborts: a worker that lost a shard (it stalled past the lease TTL and another worker took over)
writes nothing; EXEC also aborts if a lease changes after the check.

Each anomaly is also written at most once (`EMIT_ONCE`): a SET NX PX of a dedup key named after the
source stream and entry, the detector, the value and the event, then the XADD, in one script, so
the write is idempotent whatever happens around it (the dedup key lives `worker.dedup_ttl_s`).
Stream entry ids cannot carry this: an explicit XADD id must exceed the stream's last one. Both
scripts are sent whole with EVAL, never by digest, so a promoted replica with an empty script
cache runs them as they come (a NOSCRIPT cannot happen).

The transactions are sent and their outcome read by `workers.writes`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import chain

from bridge.redis_nodes import slot_of
from config.errors import IotBridgeError
from config.keys import Keys
from workers.anomaly import AnomalyEvent
from workers.state import Shard

EMIT_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
end
return false
"""


class LeaseLost(IotBridgeError):
    """Another worker owns (or nobody owns) a shard of the batch any more: nothing was written."""

    def __init__(self, streams: list[str]) -> None:
        self.streams = streams
        super().__init__(f"lease lost: {', '.join(streams)}")


@dataclass
class Outputs:
    """What one batch writes, shard by shard."""

    events: list[tuple[Shard, AnomalyEvent]] = field(default_factory=list)
    # (shard, reason, fields)
    dead_letters: list[tuple[Shard, str, dict[str, str]]] = field(default_factory=list)
    acks: dict[Shard, list[str]] = field(default_factory=dict)
    checkpoints: dict[Shard, dict[str, str]] = field(default_factory=dict)
    # Where each shard's checkpoint gets to: (last entry id, stream time in ms).
    positions: dict[Shard, tuple[str, int]] = field(default_factory=dict)
    # Entries run through the detectors, per shard.
    processed_by_shard: Counter[Shard] = field(default_factory=Counter)
    # Events raised by the clock (staleness), not by an entry of this batch.
    timed: bool = False

    @property
    def shards(self) -> list[Shard]:
        touched = {*self.acks, *self.checkpoints, *(shard for shard, _ in self.events)}
        return sorted(touched, key=lambda shard: shard.stream)

    @property
    def processed(self) -> Counter[str]:
        """Entries run through the detectors, per route."""
        out: Counter[str] = Counter()
        for shard, count in self.processed_by_shard.items():
            out[shard.route] += count
        return out

    def only(self, shards: Collection[Shard]) -> Outputs:
        """The part of these outputs that `shards` write."""
        return Outputs(
            events=[(shard, event) for shard, event in self.events if shard in shards],
            dead_letters=[letter for letter in self.dead_letters if letter[0] in shards],
            acks={shard: ids for shard, ids in self.acks.items() if shard in shards},
            checkpoints={s: fields for s, fields in self.checkpoints.items() if s in shards},
            positions={s: position for s, position in self.positions.items() if s in shards},
            processed_by_shard=Counter(
                {s: n for s, n in self.processed_by_shard.items() if s in shards}
            ),
            timed=self.timed,
        )

    def __bool__(self) -> bool:
        return bool(self.events or self.dead_letters or self.acks or self.checkpoints)


@dataclass
class Transaction:
    """One MULTI/EXEC of a batch with its fence: WATCH, the fence script, MULTI, the writes and
    EXEC (`commands`). On a cluster every key it names is in one slot."""

    shards: list[Shard]  # whose leases fence it
    commands: list[tuple[str, ...]]
    acks: list[Shard]  # the shards XACKed, in command order
    first_ack: int  # where their replies start among EXEC's

    @property
    def replies(self) -> int:
        return len(self.commands)


def transactions(
    keys: Keys, group: str, owner: str, outputs: Outputs, dedup_ttl_ms: int
) -> list[Transaction]:
    """The transactions that write `outputs`: one on one Redis, one per slot (shard index) with
    `keys.cluster`."""
    shards = outputs.shards
    if not shards:
        return []
    if not keys.cluster:
        return [_transaction(keys, group, owner, shards, outputs, dedup_ttl_ms)]
    by_slot: dict[int, list[Shard]] = {}
    for shard in shards:
        by_slot.setdefault(slot_of(shard.stream), []).append(shard)
    return [
        _transaction(keys, group, owner, part, outputs.only(part), dedup_ttl_ms)
        for part in by_slot.values()
    ]


def _transaction(
    keys: Keys, group: str, owner: str, shards: list[Shard], outputs: Outputs, dedup_ttl_ms: int
) -> Transaction:
    # A batch of one failing entry acks nothing on its shard.
    acks = {shard: ids for shard, ids in outputs.acks.items() if ids}
    leases = [shard.lease for shard in shards]
    fence = keys.worker_fence(group, owner, shards[0].index)
    # While its slot moves, a command naming a key that has left the node (or was never there,
    # as the fence key) is refused (ASK, TRYAGAIN), WATCH and the fence script among them; EXEC
    # checks the keys of every command queued and would still run the writes, unfenced. The
    # watched keys are named in the queue too (EXISTS), so EXEC is refused whenever WATCH was.
    guard = [("EXISTS", fence, *leases)] if keys.cluster else []
    commands = [
        ("WATCH", fence, *leases),
        ("EVAL", _FENCE, str(1 + len(leases)), fence, *leases, owner),
        ("MULTI",),
        *_commands(keys, group, outputs, acks, dedup_ttl_ms),
        *guard,
        ("EXEC",),
    ]
    first_ack = len(outputs.events) + len(outputs.dead_letters)
    return Transaction(shards, commands, list(acks), first_ack)


# KEYS[1] this worker's fence key, then the leases; ARGV owner. Reply: the 1-based indexes of the
# leases that are not ours; if any, the fence key (WATCHed with the leases) is written, so the EXEC
# that follows aborts.
_FENCE = """
local lost = {}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[1] then lost[#lost + 1] = i - 1 end
end
if #lost > 0 then redis.call('SET', KEYS[1], '1', 'PX', 60000) end
return lost
"""


def _commands(
    keys: Keys, group: str, outputs: Outputs, acks: dict[Shard, list[str]], dedup_ttl_ms: int
) -> list[tuple[str, ...]]:
    commands: list[tuple[str, ...]] = []
    for shard, event in outputs.events:
        dedup = keys.anomaly_once(group, shard.route, shard.index, event.source_id,
                                  event.detector, event.value_name, event.event.value)  # fmt: skip
        args = [x for pair in event.to_fields(shard.stream).items() for x in pair]
        anomalies = keys.anomalies_of(shard.index)
        commands.append(("EVAL", EMIT_ONCE, "2", dedup, anomalies, str(dedup_ttl_ms), *args))
    for shard, _, letter in outputs.dead_letters:
        fields = [x for pair in letter.items() for x in pair]
        commands.append(("XADD", keys.worker_dead_letters_of(shard.index), "*", *fields))
    for shard, ids in acks.items():
        commands.append(("XACK", shard.stream, group, *ids))
    for shard, checkpoint in outputs.checkpoints.items():
        commands.append(("HSET", shard.checkpoint, *chain.from_iterable(checkpoint.items())))
    return commands
