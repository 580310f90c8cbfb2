"""The outputs of one batch and the transactions that write them.

Anomaly events, dead letters, the XACK of every entry handled and the checkpoint of every shard
touched go in one MULTI/EXEC: either all land or none does, so the checkpoint always matches the
acknowledged entries, and entries that were not acknowledged are not in the saved state. On one
Redis the whole batch is one transaction; on a Redis Cluster it is one transaction per slot: every
key of shard n (its routes' streams and checkpoints, its anomaly and dead-letter streams, its
leases and this worker's fence key) carries the hash tag `{n}`, and each slot's transaction goes to
the master of that slot. The shards of one transaction land or fail together; the batch's other
transactions land or fail on their own (`Written`).

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

With `redis.durability`, a WAIT (or WAITAOF) follows the transactions on the same connection: a
transaction counts as written only once the replicas confirm it (`bridge.sink.check_wait`).

WATCH, the check, MULTI, the commands and EXEC go in one request per Redis, so `send` puts a batch
on its way and `Sent.settle` reads the replies later: the worker processes the next batch meanwhile
(one write in flight at most, `workers.consumer`). The transaction is packed into RESP here
(hiredis' C packer) and sent on one pooled connection: redis-py's pipeline packs every argument in
Python, and a 500-entry batch has two arguments per entry (its XACK id, its asset's checkpoint
row). Measured on 50,000 entries: 0.58 s of packing in redis-py, 0.04 s in hiredis. (One Lua script
doing all the writes was measured too: 450-550 µs of Redis per 500-entry batch against 77 µs for
the MULTI/EXEC, the cost of passing a thousand arguments into Lua.)
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from hiredis import pack_command
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from bridge.redis_nodes import slot_of
from bridge.sink import ReplicasBehind, check_wait, wait_command
from config.errors import DependencyUnavailable, IotBridgeError
from config.keys import Keys
from config.settings import DurabilitySettings
from workers.anomaly import AnomalyEvent
from workers.placement import Placement
from workers.state import Shard

T = TypeVar("T")
log = logging.getLogger(__name__)
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


@dataclass
class Written:
    """The outcome of a batch's transactions: the shards written (with the entries XACK
    acknowledged on each), and why the others were not, if any were not: `LeaseLost` naming the
    shards no longer ours, else an error whose outcome is unknown (the connection broke around
    EXEC, the replicas did not confirm, a slot moved)."""

    landed: set[Shard] = field(default_factory=set)
    acked: dict[Shard, int] = field(default_factory=dict)
    error: BaseException | None = None
    # Transactions that landed and that the replicas did not confirm in time (error: ReplicasBehind).
    unconfirmed: list[Unconfirmed] = field(default_factory=list)


@dataclass
class Unconfirmed:
    """Transactions that landed on a Redis whose replicas did not confirm them in time, with the
    connection that wrote them, kept open: WAIT only waits for the writes of its own connection."""

    client: Redis
    conn: Any
    durability: DurabilitySettings
    shards: set[Shard] = field(default_factory=set)
    acked: dict[Shard, int] = field(default_factory=dict)

    async def confirm(self) -> None:
        """WAIT again: returns once the replicas confirm the transactions; `ReplicasBehind` while
        they do not (the connection is kept for another try); any other error means the
        connection broke (closed: whether the replicas have them is unknown)."""
        try:
            await self.conn.send_packed_command(wait_command(self.durability), check_health=False)
            reply = await self.conn.read_response()
        except BaseException:
            await self.close()
            raise
        check_wait(reply, self.durability)
        conn, self.conn = self.conn, None
        await self.client.connection_pool.release(conn)

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect()
            await self.client.connection_pool.release(conn)


@dataclass
class _Part:
    """The transactions sent on one connection to one Redis (one master of a cluster)."""

    client: Redis
    transactions: list[Transaction] = field(default_factory=list)
    conn: Any = None


class Sent:
    """A batch's transactions on their way: sent, their replies not read yet (`settle`)."""

    def __init__(self, parts: list[_Part], owner: str, durability: DurabilitySettings) -> None:
        self._parts = parts
        self._owner = owner
        self._durability = durability
        self._waits = bool(wait_command(durability))
        self._settled = False

    async def settle(self) -> Written:
        """Read the outcome of every transaction."""
        if self._settled:
            raise RuntimeError("a transaction is settled once")
        self._settled = True
        if len(self._parts) == 1:
            results = [await _caught(self._settle_part(self._parts[0]))]
        else:
            # Every part is read to its end: none is cancelled because another failed.
            results = await asyncio.gather(*(_caught(self._settle_part(p)) for p in self._parts))
        written = Written()
        errors: list[BaseException] = []
        for part, result in zip(self._parts, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(result)  # every transaction of the part: outcome unknown
                continue
            outcomes, unconfirmed = result
            if unconfirmed is not None:
                written.unconfirmed.append(unconfirmed)
            for transaction, outcome in zip(part.transactions, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    errors.append(outcome)
                else:
                    written.landed.update(transaction.shards)
                    written.acked.update(outcome)
        written.error = _first(errors)
        return written

    async def _settle_part(
        self, part: _Part
    ) -> tuple[list[dict[Shard, int] | BaseException], Unconfirmed | None]:
        """The outcome of each transaction of the part, and those that landed unconfirmed."""
        conn, part.conn = part.conn, None
        pool = part.client.connection_pool
        try:
            replies = [await _replies(conn, t.replies) for t in part.transactions]
            confirmed = (await _replies(conn, 1))[0] if self._waits else None
        except BaseException:
            # Replies may be left unread on it: never reuse it.
            await conn.disconnect()
            await pool.release(conn)
            raise
        # Every reply was read: the connection is in step, whatever the outcome.
        outcomes: list[dict[Shard, int] | BaseException] = []
        unconfirmed = None
        try:
            for transaction, replied in zip(part.transactions, replies, strict=True):
                try:
                    outcomes.append(await self._outcome(part.client, transaction, replied))
                except (IotBridgeError, RedisError, OSError) as exc:
                    outcomes.append(exc)
            if self._waits:
                try:
                    # The replicas confirm every write of this connection so far, or none counts.
                    check_wait(_raised(confirmed), self._durability)
                except RedisError as exc:  # ReplicasBehind, or WAIT refused
                    landed = [(t, o) for t, o in zip(part.transactions, outcomes, strict=True)
                              if isinstance(o, dict)]  # fmt: skip
                    if landed and isinstance(exc, ReplicasBehind):
                        # Kept with its connection: WAIT again on it says when they are confirmed.
                        unconfirmed = Unconfirmed(part.client, conn, self._durability)
                        for transaction, acked in landed:
                            unconfirmed.shards.update(transaction.shards)
                            unconfirmed.acked.update(acked)
                    outcomes = [exc if isinstance(o, dict) else o for o in outcomes]
        except BaseException:
            await pool.release(conn)
            raise
        if unconfirmed is None:
            await pool.release(conn)
        return outcomes, unconfirmed

    async def _outcome(
        self, client: Redis, transaction: Transaction, replies: list[Any]
    ) -> dict[Shard, int]:
        """The entries XACK acknowledged per shard, from one transaction's replies."""
        *queued, results = replies
        lost_at = queued[1]
        if isinstance(lost_at, list) and lost_at:
            raise LeaseLost([transaction.shards[int(i) - 1].stream for i in lost_at])
        refused = next((r for r in queued if isinstance(r, BaseException)), None)
        if refused is not None and not isinstance(results, list):
            # Refused before EXEC (a MOVED, a CLUSTERDOWN): EXEC discarded the whole transaction.
            raise refused
        if refused is not None:
            # EXEC ran all the same: what it wrote is written, and counted.
            log.warning("a transaction ran though a command before it was refused",
                        extra={"error": str(refused), "shards": len(transaction.shards)})  # fmt: skip
        if results is None:
            # A lease changed after the check.
            shards = transaction.shards
            owners = await client.mget([shard.lease for shard in shards])
            lost = [s.stream for s, held in zip(shards, owners, strict=True) if held != self._owner]
            if lost:
                raise LeaseLost(lost)
            raise DependencyUnavailable("redis: transaction aborted, leases still ours")
        if isinstance(results, BaseException):
            raise results
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        first = transaction.first_ack
        counts = results[first : first + len(transaction.acks)]
        # XACK counts only entries still pending, so the metric says what really happened.
        return {shard: int(n) for shard, n in zip(transaction.acks, counts, strict=True)}

    async def abandon(self) -> None:
        """Give up on the replies (the outcome stays unknown): the connections are closed."""
        self._settled = True
        for part in self._parts:
            conn, part.conn = part.conn, None
            if conn is not None:
                await conn.disconnect()
                await part.client.connection_pool.release(conn)


def _raised(reply: object) -> object:
    """`reply`, unless it is an error reply: raised."""
    if isinstance(reply, BaseException):
        raise reply
    return reply


async def _caught(settling: Awaitable[T]) -> T | Exception:
    """What `settling` returns, or the Redis error it raised (a bug still raises)."""
    try:
        return await settling
    except (RedisError, OSError, IotBridgeError) as exc:
        return exc


def _first(errors: list[BaseException]) -> BaseException | None:
    """The error to act on: one whose outcome is unknown before a lost lease (after it every
    shard is reloaded anyway), the lost leases together."""
    unknown = [e for e in errors if not isinstance(e, LeaseLost)]
    if unknown:
        return unknown[0]
    lost = [stream for e in errors if isinstance(e, LeaseLost) for stream in e.streams]
    return LeaseLost(lost) if lost else None


async def _replies(conn: Any, count: int) -> list[Any]:
    """`count` replies read in turn; an error reply is returned, not raised, so every reply of the
    request is read and the connection stays in step."""
    out: list[Any] = []
    for _ in range(count):
        try:
            out.append(await conn.read_response())
        except ResponseError as exc:
            out.append(exc)
    return out


async def commit(
    placement: Placement, keys: Keys, group: str, owner: str, outputs: Outputs,
    dedup_ttl_ms: int, durability: DurabilitySettings | None = None,
) -> dict[Shard, int]:  # fmt: skip
    """Write `outputs` if this worker still holds every lease involved; the entries XACK
    acknowledged, per shard.

    `LeaseLost` names the shards no longer ours; `DependencyUnavailable` means the outcome is
    unknown (the connection broke around EXEC). Either way the caller must reload the state of
    the batch's shards from their checkpoints, which always match what was acknowledged."""
    sent = await send(placement, keys, group, owner, outputs, dedup_ttl_ms, durability)
    written = await sent.settle()
    if written.error is not None:
        raise written.error
    return written.acked


async def send(
    placement: Placement, keys: Keys, group: str, owner: str, outputs: Outputs,
    dedup_ttl_ms: int, durability: DurabilitySettings | None = None,
) -> Sent:  # fmt: skip
    """`commit` without waiting for the replies: the transactions are on their way when this
    returns and `Sent.settle` reads their outcome, so the next batch can be processed meanwhile."""
    durability = durability or DurabilitySettings()
    parts: dict[int, _Part] = {}
    for transaction in transactions(keys, group, owner, outputs, dedup_ttl_ms):
        client = await placement.master(transaction.shards[0].stream)
        parts.setdefault(id(client), _Part(client)).transactions.append(transaction)
    sent = Sent(list(parts.values()), owner, durability)
    wait = wait_command(durability)
    try:
        for part in sent._parts:
            pool = part.client.connection_pool
            part.conn = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
            packed = [_pack(command) for t in part.transactions for command in t.commands]
            await part.conn.send_packed_command(b"".join(packed) + wait, check_health=False)
    except BaseException:
        await sent.abandon()
        raise
    return sent


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
        commands.append(("HSET", shard.checkpoint, *(x for p in checkpoint.items() for x in p)))
    return commands


def _pack(args: tuple[str, ...]) -> bytes:
    # hiredis' stub types the argument as a 1-tuple; it takes a tuple of any length.
    return cast("bytes", pack_command(args))  # type: ignore[arg-type]
