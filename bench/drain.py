"""What the harness measures from outside: the drain window of a subject (started on its backlog,
from the first message it delivered to the N-th, with the CPU each process spent inside it), and
the streams read back (pairs stored, publish-to-XADD latencies).

Three ends of a window: a bridge's N-th entry in its telemetry stream(s); the pipeline's worker
group having read and acknowledged all N entries; the C subscriber's exit after its N-th message
(`mosquitto_sub -C N`).
"""

from __future__ import annotations

import math
import os
import select
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis

from bench.procs import Proc, cpu_seconds, start_all, wait_ready
from bench.results import Plan
from bridge.record import entry_ms
from simulators import audit

POLL_S = 0.005  # XLEN poll while draining: well under 1 % of a drain window
STALL_S = 15.0  # a drain that makes no progress for this long will not: check what is missing


class Stalled(Exception):
    """The drain stopped short of N; the check still counts what arrived."""


@dataclass
class Drain:
    """A drain window: messages, seconds, and the CPU seconds each process spent in it."""

    msgs: int
    secs: float
    cpu_s: dict[str, float]  # the subject's processes, by name
    redis_cpu_s: float
    broker_cpu_s: float
    startup_cpu_s: float  # the subject's, before the window
    received: int = 0  # the C subscriber: messages it counted

    @property
    def subject_cpu_s(self) -> float:
        return sum(self.cpu_s.values())


def stored(r: redis.Redis, streams: list[str]) -> int:
    """Entries in the telemetry streams (every shard)."""
    if len(streams) == 1:
        return int(r.xlen(streams[0]))
    with r.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
        return sum(int(x) for x in pipe.execute())


def consumed(r: redis.Redis, streams: list[str], group: str) -> tuple[int, int, int]:
    """(stored, read by the group, pending in the group) over every shard stream. A group whose
    lag is 0 has read the whole stream, whatever its entries-read counter says (Redis 7.0 can
    leave that counter unknown)."""
    with r.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        replies = pipe.execute(raise_on_error=False)
    total = read = pending = 0
    for length, groups in zip(replies[::2], replies[1::2], strict=True):
        if isinstance(length, Exception):
            continue
        total += int(length)
        mine = _group(groups, group) if isinstance(groups, list) else None
        if mine is None:
            continue
        entries_read = int(mine.get("entries-read") or 0)
        read += int(length) if mine.get("lag") == 0 else entries_read
        pending += int(mine.get("pending") or 0)
    return total, read, pending


