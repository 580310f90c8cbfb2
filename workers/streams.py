"""The stream commands of the worker and their replies across Redis versions and protocols:
consumer groups, reads of new entries, claims of pending ones with their delivery counts, and the
group's lag. Library errors that pass with time become `DependencyUnavailable` here, a Redis
Cluster's among them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast, overload

from hiredis import pack_command
from redis.asyncio import Redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    CrossSlotTransactionError,
    InvalidPipelineStack,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.sink import ReplicasBehind
from config.errors import DependencyUnavailable
from workers.placement import Placement
from workers.sample import Fields

# XREADGROUP id: entries never delivered to the group.
NEW = ">"
# XAUTOCLAIM cursor: the start of the pending entries list, and the reply's "scan complete".
SCAN_START = "0-0"

# Down, restarting (LOADING is a BusyLoadingError, a ConnectionError), stalled past socket_timeout,
# a replica after a failover (READONLY), replicas that did not confirm a write in time; on a
# cluster also a failover under way (CLUSTERDOWN, MASTERDOWN), a slot that moved or is moving
# (MOVED and ASK, TRYAGAIN for a multi-key command in it), and the cluster client's own "no node
# reachable" and "slot not covered" (RedisClusterException): all pass with time, so all are
# retried. CROSSSLOT is not among them: it would be a bug in the key layout.
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    ReplicasBehind,
    ClusterDownError,
    AskError,
    TryAgainError,
    RedisClusterException,
)
# The cluster client's errors that are bugs of the caller, not states of the cluster.
_MISUSE = (CrossSlotTransactionError, InvalidPipelineStack)

# (entry id, fields); fields are None for a pending entry that was trimmed or deleted. New entries
# come as the flat list Redis answers (`read_new`), claimed ones as a dict.
Entry = tuple[str, Fields | None]


class NewEntries(Sequence[Entry]):
    """New entries as an XREADGROUP reply read without decoding holds them: `raw`, the id and the
    flat `[name, value, ...]` list of each as bytes. Looked at as a sequence, each entry is
    decoded (UTF-8, as the client decodes) when it is looked at; the column-wise path
    (`workers.columns`) reads `raw` and decodes only what it keeps as text (measured: decoding
    every field in the reply parser was a quarter of its time)."""

    __slots__ = ("_text", "raw")

    def __init__(self, raw: list[tuple[bytes, list[bytes]]]) -> None:
        self.raw = raw
        self._text: list[Entry] | None = None

    def __len__(self) -> int:
        return len(self.raw)

    @overload
    def __getitem__(self, index: int) -> Entry: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Entry]: ...
    def __getitem__(self, index: int | slice) -> Entry | Sequence[Entry]:
        if isinstance(index, slice):
            return self.text()[index]
        return _decoded(self.raw[index])

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.text())

    def text(self) -> list[Entry]:
        """Every entry decoded."""
        if self._text is None:
            self._text = [_decoded(entry) for entry in self.raw]
        return self._text


def _decoded(entry: tuple[bytes, list[bytes] | None]) -> Entry:
    entry_id, fields = entry
    return entry_id.decode(), None if fields is None else [f.decode() for f in fields]


def error_code(exc: ResponseError) -> str:
    # Redis error replies start with a code word; redis-py has classes for only a few of them.
    return str(exc).split(" ", 1)[0]


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Library errors that pass with time become `DependencyUnavailable`."""
    try:
        yield
    except _MISUSE:
        raise
    except _UNAVAILABLE as exc:
        raise DependencyUnavailable(f"redis: {exc}") from exc
    except ResponseError as exc:
        if error_code(exc) not in _GONE:
            raise
        # Someone deleted the group or the stream, or (UNBLOCKED, a blocked read) the stream moved
        # to another master with its slot: the next session finds it or creates it again.
        raise DependencyUnavailable(f"redis: {exc}") from exc


_GONE = {"NOGROUP", "UNBLOCKED"}


async def create_groups(client: Redis, streams: Sequence[str], group: str) -> None:
    """One group per stream, created with the stream (MKSTREAM); an existing group is fine."""
    for stream in streams:
        try:
            # From "0", not "$": entries written before the first worker started count too.
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":
                raise


