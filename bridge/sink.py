"""The sink: a batch of appends to the telemetry and dead-letter streams in one atomic round trip.

One Lua script per batch checks each telemetry entry's `(asset, seq)` against the per-asset dedup
state and appends it only when new, so the dedup decision and the XADD happen in the same atomic
step: a batch written twice (a crash between the write and the acks, then the broker's redelivery)
leaves one copy. The caller acknowledges the batch's messages only after `write` returns; any
Redis failure becomes SinkUnavailable (retryable) and nothing of the batch may be acknowledged.

Dedup state is one hash field per asset (`iotbridge:dedup:<route>`): the highest `seq` seen, the
device time of that message, and a ring of 1,024 bits for the sequence numbers just below it.
Memory is O(assets) (about 200 bytes each), not O(messages), and it never expires:
- seq above the high-water mark: new; the ring slides;
- seq at or below it with a device time newer than the high-water message: the device restarted
  (seq back to 0); the ring restarts;
- within the ring: its bit says whether the seq was seen;
- older than the ring: written, and counted as unverifiable (flag 2). Dropping it could lose real
  data: bridges sharing a subscription deliver one asset's messages out of order, one bridge far
  behind the other. A redelivery after a crash is never that old: what was written and not yet
  acknowledged is at most `batch.pipeline` batches (default 2 x 500).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from bridge.redis_nodes import Address, Nodes, connect, redis_client, slot_of
from config.errors import ConfigError, ConfigProblem, DependencyUnavailable, SinkUnavailable
from config.settings import DurabilitySettings, RedisSettings

log = logging.getLogger(__name__)

# Policies under which Redis may delete a stream to make room: every XADD would still succeed.
_EVICTING = {"allkeys-lru", "allkeys-lfu", "allkeys-random"}

# ARGV per entry: stream key index, dedup key index (0: none), asset, seq, ts, field count, fields.
# seq and ts are stored back as the text they came in: Lua's tostring would print 1e+15 for big seqs.
_APPEND_SCRIPT = """
local W = 1024
local EMPTY = string.rep('\\0', W / 8)
local function getbit(ring, p)
  return bit.band(string.byte(ring, math.floor(p / 8) + 1), bit.lshift(1, p % 8)) ~= 0
end
local function setbit(ring, p, on)
  local i = math.floor(p / 8) + 1
  local byte, mask = string.byte(ring, i), bit.lshift(1, p % 8)
  if on then byte = bit.bor(byte, mask) else byte = bit.band(byte, bit.bnot(mask)) end
  return string.sub(ring, 1, i - 1) .. string.char(byte) .. string.sub(ring, i + 1)
end
-- Clears `count` (< W) positions from `first` on, wrapping: whole bytes at once, so a device
-- whose seq jumps by hundreds costs a few string operations, not one per skipped seq.
local function clear(ring, first, count)
  while count > 0 do
    local p = first % W
    if p % 8 == 0 and count >= 8 then
      local n = math.min(math.floor(count / 8), (W - p) / 8)
      local i = p / 8 + 1
      ring = string.sub(ring, 1, i - 1) .. string.rep('\0', n) .. string.sub(ring, i + n)
      first, count = first + n * 8, count - n * 8
    else
      ring = setbit(ring, p, false)
      first, count = first + 1, count - 1
    end
  end
  return ring
