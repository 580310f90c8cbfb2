"""Session partitions: a fleet of bridges shares the subscription space without a shared
subscription, and without losing or doubling a message when a bridge joins, leaves or dies.

Each partition (`bridge.partitions`) is one persistent MQTT session with its own client id,
`<mqtt.client_id>-<partition>`, and plain subscriptions (its filters narrowed to each route), which
the broker keeps across its restarts (Mosquitto does not persist `$share` subscriptions). Bridges
own partitions through leases in Redis (`workers.leases`, the protocol workers own shards with):
every bridge of one `mqtt.client_id` announces itself, takes its fair share, renews every third of
`bridge.partition_lease_ttl_s`, and takes over the partitions of a bridge whose lease lapsed. A new
owner connects with the partition's client id and the broker resumes the session: its queue, and
every message the last owner had not acknowledged.

Fencing. A bridge acknowledges a partition's messages, and reconnects its session, only while its
lease is valid by its own clock: until the start of the last renewal that Redis confirmed plus 90%
of the TTL (Redis counts the TTL from later, so the local bound expires first). A bridge paused past
its TTL (SIGSTOP, a long GC, a frozen VM) wakes with the bound passed: it acknowledges nothing more
and does not reconnect; what it still writes, the new owner writes again from the broker's
redelivery, and the dedup step drops it. The broker's client-id takeover closes the stale
connection in any case.

Rebalance. A bridge over its share gives partitions away gracefully: it stops reading the session,
writes and acknowledges what it holds, disconnects, then releases the lease; the receiver can only
take the lease after that, so at no time do two bridges read one session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from redis.exceptions import RedisClusterException, RedisError

from bridge.redis_nodes import connect
from bridge.routing import RouteTable
from bridge.source import Inbound, MqttSource
from config.keys import Keys
from config.settings import Settings
from config.topic_filters import intersect, uncovered
from observability.lifecycle import Backoff
from observability.metrics import BridgeMetrics
from workers.leases import Leases

log = logging.getLogger(__name__)

# The partition of a message is in the high bits of its connection generation: each partition's
# sources count their generations from `index << _GENERATION_BITS`.
_GENERATION_BITS = 32
# Share of the TTL a renewal counts for locally (see Fencing above).
_VALID_SHARE = 0.9


@dataclass(eq=False)
class Partition:
    name: str
    index: int
    lease: str  # key of its lease
    client_id: str
    subscriptions: list[tuple[str, int]]
    valid_until: float = 0.0  # monotonic; acknowledgements stop after it
    source: MqttSource | None = None
    task: asyncio.Task[None] | None = None
    leaving: bool = False
    generation: int = field(init=False)

    def __post_init__(self) -> None:
        self.generation = self.index << _GENERATION_BITS

    def lease_valid(self) -> bool:
        return time.monotonic() < self.valid_until


def partition_subscriptions(filters: list[str], routes: RouteTable) -> list[tuple[str, int]]:
    """A partition's filters narrowed to each route they overlap, with the route's QoS."""
    out: dict[str, int] = {}
    for topic_filter in filters:
        for route in routes.routes:
            common = intersect(topic_filter, route.filter)
            if common is not None:
                out[common] = max(out.get(common, 0), route.settings.qos)
    return sorted(out.items())


class PartitionedSource:
    """The sessions of the partitions this bridge owns, behind the surface the app uses of one
    `MqttSource` (run, ack, pause, close, connected, subscribed)."""

    def __init__(
        self,
        settings: Settings,
        routes: RouteTable,
        on_message: Callable[[Inbound], None],
        metrics: BridgeMetrics,
    ) -> None:
        self._settings = settings
        self._on_message = on_message
        self._metrics = metrics
        bridge, mqtt = settings.bridge, settings.mqtt
        self._keys = Keys(settings.redis.key_prefix)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        self.partitions = [
            Partition(
                p.name,
                index,
                self._keys.bridge_lease(mqtt.client_id, p.name),
                f"{mqtt.client_id}-{p.name}",
                partition_subscriptions(p.filters, routes),
            )
            for index, p in enumerate(bridge.partitions)
        ]
        self._ttl_s = bridge.partition_lease_ttl_s
        self._leases = Leases(
            self._keys.bridge_members(mqtt.client_id), self.owner, self.partitions,
            int(self._ttl_s * 1000), by_slot=settings.redis.cluster,
        )  # fmt: skip
        self._redis = connect(
            settings.redis, decode_responses=True, client_name="iotbridge-bridge-leases"
        )
        self.owned: list[Partition] = []
        self._closing = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._redis_ok = True
        self._acked = asyncio.Event()  # set on every acknowledgement: a hand-over waits on it
        self._unacknowledged: Callable[[], Iterable[Inbound]] = tuple
        # The app's single-session attributes, unused here: each partition remembers its own.
        self.previous_filters: set[str] | None = None
        self.subscribed_event = asyncio.Event()
        metrics.partitions_owned.set_function(lambda: len(self.owned))
        for p in self.partitions:
            metrics.partition_in_flight.labels(p.name).set_function(
                lambda p=p: self.in_flight(p)  # type: ignore[misc]
            )
        for change in ("acquired", "released", "lost"):
            metrics.lease_changes.labels(change)
        rest = uncovered(
            [(p.name, p.filters) for p in bridge.partitions],
            [(r.name, r.filter) for r in routes.routes],
        )
        if rest:
            log.warning("route topics outside every partition are not subscribed: %s",
                        "; ".join(rest))  # fmt: skip

    def watch(self, unacknowledged: Callable[[], Iterable[Inbound]]) -> None:
        """What the app holds unacknowledged: a partition is given away once none is its own."""
        self._unacknowledged = unacknowledged

    def in_flight(self, partition: Partition) -> int:
        index = partition.index
        return sum(1 for m in self._unacknowledged() if m.generation >> _GENERATION_BITS == index)

    # --- the app's side -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Every owned session is connected (none owned: a standby, ready to take over)."""
        return all(p.source is not None and p.source.connected for p in self.owned)

    @property
    def subscribed(self) -> bool:
        return all(p.source is not None and p.source.subscribed for p in self.owned)

    def ack(self, inbound: list[Inbound]) -> None:
        """Acknowledge on each message's own session (fenced there by its lease)."""
        by_partition: dict[int, list[Inbound]] = {}
        for m in inbound:
            by_partition.setdefault(m.generation >> _GENERATION_BITS, []).append(m)
        for index, messages in by_partition.items():
            source = self.partitions[index].source
            if source is not None:
                source.ack(messages)
        self._acked.set()

    @property
    def held(self) -> bool:
        return any(p.source is not None and p.source.held for p in self.owned)

    def hold(self) -> None:
        """Stop reading every owned session: the app holds as many messages as it may."""
        for p in self.owned:
            if p.source is not None:
                p.source.hold()

    def release(self) -> None:
        for p in self.owned:
            if p.source is not None:
                p.source.release()

    def pause(self) -> None:
        for p in self.owned:
            if p.source is not None:
                p.source.pause()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Disconnect every session, then release the leases and leave, so the other bridges
        take over at once rather than after the TTL."""
        self._closing.set()
        owned = list(self.owned)
        await asyncio.gather(*(self._disconnect(p, timeout_s) for p in owned))
        try:
            await self._leases.release(self._redis, owned)
            await self._leases.leave(self._redis)
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("could not release the partition leases; they lapse after %.1f s",
                        self._ttl_s, extra={"error": str(exc)})  # fmt: skip
        self._metrics.lease_changes.labels("released").inc(len(owned))
        self.owned.clear()
        await self._redis.aclose()

    # --- ownership ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Hold a fair share of the partitions until `close()`; after `stop`, take no more."""
        self._stop = stop
        async with asyncio.TaskGroup() as tasks:
            self._tasks = tasks
            while not self._closing.is_set():
                started = time.monotonic()
                try:
                    await self._round(started)
                except (RedisError, RedisClusterException, OSError) as exc:
                    if self._redis_ok:
                        log.warning("partition leases not renewed: redis unavailable",
                                    extra={"error": str(exc)})  # fmt: skip
                    self._redis_ok = False
                else:
                    if not self._redis_ok:
                        log.info("partition leases renewed again")
                    self._redis_ok = True
                interval = self._ttl_s / 3 - (time.monotonic() - started)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.05, interval)):
                        await self._closing.wait()

    async def _round(self, started: float) -> None:
        _now_ms, members = await self._leases.heartbeat(self._redis)
        held = set(map(id, await self._leases.renew(self._redis, self.owned)))
        for p in list(self.owned):
            if id(p) in held:
                p.valid_until = started + _VALID_SHARE * self._ttl_s
            else:
                self._lost(p)
        if self._closing.is_set():
            return
        target = self._share(members)
        settled = [p for p in self.owned if not p.leaving]
        if len(settled) > target:
            for p in sorted(settled, key=self._leases.preferred.index)[target:]:
                self._give_away(p)
        elif len(settled) < target and not (self._stop and self._stop.is_set()):
            free = [p for p in self._leases.preferred if p not in self.owned]
            for p in await self._leases.acquire(self._redis, free, target - len(settled)):
                p.valid_until = started + _VALID_SHARE * self._ttl_s
                self._take(p)

    def _share(self, members: list[str]) -> int:
        """This bridge's fair share: partitions / bridges, the remainder to the first by name."""
        live = sorted(set(members) | {self.owner})
        count, extra = divmod(len(self.partitions), len(live))
        return count + (1 if live.index(self.owner) < extra else 0)

    def _take(self, p: Partition) -> None:
        assert self._tasks is not None
        log.info("partition acquired", extra={"partition": p.name, "owner": self.owner})
        self._metrics.lease_changes.labels("acquired").inc()
        p.leaving = False
        if p.source is not None:
            # Past every connection of the last source (which connects no more: its lease check
            # below fails from now on), so an ack meant for it never matches a new packet id.
            p.generation = p.source.generation + 1

        def lease_valid() -> bool:
            return p.source is source and p.lease_valid()

        source = MqttSource(
            self._settings.mqtt.model_copy(update={"client_id": p.client_id}),
            p.subscriptions, self._on_message, self._metrics, Backoff(self._settings.backoff),
            lease_valid=lease_valid,
        )  # fmt: skip
        source.generation = p.generation
        p.source = source
        self.owned.append(p)
        p.task = self._tasks.create_task(self._serve(p, source), name=f"partition-{p.name}")

    async def _serve(self, p: Partition, source: MqttSource) -> None:
        filters_key = self._keys.bridge_subscriptions(p.client_id)
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            raw = await self._redis.get(filters_key)
            source.previous_filters = None if raw is None else set(json.loads(raw))
        remember = asyncio.create_task(self._remember(source, filters_key))
        try:
            await source.run(self._closing)
        finally:
            remember.cancel()

    async def _remember(self, source: MqttSource, key: str) -> None:
        await source.subscribed_event.wait()
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self._redis.set(key, json.dumps(sorted(source.previous_filters or ())))

    def _lost(self, p: Partition) -> None:
        """The lease lapsed (or another bridge holds it): stop acknowledging at once and close."""
        log.warning("partition lease lost", extra={"partition": p.name, "owner": self.owner})
        self._metrics.lease_changes.labels("lost").inc()
        p.valid_until = 0.0
        self.owned.remove(p)
        if p.source is not None:
            source = p.source
            assert self._tasks is not None
            self._tasks.create_task(source.close(), name=f"partition-{p.name}-close")

    def _give_away(self, p: Partition) -> None:
        assert self._tasks is not None
        p.leaving = True
        if p.source is not None:
            p.source.pause()
        self._tasks.create_task(self._hand_over(p), name=f"partition-{p.name}-hand-over")

    async def _hand_over(self, p: Partition) -> None:
        """Stop reading (done), write and acknowledge what is held, disconnect, release."""
        grace = self._settings.bridge.shutdown_grace_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.in_flight(p) and p.lease_valid():
                    self._acked.clear()
                    await self._acked.wait()
        if p not in self.owned or self._closing.is_set():
            return  # lost meanwhile, or closing (which disconnects and releases everything)
        await self._disconnect(p, 2.0)
        if p not in self.owned or self._closing.is_set():
            return
        self.owned.remove(p)
        try:
            await self._leases.release(self._redis, [p])
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("could not release a partition lease; it lapses after the TTL",
                        extra={"partition": p.name, "error": str(exc)})  # fmt: skip
        p.leaving = False
        self._metrics.lease_changes.labels("released").inc()
        log.info("partition handed over", extra={"partition": p.name, "owner": self.owner})

    async def _disconnect(self, p: Partition, timeout_s: float) -> None:
        if p.source is not None:
            await p.source.close(timeout_s)
        if p.task is not None:
            await asyncio.wait([p.task], timeout=timeout_s)