def grouped(reply: Any) -> dict[str, Sequence[Entry]]:
    """An XREADGROUP reply by stream: RESP2 `[[stream, [(id, fields), ...]], ...]` or a RESP3 map,
    read without decoding (`NewEntries`)."""
    if not reply:
        return {}
    streams = reply.items() if isinstance(reply, dict) else reply
    return {stream.decode(): NewEntries(items) for stream, items in streams if items}


async def read_new(
    client: Redis, group: str, consumer: str, streams: Sequence[str], count: int,
    block_ms: int | None,
) -> dict[str, Sequence[Entry]]:  # fmt: skip
    """Entries never delivered to the group, up to `count` per stream, waiting up to `block_ms`
    (None: not at all). Their fields are the flat `[name, value, ...]` lists of the reply: sent
    and read on a pooled connection as they are, without redis-py's reply parsing, which builds
    a dict of every entry (measured: a tenth of the worker's time on the bench), and without
    decoding (`NewEntries`)."""
    return await (await request_new(client, group, consumer, streams, count, block_ms)).entries()


async def request_new(
    client: Redis, group: str, consumer: str, streams: Sequence[str], count: int,
    block_ms: int | None,
) -> Reading:  # fmt: skip
    """`read_new` in two steps: the read is sent when this returns, and `Reading.entries` reads
    its reply, so Redis prepares a batch while the one before it is processed."""
    reading = Reading(streams)
    await reading.send(client, _read_args(group, consumer, streams, count, block_ms))
    return reading


async def request_slots(
    placement: Placement, group: str, consumer: str, streams: Sequence[str], count: int,
    block_ms: int | None,
) -> Reading:  # fmt: skip
    """`request_new` on a cluster: one read per slot (every route's stream of one shard), each
    sent to its master at once."""
    parts = placement.by_slot(streams, str)
    masters = [await placement.master(part[0]) for part in parts]
    reading = Reading(streams)
    for master, part in zip(masters, parts, strict=True):
        # A failed send gives up the reads sent before it too (`Reading.send`).
        await reading.send(master, _read_args(group, consumer, part, count, block_ms))
    return reading


def _read_args(
    group: str, consumer: str, streams: Sequence[str], count: int, block_ms: int | None
) -> tuple[str, ...]:
    args = ["XREADGROUP", "GROUP", group, consumer, "COUNT", str(count)]
    if block_ms is not None:
        args += ["BLOCK", str(block_ms)]
    return (*args, "STREAMS", *streams, *([NEW] * len(streams)))


class Reading:
    """Reads of new entries sent, each on a pooled connection of its own, their replies not read
    yet. Every reply is read to its end whatever the others do (`entries`): the entries of one
    given up would be pending for this consumer, unseen until claimed as idle, after newer entries
    of their assets; one given up on purpose (`abandon`) closes its connection, and its entries
    are replayed from the pending list by the consumer's next session."""

    def __init__(self, streams: Sequence[str]) -> None:
        self.streams = list(streams)  # the streams read
        self._parts: list[tuple[Redis, Any]] = []

    async def send(self, client: Redis, args: tuple[str, ...]) -> None:
        """Send one read; if it cannot be sent, the reads sent before it are given up too."""
        try:
            conn = await client.connection_pool.get_connection()  # type: ignore[no-untyped-call]  # untyped in redis-py
            self._parts.append((client, conn))
            # hiredis' stub types the argument as a 1-tuple; it takes a tuple of any length.
            packed = cast("bytes", pack_command(args))  # type: ignore[arg-type]
            await conn.send_packed_command(packed, check_health=False)
        except BaseException:
            await self.abandon()
            raise

    async def entries(self) -> dict[str, Sequence[Entry]]:
        """The entries of every reply, by stream (one stream is read on one Redis only). The
        replies are read one after the other (Redis prepared them all meanwhile); one that fails
        does not stop the others from being read, and the first failure is raised after them. If
        this is cancelled, the replies not read yet are given up (`abandon`)."""
        merged: dict[str, Sequence[Entry]] = {}
        failures: list[Exception] = []
        try:
            while self._parts:
                client, conn = self._parts.pop(0)
                try:
                    merged.update(grouped(await _reply(client, conn)))
                except Exception as exc:  # noqa: BLE001 -- raised below, once the rest are read
                    failures.append(exc)
        except BaseException:
            await self.abandon()
            raise
        if failures:
            # The others' entries are pending for this consumer: its next session replays them.
            raise failures[0]
        return merged

    async def abandon(self) -> None:
        """Give up on the replies not read: their connections are closed, each one whatever
        happens to the others."""
        while self._parts:
            client, conn = self._parts.pop(0)
            try:
                await conn.disconnect(nowait=True)
            finally:
                await client.connection_pool.release(conn)