end
local out = {}
local i = 1
while i <= #ARGV do
  local stream, dedup = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local first = i + 6
  local last = first + tonumber(ARGV[i + 5]) - 1
  local flag = 1
  if dedup > 0 then
    -- The high-water mark is kept as the text it arrived in (seq as %d, ts as Python's repr:
    -- both read back exactly by tonumber), so the state is written back by one concatenation,
    -- the ring's new byte included: string.format and a separate setbit string cost 0.5-2 us/msg
    -- of Redis's CPU (measured on 500-entry batches over 1,000 assets).
    local asset, seqs, tss = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    local seq, ts = tonumber(seqs), tonumber(tss)
    local hws, hwtss, ring = seqs, tss, EMPTY
    local state = redis.call('HGET', KEYS[dedup], asset)
    if state then
      local space = string.find(state, ' ', 1, true)
      local cut = string.find(state, '\\n', space, true)
      hws, hwtss = string.sub(state, 1, space - 1), string.sub(state, space + 1, cut - 1)
      ring = string.sub(state, cut + 1)
      local hw, hwts = tonumber(hws), tonumber(hwtss)
      if seq > hw then
        if seq - hw >= W then
          ring = EMPTY
        elseif seq - hw > 1 then
          ring = clear(ring, hw + 1, seq - hw - 1)
        end
        hws = seqs
        if ts > hwts then hwtss = tss end
      elseif ts > hwts then
        hws, hwtss, ring = seqs, tss, EMPTY
      elseif hw - seq >= W then
        flag = 2
      elseif getbit(ring, seq % W) then
        flag = 0
      end
    end
    if flag == 1 then
      local p = seq % W
      local at = math.floor(p / 8) + 1
      local byte = bit.bor(string.byte(ring, at), bit.lshift(1, p % 8))
      redis.call('HSET', KEYS[dedup], asset, hws .. ' ' .. hwtss .. '\\n' ..
        string.sub(ring, 1, at - 1) .. string.char(byte) .. string.sub(ring, at + 1))
    end
  end
  if flag > 0 then
    redis.call('XADD', KEYS[stream], '*', unpack(ARGV, first, last))
  end
  out[#out + 1] = flag
  i = last + 1
end
return out
"""

# The same script answering each written entry's stream id instead of its flag (0 still: a
# duplicate): for callers that report the id, such as the HTTP gateway. Flag 2 (written, older
# than the dedup window) is then not told apart from 1.
_APPEND_SCRIPT_IDS = _APPEND_SCRIPT.replace(
    "    redis.call('XADD', KEYS[stream], '*', unpack(ARGV, first, last))",
    "    flag = redis.call('XADD', KEYS[stream], '*', unpack(ARGV, first, last))",
)
assert _APPEND_SCRIPT_IDS != _APPEND_SCRIPT


@dataclass(slots=True)  # not frozen: built once per message, and frozen costs 3x
class Dedup:
    """Where and by what an entry is deduplicated."""

    key: str
    asset: str
    seq: int
    ts: float
    # asset, seq and ts as the script's three RESP arguments, when the intake has them packed
    # already (empty: packed by the sink).
    packed: bytes = field(default=b"", compare=False, repr=False)


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def dedup_args(asset: bytes, seq: int, ts: float) -> bytes:
    """An entry's asset, seq and ts as the script reads them (and stores seq and ts back)."""
    seq_text, ts_text = b"%d" % seq, repr(ts).encode()
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(asset), asset, len(seq_text), seq_text, len(ts_text), ts_text)  # fmt: skip


def pack_fields(fields: Sequence[bytes | str]) -> bytes:
    """Field/value pairs as RESP bulk strings, ready to follow the field count in EVALSHA."""
    return b"".join([bulk(f.encode() if isinstance(f, str) else f) for f in fields])


@dataclass(slots=True)  # not frozen, like Dedup
class Append:
    """One XADD: a stream key, its field/value pairs as RESP (`count` bulk strings in `packed`),
    and its dedup identity (or None). Packed once, where the entry is built."""

    stream: str
    count: int
    packed: bytes
    dedup: Dedup | None = None

    @classmethod
    def of(cls, stream: str, fields: Sequence[bytes | str], dedup: Dedup | None = None) -> Append:
        return cls(stream, len(fields), pack_fields(fields), dedup)

    def fields(self) -> list[bytes]:
        """The field/value pairs back from RESP (for tests and tools, not the hot path)."""
        out, pos = [], 0
        for _ in range(self.count):
            end = self.packed.index(b"\r\n", pos)
            size = int(self.packed[pos + 1 : end])
            out.append(self.packed[end + 2 : end + 2 + size])
            pos = end + 4 + size
        return out


