"""Reading what is written per shard as one: on a Redis Cluster the anomalies and the worker's dead
letters are one stream per shard (`Keys.anomaly_streams`, `Keys.worker_dead_letter_streams`), and
a reader merges them; on one Redis each is one stream and this is the plain read.

Entry ids are made per stream, so two shard streams can hold the same id (two masters, the same
millisecond). The merged order is therefore (entry id, stream index): a total order, in which a
reader's position names the stream as well as the id.

A command whose keys are in several slots fails on a cluster, so a read of several streams is one
command per slot there (`xread_each`), and one command for them all on one Redis.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisClusterException, RedisError

from bridge.record import entry_key
from bridge.redis_nodes import slot_of

# What a read of either client raises when Redis cannot answer: redis-py's cluster client raises
# RedisClusterException, which is not a RedisError, when no node answers or a slot has no master.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, RedisClusterException)

Fields = TypeVar("Fields")
# An entry of a stream as redis-py returns it: (id, fields), the id as bytes or str.
Entry = tuple[bytes | str, Fields]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def order(entry_id: bytes | str, index: int) -> tuple[int, int, int]:
    """Where an entry of stream `index` stands in the merged order."""
    ms, seq = entry_key(_text(entry_id))
    return ms, seq, index


def merge(streams: Sequence[Iterable[Entry[Fields]]]) -> Iterator[tuple[int, Entry[Fields]]]:
    """The entries of several streams, each read oldest first, as (stream index, entry) in the
    merged order. Lazy: it reads each stream only as far as the order needs."""
    tagged = [_tagged(index, entries) for index, entries in enumerate(streams)]
    for _, index, entry in heapq.merge(*tagged, key=lambda item: item[0]):
        yield index, entry


def _tagged(
    index: int, entries: Iterable[Entry[Fields]]
) -> Iterator[tuple[tuple[int, int, int], int, Entry[Fields]]]:
    for entry in entries:
        yield order(entry[0], index), index, entry


def by_slot(keys: Iterable[str], cluster: bool) -> list[list[str]]:
    """`keys` in groups that one command may name: one group on one Redis, one per slot on a
    cluster."""
    if not cluster:
        return [list(keys)]
    groups: dict[int, list[str]] = {}
    for key in keys:
        groups.setdefault(slot_of(key), []).append(key)
    return list(groups.values())


def xread_each(
    client: redis.Redis,
    after: Mapping[str, str],
    *,
    count: int,
    block_ms: int,
    cluster: bool,
    poll_ms: int = 50,
) -> list[tuple[Any, list[Any]]]:
    """XREAD of several streams (each after its id), as redis-py answers one XREAD: a list of
    (stream, entries). One blocking XREAD on one Redis (or when every stream is in one slot);
    otherwise one XREAD per slot without BLOCK and, when none of them had anything, a pause of
    `poll_ms` (a BLOCK on one slot would hold back the entries of the others)."""
    groups = by_slot(after, cluster)
    # redis-py's stubs type the reply as sync or async, RESP2 or RESP3: it is RESP2's list here.
    reply: Any
    if len(groups) == 1:
        reply = client.xread(_ids(after, groups[0]), count=count, block=block_ms)
        return list(reply or [])
    replies: list[tuple[Any, list[Any]]] = []
    for keys in groups:
        reply = client.xread(_ids(after, keys), count=count)
        replies += reply or []
    if not replies:
        time.sleep(min(block_ms, poll_ms) / 1000)
    return replies


def _ids(after: Mapping[str, str], keys: list[str]) -> dict[Any, Any]:
    # redis-py's parameter is a dict invariant in a union of key types: no dict[str, str] fits.
    return {key: after[key] for key in keys}