async def _reply(client: Redis, conn: Any) -> Any:
    """One command's reply as hiredis parsed it, not decoded."""
    try:
        return await conn.read_response(disable_decoding=True)
    except BaseException:
        # A cancelled or failed read leaves its reply unread: never reuse the connection.
        await conn.disconnect()
        raise
    finally:
        await client.connection_pool.release(conn)


@dataclass
class Claimed:
    """One XAUTOCLAIM page."""

    cursor: str
    entries: list[Entry] = field(default_factory=list)
    # Redis 7+: pending entries no longer in the stream, which the claim removed from the group.
    deleted: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.cursor == SCAN_START


def parse_autoclaim(reply: Sequence[Any]) -> Claimed:
    """Redis 6.2 answers `[cursor, entries]`, 7+ `[cursor, entries, deleted ids]`. 6.2 reports an
    entry deleted from the stream as nil (no id): it cannot be acked by id, and is skipped; 7 drops
    it from the pending list itself and names it in the third element."""
    cursor, items = str(reply[0]), reply[1] or []
    entries = [(str(entry_id), fields) for entry_id, fields in items if entry_id is not None]
    deleted = [str(entry_id) for entry_id in reply[2]] if len(reply) > 2 and reply[2] else []
    return Claimed(cursor, entries, deleted)


async def autoclaim(
    client: Redis, stream: str, group: str, consumer: str, min_idle_ms: int, start: str, count: int
) -> Claimed:
    """Claim up to `count` entries pending (for any consumer) longer than `min_idle_ms`."""
    reply = await client.xautoclaim(stream, group, consumer, min_idle_ms, start, count=count)
    return parse_autoclaim(reply)


async def delivery_counts(
    client: Redis, stream: str, group: str, consumer: str, ids: Sequence[str]
) -> dict[str, int]:
    """Delivery count of each of our pending `ids` (kept by Redis, so it survives a restart)."""
    if not ids:
        return {}
    rows = await client.xpending_range(
        stream, group, min=ids[0], max=ids[-1], count=2 * len(ids) + 100, consumername=consumer
    )
    return {str(row["message_id"]): int(row["times_delivered"]) for row in rows}


async def group_info(
    client: Redis, streams: Sequence[str], group: str
) -> dict[str, dict[str, Any]]:
    """XINFO GROUPS of our group on each stream that has it, with a lag of 0 whenever the group
    has been given the stream's last entry: Redis 7.0 computes the lag from a read counter that a
    restart from the append-only file can leave behind (measured: lag 3,627 with last-delivered-id
    equal to last-generated-id and nothing pending, for good)."""
    async with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
            pipe.xinfo_stream(stream)
        # A stream deleted under us answers with an error; the next read will report that.
        replies = await pipe.execute(raise_on_error=False)
    info: dict[str, dict[str, Any]] = {}
    for index, stream in enumerate(streams):
        groups, described = replies[2 * index], replies[2 * index + 1]
        if isinstance(groups, list):
            mine = next((g for g in groups if g.get("name") == group), None)
            if mine is not None:
                info[stream] = dict(mine)
                if isinstance(described, dict) and _same_id(
                    mine.get("last-delivered-id"), described.get("last-generated-id")
                ):
                    info[stream]["lag"] = 0
    return info


def _same_id(a: object, b: object) -> bool:
    text = [x.decode() if isinstance(x, bytes) else x for x in (a, b)]
    return text[0] is not None and text[0] == text[1]