def _bulk(value: str) -> bytes:
    return bulk(value.encode())


class ReplicasBehind(RedisError):
    """Fewer replicas than `redis.durability.replicas` confirmed a write in time."""


def wait_command(durability: DurabilitySettings) -> bytes:
    """The WAIT (or WAITAOF) that follows a write on its connection, in RESP; b"" for none."""
    if durability.fsync:
        args: tuple[str, ...] = ("WAITAOF", "1", str(durability.replicas))
    elif durability.replicas:
        args = ("WAIT", str(durability.replicas))
    else:
        return b""
    args += (str(durability.timeout_ms),)
    return b"*%d\r\n" % len(args) + b"".join(_bulk(arg) for arg in args)


def has_waitaof(version: str) -> bool:
    """Whether a server of this `redis_version` has WAITAOF (Redis 7.2; Valkey says 7.2.4)."""
    numbers = tuple(int(n) for n in version.split(".")[:2] if n.isdigit())
    return numbers >= (7, 2)


def check_wait(reply: object, durability: DurabilitySettings) -> None:
    """Raise ReplicasBehind unless the reply of `wait_command` confirms what was asked."""
    wanted, ms = durability.replicas, durability.timeout_ms
    if durability.fsync:
        local, replicas = (int(n) for n in reply)  # type: ignore[attr-defined]  # a RESP array
        if local < 1 or replicas < wanted:
            raise ReplicasBehind(
                f"the write reached the append-only file of {local} of 1 master and {replicas} "
                f"of {wanted} replicas within {ms} ms"
            )
    elif int(reply) < wanted:  # type: ignore[call-overload]  # a RESP integer
        raise ReplicasBehind(f"{reply} of {wanted} replicas confirmed the write within {ms} ms")


async def read_replies(conn: Connection, count: int) -> list[object]:
    """`count` replies read in turn; an error reply is returned, not raised, so every reply of a
    request is read and the connection stays in step."""
    out: list[object] = []
    for _ in range(count):
        try:
            out.append(await conn.read_response())
        except ResponseError as exc:
            out.append(exc)
    return out


_NO_DEDUP = b"".join(_bulk(v) for v in ("0", "", "0", "0"))


