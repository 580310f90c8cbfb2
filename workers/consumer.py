"""The consumer: owns shards, reads their streams in the consumer group, runs the detectors and
writes the outputs (`workers.outputs`, `workers.writes`).

One consumer group per telemetry stream, all named `worker.group`, and each worker one consumer in
it; the lease (`workers.leases`), not the group, decides who reads a stream: only its owner does,
so each asset's samples meet one state in order, and a new owner finds the old owner's unacked
entries in the same group's pending list. One task does all the work, in this order, so the state
is never touched by two coroutines at once:

1. every third of the lease TTL: heartbeat, renew, and release or take shards. A shard taken over
   restores its checkpoint and claims every pending entry of its stream (XAUTOCLAIM, idle 0: the
   lease is ours) before any new entry is read, so the entries after the checkpoint are replayed in
   id order. After a reconnect the shards still owned do the same with our own pending entries;
2. pending entries idle longer than `claim_idle_ms` are claimed again: retries of entries whose
   processing failed, and entries a worker read after losing its lease;
3. every `detectors.tick_s`: the time-driven checks (staleness), with no message needed;
4. new entries of the owned streams: XREADGROUP >, BLOCK short so a stop is prompt; with a
   backlog the next batch's read is sent before this one is processed and its reply read after:
   Redis prepares it meanwhile (only the reading overlaps; the write of the batch before is
   in flight too). On a
   Redis Cluster the owned streams are on several masters: one XREADGROUP per slot (shard index),
   each on its master, all at once (`_request`).

Redis being down is a state, not an error: one warning, retries with a capped jittered backoff that
ends early on stop, one info line when it is back. With `redis.durability`, replicas that do not
confirm a batch in time are such a state too: the batch is written on the master but not counted;
each retry first sends WAIT again on the connection that wrote it, and it counts once they confirm
(`_confirm`), before anything else is read. A stop finishes the batch in hand (written,
acked, checkpointed), then releases the leases and leaves the group's members, so the other
workers take the shards over at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Sequence
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.sink import ReplicasBehind
from config.errors import DependencyUnavailable
from config.keys import Keys
from config.settings import Settings, WorkerSettings
from observability.lifecycle import Backoff, stopped_within
from observability.metrics import WorkerMetrics
from workers.anomaly import AnomalyEvent
from workers.leases import Leases
from workers.outputs import LeaseLost, Outputs
from workers.placement import Placement
from workers.processing import Delivery, Result, process, sweep
from workers.reporting import Reporter
from workers.state import Engine, Shard, ShardState, shards_of
from workers.streams import (
    SCAN_START,
    Entry,
    Reading,
    autoclaim,
    create_groups,
    delivery_counts,
    request_new,
    request_slots,
    translated,
)
from workers.writes import Sent, Unconfirmed, Written, send

log = logging.getLogger(__name__)

TARGET = "redis"
# A BLOCK must end before socket_timeout does, or every idle read would look like a stalled server.
_BLOCK_MARGIN_MS = 250
# Errors of failed entries kept for their dead letter; beyond this the oldest are forgotten.
_MAX_REMEMBERED_ERRORS = 10_000
# What `_housekeeping` does on a clock.
_CHORES = ("beat", "claim", "sweep", "report")
# On a cluster, the BLOCK of the reads sent to every master at once when the last ones found
# nothing: a read is never cancelled (the entries its reply may carry would be pending for us,
# unseen until claimed after `claim_idle_ms`, out of order), so the round ends with its slowest
# read, and a quiet shard holds an entry of a busy one back at most this long.
_CLUSTER_BLOCK_MS = 50


def consumer_name(worker: WorkerSettings) -> str:
    """The configured name, else host-pid: unique per process, so pending entries have one owner."""
    return worker.consumer or f"{socket.gethostname()}-{os.getpid()}"


class Consumer:
    """One consumer of the group `worker.group` on every route's telemetry streams."""

    def __init__(
        self, settings: Settings, metrics: WorkerMetrics, engine: Engine, name: str
    ) -> None:
        worker = settings.worker
        self.name = name
        self._group = worker.group
        self._batch_size = worker.batch_size
        self._claim_idle_ms = worker.claim_idle_ms
        self._max_deliveries = worker.max_deliveries
        self._dedup_ttl_ms = int(worker.dedup_ttl_s * 1000)
        self._tick_s = worker.detectors.tick_s
        self._beat_s = worker.lease_ttl_ms / 3000
        socket_ms = int(settings.redis.socket_timeout_s * 1000) - _BLOCK_MARGIN_MS
        # The loop must come round often enough to renew the leases in time.
        self._block_ms = max(1, min(worker.block_ms, socket_ms, int(self._beat_s * 500)))
        self._backoff_settings = settings.backoff
        self._keys = Keys.of(settings.redis)
        self._shards = shards_of(self._keys, self._group, settings.telemetry_routes)
        self._engine = engine
        self._leases = Leases(
            self._keys.worker_members(self._group), name, self._shards, worker.lease_ttl_ms,
            by_slot=settings.redis.cluster,
        )  # fmt: skip
        self._durability = settings.redis.durability
        self._cluster = settings.redis.cluster
        # The reads found entries last time (a cluster's next reads do not wait for more).
        self._flowing = False
        self._metrics = metrics
        self._report = Reporter(metrics, self._group)
        self.owned: dict[str, ShardState] = {}
        # Owned shards whose state must be reloaded from the checkpoint, and shards whose pending
        # entries must be claimed and processed before new entries are read.
        self._stale: set[str] = set()
        self._recovering: set[str] = set()
        self._caught_up: set[str] = set()
        self._errors: dict[tuple[str, str], str] = {}
        self._clock = (0, 0.0)  # (Redis time in ms, time.monotonic() when it was read)
        self._due: dict[str, float] = {}
        # The write sent and not yet settled: (its reply, the batch, its states, when it began).
        self._in_flight: tuple[Sent, Result, list[ShardState], float] | None = None
        self._down_since: float | None = None
        self._placement: Placement | None = None
        # Batches written that the replicas did not confirm in time, oldest first.
        self._unconfirmed: list[tuple[Unconfirmed, Outputs]] = []
        self.connected = False
        self._error = ""  # why Redis was last unavailable, for /readyz
        metrics.connected.labels(target=TARGET).set(0)

    def readiness(self) -> tuple[bool, str]:
        if not self.connected:
            reason = "redis unavailable"
            return False, f"{reason}: {self._error}" if self._error else reason
        return True, "ready"

    async def run(self, placement: Placement, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; the batch in hand is written and acked before returning,
        then the leases are released."""
        self._placement = placement
        client = placement.client
        backoff = Backoff(self._backoff_settings)
        try:
            while not stop.is_set():
                try:
                    await self._session(client, stop, backoff)
                except DependencyUnavailable as exc:
                    placement.invalidate()
                    delay = backoff.next_delay()
                    self._mark_down(exc, delay)
                    if await stopped_within(stop, delay):
                        break
                    self._metrics.reconnects.labels(target=TARGET).inc()
            await self._leave(client)
        finally:
            for unconfirmed, _ in self._unconfirmed:
                await unconfirmed.close()
            self._unconfirmed = []
            # Stopped or cancelled, this consumer no longer does its job: /readyz must say so.
            self.connected = False
            self._metrics.connected.labels(target=TARGET).set(0)

    async def _session(self, client: Redis, stop: asyncio.Event, backoff: Backoff) -> None:
        """One connected stretch: (re)create the groups, replay pending entries, read new ones."""
        with translated():
            await create_groups(client, [shard.stream for shard in self._shards], self._group)
        await self._confirm()
        self._mark_up()
        backoff.reset()
        # A write that failed may or may not have landed: the checkpoints are the truth (they are
        # written with the acks). Reload them, then replay our pending entries before new ones.
        self._stale = set(self.owned)
        self._due = {}
        ahead: Reading | None = None
        try:
            # After stop, a batch already read ahead is still processed: it is ours, pending.
            while not stop.is_set() or ahead is not None:
                with translated():
                    if self._in_flight is not None and (ahead is None or self._chores_due()):
                        # Caught up, or about to do something else: the write lands first.
                        await self._settle(client)
                    await self._housekeeping(client)
                streams = self._readable()
                if ahead is None and not streams:
                    await stopped_within(stop, self._due["beat"] - time.monotonic())
                    continue
                with translated():
                    if ahead is None:
                        ahead = await self._request(client, streams, self._block())
                    reading, ahead = ahead, None
                    reply = await self._received(reading)
                    backlog = any(len(items) == self._batch_size for items in reply.values())
                    if backlog and not stop.is_set():
                        # Redis prepares the next batch while this one is processed and written:
                        # the read is sent now, its reply read when this batch is done.
                        ahead = await self._request(client, streams, None)
                # A shard lost or being replayed meanwhile is skipped: its replay (XAUTOCLAIM of
                # our pending entries, in id order) includes these entries.
                readable = set(self._readable())
                batch = [
                    Delivery(self.owned[s], items) for s, items in reply.items() if s in readable
                ]
                if batch:
                    await self._handle(client, batch, overlap=True)
            with translated():
                await self._settle(client)
        except DependencyUnavailable:
            await self._settle_after_failure(client)
            raise
        finally:
            await self._end_session(ahead)

    async def _end_session(self, ahead: Reading | None) -> None:
        """What a session leaves: a write in flight, a read ahead."""
        if self._in_flight is not None:
            # Its outcome is unknown: the next session reloads the checkpoints, the truth.
            sent, _, states, _ = self._in_flight
            self._in_flight = None
            for state in states:
                state.rollback_all()
            await sent.abandon()
        if ahead is not None:
            # Its entries, if it got any, are pending for us: the next session replays them.
            await ahead.abandon()

    async def _settle_after_failure(self, client: Redis) -> None:
        """Something else failed (a read, a claim: on a cluster, a MOVED of another slot): the
        write in flight is on connections of its own, so its outcome is read rather than
        abandoned, and a batch that landed counts. If it cannot be read, it stays unknown."""
        if self._in_flight is None:
            return
        try:
            with translated():
                await self._settle(client)
        except DependencyUnavailable as exc:
            log.debug("the write in flight is left unknown", extra={"error": str(exc)})

    async def _confirm(self) -> None:
        """Wait for the replicas to confirm the batches they had not; each counts once they do.
        One whose connection broke is forgotten, uncounted: whether the replicas have it is
        unknown (the checkpoints, reloaded next, say what the master has)."""
        while self._unconfirmed:
            unconfirmed, outputs = self._unconfirmed[0]
            try:
                await unconfirmed.confirm()
            except ReplicasBehind as exc:
                raise DependencyUnavailable(f"redis: {exc}") from exc
            except (RedisError, OSError) as exc:
                log.warning("a batch's confirmation by the replicas is lost with its connection",
                            extra={"error": str(exc), "shards": len(unconfirmed.shards)})  # fmt: skip
            else:
                self._report.written(outputs, unconfirmed.acked, self.owned)
            del self._unconfirmed[0]

    def _readable(self) -> list[str]:
        """Owned streams whose new entries may be read: not waiting for a reload or a replay."""
        return [s for s in self.owned if s not in self._stale and s not in self._recovering]

    def _block(self) -> int | None:
        """The BLOCK of the next read of new entries (None: none)."""
        if not self._cluster:
            return self._block_ms
        return None if self._flowing else min(self._block_ms, _CLUSTER_BLOCK_MS)

    async def _request(self, client: Redis, streams: list[str], block_ms: int | None) -> Reading:
        """Send the read of new entries of `streams`; `_received` reads its reply."""
        if self._cluster:
            return await request_slots(
                self._redis(), self._group, self.name, streams, self._batch_size, block_ms
            )
        return await request_new(
            client, self._group, self.name, streams, self._batch_size, block_ms
        )

    async def _received(self, reading: Reading) -> dict[str, Sequence[Entry]]:
        """The reply of a read `_request` sent."""
        reply = await reading.entries()
        if self._cluster:
            self._flowing = bool(reply)
        for stream in reading.streams:
            if len(reply.get(stream, ())) < self._batch_size:
                self._caught_up.add(stream)
            else:
                self._caught_up.discard(stream)
        return reply

    def _redis(self) -> Placement:
        if self._placement is None:
            raise RuntimeError("the consumer is not running")
        return self._placement

    def _is_due(self, task: str, every_s: float) -> bool:
        now = time.monotonic()
        if now < self._due.get(task, 0.0):
            return False
        self._due[task] = now + every_s
        return True

    async def _housekeeping(self, client: Redis) -> None:
        if self._is_due("beat", self._beat_s):
            await self._rebalance(client)
        for stream in sorted(self._stale):
            if stream in self.owned:
                await self._load(client, self.owned[stream].shard)
            self._stale.discard(stream)
        for stream in sorted(self._recovering):
            await self._claim(client, stream, 0)
            self._recovering.discard(stream)
        if self._is_due("claim", self._claim_idle_ms / 2000):
            for stream in list(self.owned):
                await self._claim(client, stream, self._claim_idle_ms)
        if self._is_due("sweep", self._tick_s):
            await self._sweep(client)
        if self._is_due("report", 1.0):
            await self._report.refresh(client, self._shards, self.owned)

    async def _rebalance(self, client: Redis) -> None:
        """Heartbeat, renew what we hold, then release down to or take up to our share."""
        now_ms, members = await self._leases.heartbeat(client)
        self._clock = (now_ms, time.monotonic())
        mine = [state.shard for state in self.owned.values()]
        held = await self._leases.renew(client, mine)
        for shard in set(mine) - set(held):
            self._drop(shard, "lost")
        target = self._leases.target(len(members))
        mine = [shard for shard in self._leases.preferred if shard.stream in self.owned]
        if len(mine) > target:
            extra = mine[target:]
            await self._leases.release(client, extra)
            for shard in extra:
                self._drop(shard, "released")
        elif len(mine) < target:
            free = [shard for shard in self._leases.preferred if shard.stream not in self.owned]
            for shard in await self._leases.acquire(client, free, target - len(mine)):
                await self._take(client, shard)
        self._report.ownership(self.owned)

    async def _take(self, client: Redis, shard: Shard) -> None:
        state = await self._load(client, shard)
        self._report.taken(state)
        log.info(
            "shard taken",
            extra={"stream": shard.stream, "assets": len(state.assets), "after": state.last_id},
        )

    async def _load(self, client: Redis, shard: Shard) -> ShardState:
        """The shard's state from its checkpoint; its pending entries are replayed next."""
        state = ShardState(shard, self._engine)
        # decode_responses=True: the reply is str -> str (redis-py types it for either mode).
        state.restore(cast("dict[str, str]", await client.hgetall(shard.checkpoint)))
        self.owned[shard.stream] = state
        self._recovering.add(shard.stream)
        self._caught_up.discard(shard.stream)
        self._report.ownership(self.owned)
        return state

    def _drop(self, shard: Shard, change: str) -> None:
        state = self.owned.pop(shard.stream, None)
        self._stale.discard(shard.stream)
        self._recovering.discard(shard.stream)
        self._caught_up.discard(shard.stream)
        if state is not None:
            self._report.dropped(state, change)
            log.info("shard %s", change, extra={"stream": shard.stream})

    async def _claim(self, client: Redis, stream: str, min_idle_ms: int) -> None:
        """Claim and process the stream's pending entries idle at least `min_idle_ms`."""
        cursor = SCAN_START
        while (state := self.owned.get(stream)) is not None:
            with translated():
                page = await autoclaim(
                    client, stream, self._group, self.name, min_idle_ms, cursor, self._batch_size
                )
                ids = [entry_id for entry_id, _ in page.entries]
                counts = await delivery_counts(client, stream, self._group, self.name, ids)
            if page.deleted:
                log.info("pending entries no longer in the stream were dropped by Redis",
                         extra={"stream": stream, "count": len(page.deleted)})  # fmt: skip
            if page.entries:
                self._metrics.claimed.labels(route=state.shard.route).inc(len(page.entries))
                await self._handle(client, [Delivery(state, page.entries, counts)])
            if page.done:
                return
            cursor = page.cursor

    async def _handle(
        self, client: Redis, deliveries: Sequence[Delivery], overlap: bool = False
    ) -> None:
        """Process `deliveries` and write their outputs. With `overlap` the write is only sent:
        the next batch is processed while Redis runs it, and its outcome is read before the next
        write is sent (`_settle`), so at most one write is in flight and writes land in order."""
        # Timed from after the read: a blocking read's wait is idle time, not work.
        started = time.perf_counter()
        result = process(deliveries, self._max_deliveries, self._errors)
        states = [d.state for d in deliveries]
        if not await self._settle(client, states):
            return
        if not overlap:
            if await self._write(client, result.outputs, states):
                self._done(result, started)
            return
        try:
            with translated():
                sent = await self._send(result.outputs)
        except BaseException:
            for state in states:
                state.rollback()
            raise
        for state in states:
            state.seal()
        self._in_flight = (sent, result, states, started)

    def _chores_due(self) -> bool:
        """Whether `_housekeeping` has more to do than look at the clock."""
        if self._stale or self._recovering:
            return True
        now = time.monotonic()
        return any(now >= self._due.get(task, 0.0) for task in _CHORES)

    async def _settle(self, client: Redis, later: Sequence[ShardState] = ()) -> bool:
        """Read the outcome of the write in flight, if any. If it did not land, the states of the
        batches processed since (`later`, not sent) are rolled back with it and their entries,
        pending for us, are replayed: False."""
        if self._in_flight is None:
            return True
        sent, result, states, started = self._in_flight
        self._in_flight = None
        if not await self._outcome(client, sent.settle(), result.outputs, states, later):
            return False
        self._done(result, started)
        return True

    def _done(self, result: Result, started: float) -> None:
        """After a batch's write landed: its failed entries remembered, its dead letters logged."""
        for key, error in result.retrying.items():
            if key not in self._errors:
                log.warning("entry failed, left pending for a retry",
                            extra={"stream": key[0], "source_id": key[1], "error": error})  # fmt: skip
            self._errors[key] = error
        for key in result.given_up:
            self._errors.pop(key, None)
        while len(self._errors) > _MAX_REMEMBERED_ERRORS:
            del self._errors[next(iter(self._errors))]
        for _, reason, letter in result.outputs.dead_letters:
            log.warning("entry dead-lettered (%s) and acked", reason, extra=letter)
        self._metrics.batch_duration.observe(time.perf_counter() - started)

    async def _sweep(self, client: Redis) -> None:
        """The time-driven checks, in stream time: Redis' clock where we are caught up, the last
        entry's time where a backlog is still being read."""
        redis_now = self._clock[0] + int((time.monotonic() - self._clock[1]) * 1000)
        clocks = [(state, redis_now if stream in self._caught_up else state.watermark_ms)
                  for stream, state in self.owned.items()]  # fmt: skip
        outputs, swept = sweep(clocks)
        if outputs:
            await self._write(client, outputs, swept)

    async def _write(self, client: Redis, outputs: Outputs, states: Sequence[ShardState]) -> bool:
        """Commit `outputs`; on success the states take the batch, on failure they roll back."""
        return await self._outcome(client, self._commit(outputs), outputs, states)

    async def _send(self, outputs: Outputs) -> Sent:
        return await send(self._redis(), self._keys, self._group, self.name, outputs,
                          self._dedup_ttl_ms, self._durability)  # fmt: skip

    async def _commit(self, outputs: Outputs) -> Written:
        return await (await self._send(outputs)).settle()

    async def _outcome(
        self, client: Redis, written: Awaitable[Written], outputs: Outputs,
        states: Sequence[ShardState], later: Sequence[ShardState] = (),
    ) -> bool:  # fmt: skip
        """Await the write of `outputs` (the batch of `states`): the states whose transaction
        landed take the batch. If any did not, every state, and the states of the batches
        processed since (`later`), roll back to their last written batch: False for lost leases,
        the error raised for an unknown outcome."""
        try:
            with translated():
                done = await written
        except BaseException:
            for state in (*later, *states):
                state.rollback_all()
            raise
        if done.error is None:
            self._committed(outputs, states, done)
            return True
        if done.landed:
            # On a cluster a batch is one transaction per slot: those that landed are written.
            part = outputs.only(done.landed)
            self._committed(part, [s for s in states if s.shard in done.landed], done)
        for state in (*later, *states):
            state.rollback_all()
        for unconfirmed in done.unconfirmed:
            self._unconfirmed.append((unconfirmed, outputs.only(unconfirmed.shards)))
        if not isinstance(done.error, LeaseLost):
            # Its outcome is unknown: the next session reloads every checkpoint.
            with translated():
                raise done.error
        for stream in done.error.streams:
            if stream in self.owned:
                self._drop(self.owned[stream].shard, "lost")
        # The batch's other shards were not written either: their entries are pending, ours.
        self._stale.update(
            s.shard.stream for s in (*later, *states) if s.shard.stream in self.owned
        )
        return False

    def _committed(self, outputs: Outputs, states: Sequence[ShardState], done: Written) -> None:
        """`states` were written with `outputs`: their batch is their checkpoint now."""
        events: dict[Shard, list[AnomalyEvent]] = {}
        for shard, event in outputs.events:
            events.setdefault(shard, []).append(event)
        for state in states:
            last_id, watermark = outputs.positions.get(
                state.shard, (state.last_id, state.watermark_ms)
            )
            state.committed(events.get(state.shard, []), last_id, watermark)
        self._report.written(outputs, done.acked, self.owned)

    async def _leave(self, client: Redis) -> None:
        """Hand the shards back (everything is checkpointed) and leave the live members."""
        if not self.connected:
            return
        shards = [state.shard for state in self.owned.values()]
        try:
            with translated():
                await self._leases.release(client, shards)
                await self._leases.leave(client)
        except DependencyUnavailable as exc:
            log.debug("leases left to expire", extra={"error": str(exc)})
        for shard in shards:
            self._drop(shard, "released")
        self._report.ownership(self.owned)

    def _mark_up(self) -> None:
        self.connected = True
        self._metrics.connected.labels(target=TARGET).set(1)
        if self._down_since is not None:
            log.info(
                "redis reconnected",
                extra={"outage_s": round(time.monotonic() - self._down_since, 1)},
            )
            self._down_since = None
        else:
            log.info(
                "consuming",
                extra={"group": self._group, "consumer": self.name, "shards": len(self._shards)},
            )

    def _mark_down(self, exc: DependencyUnavailable, delay: float) -> None:
        self.connected = False
        self._error = str(exc)
        self._metrics.connected.labels(target=TARGET).set(0)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("redis unavailable, retrying in %.1f s", delay, extra={"error": str(exc)})
        else:
            log.debug("redis still unavailable, retrying in %.1f s", delay)
