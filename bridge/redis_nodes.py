"""Redis clients: one Redis, or the nodes of a Redis Cluster.

`connect` builds the client every reader and every small writer uses: a plain client for one
Redis, redis-py's cluster client (which routes each single-key command to its slot's master and
follows MOVED) with `redis.cluster`.

The hot paths (the sink's batches, the worker's transactions) write on connections of their own,
which the cluster client does not lend out, and follow each write with WAIT on that same
connection. They use `Nodes`: the slot table read with CLUSTER SLOTS and one plain client per
master. A failed write marks the table stale (`Nodes.stale`); it is read again before the next
one, so a MOVED after resharding or a promotion after a failover is followed on the retry, which
the caller's backoff paces (it never gives up, so its budget outlasts any failover).
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.retry
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError

from config.errors import DependencyUnavailable
from config.settings import RedisSettings

log = logging.getLogger(__name__)

Address = tuple[str, int]


def redis_client(
    settings: RedisSettings,
    *,
    decode_responses: bool = False,
    client_name: str | None = None,
    address: Address | None = None,
) -> aioredis.Redis:
    """A client of one Redis (or of the cluster node at `address`) with short timeouts and no
    blind retries: the caller owns retry decisions.

    redis-py's defaults retry a timed-out write three times (measured: 14 s to fail one XADD to
    a stopped Redis, which it then applied anyway), so a retry here could duplicate a batch and
    would hide an outage from the caller's backoff, logs and metrics.
    """
    url = settings.url if address is None else settings.node_url(*address)
    return aioredis.Redis.from_url(
        url,
        **settings.client_options(),
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        decode_responses=decode_responses,
        client_name=client_name,
    )


def connect(
    settings: RedisSettings, *, decode_responses: bool = False, client_name: str | None = None
) -> aioredis.Redis:
    """The client of one Redis, or with `redis.cluster` of the whole cluster.

    The cluster client is typed as a plain one: it answers the same commands, routing each by its
    key (a command whose keys span slots fails with CROSSSLOT: callers keep to one key, or one
    shard's keys). It retries a redirect or a lost node a few times within one call, then raises;
    the caller's backoff goes on from there."""
    if not settings.cluster:
        return redis_client(settings, decode_responses=decode_responses, client_name=client_name)
    options = settings.client_options()
    if settings.tls_enabled:
        options["ssl"] = True
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in settings.seeds()],
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        decode_responses=decode_responses,
        client_name=client_name,
        **options,
    )
    return cast("aioredis.Redis", cluster)


def connect_sync(
    settings: RedisSettings,
    *,
    decode_responses: bool = False,
    client_name: str | None = None,
    socket_timeout_s: float | None = None,
) -> redis.Redis:
    """`connect`'s blocking twin, for the command line and the tools (token, audit, the Locust
    probe): a plain client of one Redis, or with `redis.cluster` redis-py's cluster client, typed
    as a plain one. `socket_timeout_s` replaces `redis.socket_timeout_s` (a whole stream read
    page by page needs longer than the bridge's writes)."""
    options = settings.client_options()
    if socket_timeout_s is not None:
        options["socket_timeout"] = socket_timeout_s
    if not settings.cluster:
        return redis.Redis.from_url(
            settings.url, decode_responses=decode_responses, client_name=client_name, **options
        )
    if settings.tls_enabled:
        options["ssl"] = True
    seeds = [
        redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]  # untyped in redis-py
        for host, port in settings.seeds()
    ]
    cluster = redis.cluster.RedisCluster(
        startup_nodes=seeds,
        retry=redis.retry.Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        decode_responses=decode_responses,
        client_name=client_name,
        **options,
    )
    return cast("redis.Redis", cluster)


def slot_of(key: str | bytes) -> int:
    """The hash slot of a key (its hash tag's, if it has one)."""
    return int(key_slot(key.encode() if isinstance(key, str) else key))


class Nodes:
    """The masters of a Redis Cluster by slot, and a plain client per master (decoding replies
    with `decode_responses`, named `client_name`)."""

    def __init__(
        self, settings: RedisSettings, *, decode_responses: bool = False,
        client_name: str | None = None,
    ) -> None:  # fmt: skip
        self._settings = settings
        self._decode_responses = decode_responses
        self._client_name = client_name
        self._masters: dict[int, Address] = {}  # slot -> address, for every slot covered
        self._clients: dict[Address, aioredis.Redis] = {}
        self._refreshing = asyncio.Lock()
        self.stale = True
        self.epoch = 0  # moves on with each table read

    def address(self, key: str | bytes) -> Address:
        """The master serving `key`'s slot, by the last table read. Raises DependencyUnavailable
        when no master serves it (the table is marked stale)."""
        found = self._masters.get(slot_of(key))
        if found is None:
            self.stale = True
            raise DependencyUnavailable(f"redis cluster: no master serves the slot of {key!r}")
        return found

    def client(self, address: Address) -> aioredis.Redis:
        """The plain client of one master (made on first use, kept until `close`)."""
        client = self._clients.get(address)
        if client is None:
            client = self._clients[address] = redis_client(
                self._settings, decode_responses=self._decode_responses,
                client_name=self._client_name, address=address,
            )  # fmt: skip
        return client

    @property
    def masters(self) -> list[Address]:
        return sorted(set(self._masters.values()))

    async def refresh(self) -> None:
        """Read the slot table (CLUSTER SLOTS) from the first node that answers: the masters known,
        then the seeds. Raises DependencyUnavailable when none does."""
        async with self._refreshing:
            if not self.stale and self._masters:
                return
            failures = []
            for address in [*self.masters, *self._settings.seeds()]:
                try:
                    reply = await self.client(address).execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]  # untyped in redis-py
                except (RedisError, OSError) as exc:
                    failures.append(f"{address[0]}:{address[1]}: {exc}")
                    continue
                self._masters = _table(reply, address)
                self.stale = False
                self.epoch += 1
                return
            raise DependencyUnavailable("redis cluster: no node answered: " + "; ".join(failures))

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _table(reply: object, answered: Address) -> dict[int, Address]:
    """CLUSTER SLOTS (redis-py parses it as {(first, last): {"primary": (host, port), ...}}, or
    leaves RESP's list of [first, last, [host, port, id], replicas...]) as slot -> master."""
    masters: dict[int, Address] = {}
    ranges: list[tuple[int, int, Address]] = []
    if isinstance(reply, dict):
        for (first, last), nodes in reply.items():
            host, port = nodes["primary"][:2]
            ranges.append((int(first), int(last), (_text(host), int(port))))
    else:
        for row in cast("list[list[object]]", reply):
            node = cast("list[object]", row[2])
            ranges.append((int(cast("int", row[0])), int(cast("int", row[1])),
                           (_text(node[0]), int(cast("int", node[1])))))  # fmt: skip
    for first, last, (host, port) in ranges:
        # A node that does not know its own address announces "": the one that answered has it.
        address = (host or answered[0], port)
        for slot in range(first, last + 1):
            masters[slot] = address
    return masters


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