class RedisSink:
    """Writes batches with one pre-packed EVALSHA over a pooled redis-py connection.

    The key table is fixed at start (every stream and dedup key the bridge may write), so each
    entry's arguments can be packed without looking at the rest of the batch: redis-py's generic
    command packing cost a quarter of the bridge's CPU when it packed every argument itself.
    """

    def __init__(
        self, settings: RedisSettings, keys: Sequence[str], *, entry_ids: bool = False,
        client: aioredis.Redis | None = None,
    ) -> None:  # fmt: skip
        """`entry_ids`: `write_ids` answers each written entry's id (`write` is then unusable).
        `client`: the Redis to write to (one node of a cluster), kept open by `close`."""
        self._redis = client or redis_client(settings)
        self._owns_client = client is None
        self._durability = settings.durability
        self._wait = wait_command(settings.durability)
        self._keys = list(keys)
        self._index = {key: _bulk(str(i + 1)) for i, key in enumerate(self._keys)}
        self._script = _APPEND_SCRIPT_IDS if entry_ids else _APPEND_SCRIPT
        self._sha = hashlib.sha1(self._script.encode()).hexdigest()  # noqa: S324 -- Redis names scripts by SHA-1
        self._head = _bulk("EVALSHA") + _bulk(self._sha) + _bulk(str(len(self._keys)))
        self._head += b"".join(_bulk(k) for k in self._keys)
        # Batches go out on one connection of their own (see _execute); the pool serves the rest.
        self._conn: Connection | None = None
        self._connecting = asyncio.Lock()
        # Held while a command is written and while the connection is closed: a caller whose
        # connection an earlier caller's failure is dropping must not write to it meanwhile.
        self._sending = asyncio.Lock()
        self._turn: asyncio.Future[None] | None = None  # the last caller's: done once it has read
        self._generation = 0  # of the connection: a new one, or a dropped one, moves it on

    @property
    def client(self) -> aioredis.Redis:
        return self._redis

    def pack(self, appends: Sequence[Append]) -> bytes:
        """The whole EVALSHA command for a batch, in RESP."""
        parts = []
        args = 3 + len(self._keys)
        index = self._index
        for a in appends:
            d = a.dedup
            count = b"%d" % a.count
            if d is None:
                head = index[a.stream] + _NO_DEDUP
            elif d.packed:
                head = index[a.stream] + index[d.key] + d.packed
            else:
                head = index[a.stream] + index[d.key] + dedup_args(d.asset.encode(), d.seq, d.ts)
            parts.append(b"%b$%d\r\n%b\r\n%b" % (head, len(count), count, a.packed))
            args += 6 + a.count
        return b"*%d\r\n" % args + self._head + b"".join(parts)

    async def check(self) -> None:
        """Ping, load the script, and refuse a Redis that would evict streams or cannot give the
        durability asked for (ConfigError). What a least-privilege user may not read (CONFIG,
        INFO) is not checked: the operator owns it then, and a warning names it."""
        try:
            await self._redis.ping()
            await self._redis.script_load(self._script)
        except (RedisError, OSError) as exc:
            raise SinkUnavailable(f"redis: {exc}") from exc
        await self._checked("durability", self._check_durability())
        await self._checked("maxmemory-policy", self._check_policy())

    async def _checked(self, what: str, check: Coroutine[Any, Any, None]) -> None:
        try:
            await check
        except ResponseError as exc:
            log.warning("cannot check %s, not checked", what, extra={"error": str(exc)})
        except (RedisError, OSError) as exc:
            raise SinkUnavailable(f"redis: {exc}") from exc

    async def _check_policy(self) -> None:
        policy = (await self._redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        if isinstance(policy, bytes):
            policy = policy.decode()
        if policy in _EVICTING:
            raise ConfigError([ConfigProblem(
                "redis", f"maxmemory-policy is {policy}: Redis would silently evict telemetry "
                "streams; set it to noeviction (or a volatile-* policy)")])  # fmt: skip

    async def _check_durability(self) -> None:
        """Refuse `durability.fsync` on a Redis without WAITAOF (before 7.2); say when fewer
        replicas are connected than each write waits for (it is held until they are)."""
        durability = self._durability
        if durability.fsync:
            version = (await self._redis.info("server")).get("redis_version", "0")
            if not has_waitaof(str(version)):
                raise ConfigError([ConfigProblem(
                    "redis.durability.fsync", "this Redis has no WAITAOF (Redis 7.2+): set fsync "
                    "to false, or upgrade Redis")])  # fmt: skip
        if durability.replicas:
            info = await self._redis.info("replication")
            connected = int(info.get("connected_slaves", 0))
            if connected < durability.replicas:
                log.warning(
                    "fewer replicas connected than redis.durability.replicas: writes are not "
                    "acknowledged until enough confirm them",
                    extra={"connected": connected, "wanted": durability.replicas},
                )

    async def _execute(self, command: bytes, count: int = 1) -> list[object]:
        """Send a command on the sink's own connection and read its reply, in call order.

        Several batches may be in flight on the connection at once: Redis answers one client's
        commands in the order it sent them, so each caller reads after the one before it has
        read. Any other failure than an error reply (or a cancellation) drops the connection, so
        no later caller can read a reply that is not its own; they fail too, and their batches
        are written again.
        """
        conn = self._conn
        if conn is None:
            async with self._connecting:
                if self._conn is None:
                    pool = self._redis.connection_pool
                    self._conn = await pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
                    self._generation += 1
                conn = self._conn
        generation = self._generation
        previous, turn = self._turn, asyncio.get_running_loop().create_future()
        self._turn = turn
        try:
            await self._send(conn, generation, command)
            if previous is not None:
                # Shielded: cancelling this caller must not cancel the turn of the one before.
                await asyncio.shield(previous)
            # An earlier caller's failure dropped the connection (the same object may be back
            # from the pool, reconnected): this reply is lost with it.
            lost = generation != self._generation or self._conn is None
            # An error reply (NOSCRIPT, OOM, MOVED) is read whole: the connection stays in step.
            replies = None if lost else await read_replies(conn, count)
        except BaseException:
            await self._drop(conn)
            raise
        finally:
            if not turn.done():
                turn.set_result(None)
        if replies is None:  # lost
            raise RedisConnectionError("the connection failed before this reply was read")
        return replies

    async def _send(self, conn: Connection, generation: int, command: bytes) -> None:
        """Write a command, unless the connection was dropped since this caller took it (an
        earlier caller failed): redis-py would write to a closed stream, or reconnect a
        connection that is back in the pool."""
        async with self._sending:
            if generation != self._generation:
                raise RedisConnectionError("the connection failed before this command was sent")
            await conn.send_packed_command(command, check_health=False)

    async def _drop(self, conn: Connection) -> None:
        if conn is self._conn:
            self._conn = None
            self._generation += 1
            async with self._sending:  # a write under way ends first; later ones see the drop
                await conn.disconnect()
            await self._redis.connection_pool.release(conn)

    async def write(self, appends: Sequence[Append]) -> tuple[list[int], float]:
        """Append a batch atomically: per entry 1 (written), 0 (a duplicate, not written) or 2
        (written, older than the dedup window), and the seconds it took. Raises SinkUnavailable: nothing may be acknowledged, and a retry is
        safe for telemetry (a batch applied before its reply was lost is deduplicated)."""
        written, duration = await self._write(appends)
        return [int(flag) for flag in written], duration

    async def write_ids(self, appends: Sequence[Append]) -> tuple[list[bytes | None], float]:
        """As `write`, on a sink built with `entry_ids`: per entry its stream id when written,
        None when a duplicate."""
        written, duration = await self._write(appends)
        return [flag if isinstance(flag, bytes) else None for flag in written], duration

    async def _run(self, command: bytes) -> list[int | bytes]:
        """The script's reply; with durability, only once the replicas confirmed it (WAIT on
        the same connection, sent with it: redis-py's own `wait` may take another connection,
        whose writes are not these)."""
        replies = await self._execute(command, 2 if self._wait else 1)
        failed = next((r for r in replies if isinstance(r, ResponseError)), None)
        if failed is not None:
            raise failed
        if self._wait:
            check_wait(replies[1], self._durability)
        return cast("list[int | bytes]", replies[0])  # the script's array

    async def _write(self, appends: Sequence[Append]) -> tuple[list[int | bytes], float]:
        if not appends:
            return [], 0.0
        started = time.perf_counter()
        command = self.pack(appends) + self._wait
        try:
            try:
                written = await self._run(command)
            except NoScriptError:
                # Redis restarted (scripts are not persisted): load it and try once more. With
                # several batches in flight each does so; their entries may then land in another
                # order than they were sent (their acks still leave in order).
                await self._redis.script_load(self._script)
                written = await self._run(command)
        except (RedisError, OSError) as exc:
            raise SinkUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return written, time.perf_counter() - started

    async def close(self) -> None:
        if self._conn is not None:
            await self._drop(self._conn)
        if self._owns_client:
            await self._redis.aclose()


def slot_groups(keys: Sequence[str]) -> dict[int, list[str]]:
    """`keys` by hash slot: on a cluster, one script may name the keys of one group only."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(slot_of(key), []).append(key)
    return groups


class ClusterSink:
    """RedisSink's batches on a Redis Cluster.

    A batch is split by hash slot (a shard's telemetry streams and dedup states share its hash
    tag; the dead-letter stream has a slot of its own) and each part is written by the RedisSink
    of its slot, on its own connection to the slot's master, every part at once: each part is one
    atomic script in one slot, followed by its WAIT. The batch is stored when every part is; a
    part that fails fails the batch, which is written again whole (the parts already stored are
    then duplicates, which the dedup drops; a dead letter may be stored twice). Any failure marks
    the slot table stale: a MOVED, an ASK or a TRYAGAIN while a slot moves, a master gone in a
    failover are all followed on the retry, never dead-lettered, never acknowledged early.
    """

    def __init__(
        self, settings: RedisSettings, keys: Sequence[str], *, entry_ids: bool = False
    ) -> None:
        self._settings = settings
        self._entry_ids = entry_ids
        self._slot = {key: slot_of(key) for key in keys}
        self._by_slot = slot_groups(keys)
        self._nodes = Nodes(settings)
        self._sinks: dict[int, tuple[Address, RedisSink]] = {}
        self._client = connect(settings)

    @property
    def client(self) -> aioredis.Redis:
        """The cluster client, for the single-key commands beside the batches."""
        return self._client

    async def check(self) -> None:
        """What `RedisSink.check` does, on every master."""
        try:
            await self._nodes.refresh()
        except DependencyUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc
        for address in self._nodes.masters:
            client = self._nodes.client(address)
            await RedisSink(self._settings, [], entry_ids=self._entry_ids, client=client).check()

    async def _sink(self, slot: int) -> RedisSink:
        """The sink of one slot, on the connection to its master by the current table."""
        if self._nodes.stale:
            await self._nodes.refresh()
        keys = self._by_slot[slot]
        address = self._nodes.address(keys[0])
        held = self._sinks.get(slot)
        if held is not None and held[0] == address:
            return held[1]
        if held is not None:
            await held[1].close()  # its connection; the node's client stays
        sink = RedisSink(
            self._settings, keys, entry_ids=self._entry_ids, client=self._nodes.client(address)
        )
        self._sinks[slot] = (address, sink)
        return sink

    async def write(self, appends: Sequence[Append]) -> tuple[list[int], float]:
        """As `RedisSink.write`."""
        written, duration = await self._write(appends)
        return [int(flag) for flag in written], duration

    async def write_ids(self, appends: Sequence[Append]) -> tuple[list[bytes | None], float]:
        """As `RedisSink.write_ids`."""
        written, duration = await self._write(appends)
        return [flag if isinstance(flag, bytes) else None for flag in written], duration

    async def _write(self, appends: Sequence[Append]) -> tuple[list[int | bytes], float]:
        started = time.perf_counter()
        parts: dict[int, list[int]] = {}
        for i, append in enumerate(appends):
            parts.setdefault(self._slot[append.stream], []).append(i)
        try:
            sinks = [await self._sink(slot) for slot in parts]
        except DependencyUnavailable as exc:
            raise SinkUnavailable(str(exc)) from exc
        results = await asyncio.gather(
            *(
                sink._write([appends[i] for i in part])
                for sink, part in zip(sinks, parts.values(), strict=True)
            ),
            return_exceptions=True,
        )
        out: list[int | bytes] = [0] * len(appends)
        for part, result in zip(parts.values(), results, strict=True):
            if isinstance(result, BaseException):
                self._nodes.stale = True
                raise result
            for i, flag in zip(part, result[0], strict=True):
                out[i] = flag
        return out, time.perf_counter() - started

    async def close(self) -> None:
        for _, sink in self._sinks.values():
            await sink.close()
        self._sinks = {}
        await self._nodes.close()
        await self._client.aclose()


Sink = RedisSink | ClusterSink


def make_sink(settings: RedisSettings, keys: Sequence[str], *, entry_ids: bool = False) -> Sink:
    """The sink for `redis.cluster` or one Redis, writing to the streams and dedup states `keys`."""
    if settings.cluster:
        return ClusterSink(settings, keys, entry_ids=entry_ids)
    return RedisSink(settings, keys, entry_ids=entry_ids)
