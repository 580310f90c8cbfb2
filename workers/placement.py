"""Where the worker's commands go: one Redis, or the masters of a Redis Cluster.

Single-key commands (a heartbeat, a lease script over one slot's leases, a checkpoint read, a
claim) go through `client`: the plain client of one Redis, or redis-py's cluster client, which
routes each command by its key's slot and follows redirects.

The reads and the transactions name several keys of one shard: every route's stream of shard n,
its outputs, checkpoint, lease and fence share the hash tag `{n}`. On a cluster they are sent on
connections of their own to the master of that slot (`master`), found in the slot table
(`bridge.redis_nodes.Nodes`): the cluster client lends no connection out, and a WAIT must follow
a write on the connection that made it. A failure marks the table stale (`invalidate`); it is
read again before the next command that needs it, so a failover or a moved slot is followed on
the retry that the consumer's backoff paces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from redis.asyncio import Redis

from bridge.redis_nodes import Nodes, connect, slot_of
from config.settings import RedisSettings

T = TypeVar("T")


class Placement:
    """The clients of one Redis, or of a cluster and its masters."""

    def __init__(self, client: Redis, nodes: Nodes | None = None) -> None:
        """`client` for single-key commands; `nodes`, a cluster's masters (None: one Redis)."""
        self.client = client
        self.cluster = nodes is not None
        self._nodes = nodes

    @classmethod
    def connect(cls, settings: RedisSettings, client_name: str | None = None) -> Placement:
        """The clients `settings` describe, decoding replies (str ids, fields and values)."""
        client = connect(settings, decode_responses=True, client_name=client_name)
        if not settings.cluster:
            return cls(client)
        return cls(client, Nodes(settings, decode_responses=True, client_name=client_name))

    def by_slot(self, items: Sequence[T], key: Callable[[T], str]) -> list[list[T]]:
        """`items` grouped by the slot of `key(item)`, in order of first appearance: one group
        per slot on a cluster, one group of them all on one Redis."""
        if not self.cluster:
            return [list(items)] if items else []
        groups: dict[int, list[T]] = {}
        for item in items:
            groups.setdefault(slot_of(key(item)), []).append(item)
        return list(groups.values())

    async def master(self, key: str) -> Redis:
        """The plain client of the Redis serving `key`: the one Redis, or the master of its slot
        by the slot table (read again first when stale). Raises DependencyUnavailable when no
        node answers or none serves the slot."""
        nodes = self._nodes
        if nodes is None:
            return self.client
        if nodes.stale:
            await nodes.refresh()
        return nodes.client(nodes.address(key))

    def invalidate(self) -> None:
        """A command failed: read the slot table again before the next one."""
        if self._nodes is not None:
            self._nodes.stale = True

    async def close(self) -> None:
        if self._nodes is not None:
            await self._nodes.close()
        await self.client.aclose()