def _group(groups: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for info in groups:
        found = info.get("name")
        if (found.decode() if isinstance(found, bytes) else found) == name:
            return info
    return None


def measure_drain(
    r: redis.Redis, streams: list[str], procs: list[Proc], servers: tuple[int, int], n: int,
    plan: Plan, group: str | None = None,
) -> Drain:  # fmt: skip
    """Start the subject on its backlog and measure from the first entry seen to the n-th (with
    a group: to the group having read and acked all n). Processes marked `early` (the worker)
    start first and are ready before the window can open; with a stagger, later ones start late."""
    early = [p for p in procs if p.early]
    start_all(early)
    wait_ready(early)
    begin = time.monotonic()
    waiting = [
        (begin + i * plan.stagger_s, p) for i, p in enumerate(p for p in procs if not p.early)
    ]
    running: list[Proc] = list(early)
    first: tuple[int, float, dict[str, float], list[float]] | None = None
    last_progress, last_change = -1, begin
    while True:
        while waiting and waiting[0][0] <= time.monotonic():
            running.append(waiting.pop(0)[1])
            start_all(running[-1:])
        if group is None:
            length = read = stored(r, streams)
            pending = 0
        else:
            length, read, pending = consumed(r, streams, group)
        now = time.monotonic()
        if first is None and length > 0:
            first = (length, now, _cpu(running), [cpu_seconds(pid) for pid in servers])
        if length >= n and read >= n and pending == 0:
            break
        if length + read != last_progress:
            last_progress, last_change = length + read, now
        if now - begin > plan.drain_timeout_s or now - last_change > STALL_S:
            raise Stalled(f"drain stopped at {length:,} stored, {read:,} read, {pending:,} "
                          f"pending of {n:,}")  # fmt: skip
        if not all(p.alive() for p in running):
            dead = next(p for p in running if not p.alive())
            raise RuntimeError(f"{dead.name} exited while draining: {dead.tail()}")
        time.sleep(POLL_S)
    if waiting:
        raise RuntimeError("drained before every process started: the stagger is too long")
    cpu_end = _cpu(procs)
    redis_end, broker_end = (cpu_seconds(pid) for pid in servers)
    assert first is not None
    length0, t0, cpu0, (redis0, broker0) = first
    return Drain(n - length0, now - t0, {k: cpu_end[k] - cpu0.get(k, 0.0) for k in cpu_end},
                 redis_end - redis0, broker_end - broker0, sum(cpu0.values()))  # fmt: skip


def _cpu(procs: list[Proc]) -> dict[str, float]:
    return {p.name: cpu_seconds(p.pid) for p in procs}


def measure_limit(proc: Proc, broker_pid: int, n: int, plan: Plan) -> Drain:
    """Start the C subscriber on its backlog; from its start to its exit after the n-th message
    (exact: a pidfd). It writes nothing we could poll, so the window includes its start and
    connect (a few ms: under 1 % of a 100,000 drain, against the limit). Its CPU is read from
    /proc while it is a zombie, before it is reaped; it exits 0 only once it has counted n."""
    broker0 = cpu_seconds(broker_pid)
    start_all([proc])
    begin = time.monotonic()
    pidfd = os.pidfd_open(proc.pid)
    try:
        if not select.select([pidfd], [], [], plan.drain_timeout_s)[0]:
            proc.terminate()
            raise Stalled(f"mosquitto_sub had not counted {n:,} messages after "
                          f"{plan.drain_timeout_s:.0f} s")  # fmt: skip
        secs = time.monotonic() - begin
        cpu, broker_cpu = cpu_seconds(proc.pid), cpu_seconds(broker_pid) - broker0
    finally:
        os.close(pidfd)
    code = proc.wait()
    return Drain(n, secs, {proc.name: cpu}, 0.0, broker_cpu, 0.0, received=n if code == 0 else 0)


def run_to_exit(argv: list[str], what: str, timeout_s: float = 30) -> None:
    """A short command that must succeed (the C subscriber creating its session)."""
    done = subprocess.run(argv, capture_output=True, timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} exited with {done.returncode}: {done.stderr.decode()[-500:]}")


def wait_for_length(r: redis.Redis, streams: list[str], n: int, phase: str) -> None:
    """Until the streams hold n entries; Stalled when they stop growing before."""
    last_length, last_change = -1, time.monotonic()
    for _ in range(100_000):  # bounded: STALL_S without growth ends it long before
        length = stored(r, streams)
        if length >= n:
            return
        now = time.monotonic()
        if length != last_length:
            last_length, last_change = length, now
        elif now - last_change > STALL_S:
            break
        time.sleep(0.02)
    raise Stalled(f"{phase}: stream stopped at {last_length:,} of {n:,} entries")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def read_streams(
    r: redis.Redis, streams: list[str], live_from_seq: int
) -> tuple[Counter[tuple[str, int]], list[float]]:
    """(asset, seq) counts of every entry; latencies (ms) of the entries of the live phase."""
    pairs: Counter[tuple[str, int]] = Counter()
    latencies = []
    # The client is not decode_responses: ids, keys and values are bytes.
    every = (e for stream in streams for e in audit.read_stream(r, stream, 1000))
    entries = cast(Iterator[tuple[bytes, dict[bytes, bytes]]], every)
    for entry_id, fields in entries:
        seq = int(fields[b"seq"])
        pairs[(fields[b"asset"].decode(), seq)] += 1
        if seq >= live_from_seq:
            # An id carries whole milliseconds, floored: +0.5 centres the estimate (+-0.5 ms).
            added_ms = entry_ms(entry_id.decode()) + 0.5
            latencies.append(added_ms - float(fields[b"ts"]) * 1000)
    latencies.sort()
    return pairs, latencies
