"""Worker benchmark: entries/s and CPU per entry of one worker process with every detector on,
against a consumer that only reads and acks, on the same stream in the same run.

    .venv/bin/python bench/worker_bench.py                  # 200,000 entries, 2,000 assets
    .venv/bin/python bench/worker_bench.py --entries 50000 --assets 500 --batch 1000

A redis-server is started on a free loopback port (or `--redis-url` is used). One stream is filled
with entries laid out as the bridge writes them (bridge.record), with values like the fleet
simulator's (temperature 40-70, vibration 1-4, pressure 2-6, noise, a slow cycle, one sample in a
thousand out of range), then each mode drains the whole stream in its own consumer group (the
stream is read three times, not copied):

- `ack-only`: XREADGROUP COUNT batch, then XACK: the floor of any consumer;
- `bare`:     the worker (`WorkerApp`) with no detector: leases, decoding, the transaction with the
              checkpoint, metrics;
- `full`:     the worker with the shipped detectors (every one of them).

Time runs from the mode's start to the last entry acked; CPU is this process's user + system time
over the same window (the worker runs in this process), Redis' apart (from /proc). Last, the state
kept per asset is measured with tracemalloc for `--state-assets` assets fed past the warm-up.
Numbers from a shared machine mean something only as ratios within one run. To compare two
commits, run each tree's code with this file (`PYTHONPATH=<tree> python <this file>`): the
project's modules are imported before this file adds its own tree to the path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import math
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from config.keys import Keys
from config.settings import Settings
from workers.app import WorkerApp
from workers.detectors import Check, build_checks
from workers.sample import Sample
from workers.state import Engine, Shard, ShardState

ROUTE = "telemetry"
T0 = 1_700_000_000.0
ANOMALY_RATE = 0.001
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests/ imports as a package
# The integration tests' server helpers, imported by name so that `mypy bench` checks bench only.
services = importlib.import_module("tests.services")
cpu_seconds = importlib.import_module("bench.procs").cpu_seconds


class Readings:
    """Deterministic readings like the fleet simulator's, asset by asset."""

    def __init__(self, assets: int, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self.names = [f"a{i + 1:06d}" for i in range(assets)]
        self._base = [(48 + 14 * self._rng.random(), 1.8 + 1.2 * self._rng.random(),
                       3.2 + 1.6 * self._rng.random(), 6.3 * self._rng.random())
                      for _ in range(assets)]  # fmt: skip

    def values(self, index: int, seq: int) -> dict[str, float]:
        temperature, vibration, pressure, phase = self._base[index]
        gauss = self._rng.gauss
        values = {
            "temperature": round(temperature + 3 * math.sin(seq / 95 + phase) + gauss(0, 0.6), 3),
            "vibration": round(vibration + gauss(0, 0.15), 3),
            "pressure": round(pressure + gauss(0, 0.08), 3),
        }
        if self._rng.random() < ANOMALY_RATE:
            values["temperature"] = round(96 + 14 * self._rng.random(), 3)
        return values


async def fill(client: Redis, stream: str, entries: int, assets: int) -> None:
    """`entries` entries, asset by asset round-robin, as the bridge lays them out."""
    readings = Readings(assets)
    for start in range(0, entries, 5000):
        async with client.pipeline(transaction=False) as pipe:
            for n in range(start, min(entries, start + 5000)):
                index, seq = n % assets, n // assets
                asset = readings.names[index]
                fields: dict[Any, Any] = {
                    "asset": asset, "seq": seq, "ts": repr(T0 + seq),
                    "topic": f"plant/s1/l1/{asset}/telemetry", "route": ROUTE,
                    "rx": repr(T0 + seq + 0.01), "site": "s1", "line": "l1",
                }  # fmt: skip
                values = readings.values(index, seq)
                fields.update({f"v.{name}": repr(value) for name, value in values.items()})
                pipe.xadd(stream, fields)
            await pipe.execute()


async def drained(client: Redis, stream: str, group: str, total: int) -> bool:
    for info in await client.xinfo_groups(stream):
        if info["name"] == group:
            return bool(info["entries-read"] == total and info["pending"] == 0)
    return False


async def ack_only(client: Redis, stream: str, group: str, batch: int, total: int) -> None:
    await client.xgroup_create(stream, group, id="0")
    done = 0
    while done < total:
        reply = await client.xreadgroup(group, "c", {stream: ">"}, count=batch, block=100)
        for _, items in cast("list[tuple[str, list[tuple[str, Any]]]]", reply or []):
            ids = [entry_id for entry_id, _ in items]
            done += await client.xack(stream, group, *ids)


async def worker(url: str, prefix: str, group: str, batch: int, total: int, full: bool) -> None:
    settings = Settings(
        redis={"url": url, "key_prefix": prefix},
        worker={"group": group, "consumer": f"{group}-1", "batch_size": batch, "block_ms": 100},
    )
    checks: list[Check] | None = None if full else []
    app = WorkerApp(settings, CollectorRegistry(), checks)
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    client = Redis.from_url(url, decode_responses=True)
    stream = Keys(prefix).telemetry(ROUTE)
    try:
        # Redis has no event to wait on: poll (50 XINFO a second, noise next to the worker).
        while not await drained(client, stream, group, total):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task
        await client.aclose()


async def measure(
    name: str, redis_pid: int, run: Callable[[], Awaitable[None]], total: int
) -> dict[str, float]:
    # As `iotbridge worker` does before it serves: what exists by now is out of the collector's
    # reach, so a full collection scans only what the mode itself made (not the filled stream's
    # leftovers or an earlier mode's).
    gc.collect()
    gc.freeze()
    cpu, redis_cpu, wall = time.process_time(), cpu_seconds(redis_pid), time.perf_counter()
    await run()
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    redis_cpu = cpu_seconds(redis_pid) - redis_cpu
    row = {"entries/s": total / wall, "cpu us/entry": cpu * 1e6 / total,
           "redis cpu us/entry": redis_cpu * 1e6 / total, "seconds": wall}  # fmt: skip
    print(f"{name:<9} {row['entries/s']:10,.0f} entries/s  {row['cpu us/entry']:6.1f} CPU us/entry  "
          f"(redis {row['redis cpu us/entry']:5.1f})  {wall:6.2f} s", flush=True)  # fmt: skip
    return row


def state_bytes_per_asset(assets: int, samples: int) -> tuple[float, float]:
    """Bytes of detector state per asset (tracemalloc), and checkpoint bytes per asset."""
    readings = Readings(assets)
    engine = Engine(build_checks(Settings().worker.detectors))
    tracemalloc.start()
    state = ShardState(Shard(ROUTE, 0, "s", "l", "c"), engine)
    base = tracemalloc.get_traced_memory()[0]
    for seq in range(samples):
        out: list[Any] = []
        for index, asset in enumerate(readings.names):
            sample = Sample(f"{seq + 1}-{index}", ROUTE, asset, seq, repr(T0 + seq), T0 + seq,
                            readings.values(index, seq))  # fmt: skip
            state.feed(sample, out)
        state.committed(out, f"{seq + 1}-0", seq + 1)
    kept = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    for asset in readings.names:  # every row touched: a checkpoint of the whole shard
        state.feed(Sample("9-9", ROUTE, asset, samples, "0", T0 + samples, {}), [])
    checkpoint = state.checkpoint_fields("9-9", 9)
    size = sum(len(k) + len(v) for k, v in checkpoint.items())
    return kept / assets, size / assets


async def main(args: argparse.Namespace) -> None:
    service = None
    url = args.redis_url
    if url is None:
        service = services.redis_service(Path(tempfile.mkdtemp(prefix="worker-bench-")))
        service.start()
        url = f"redis://127.0.0.1:{service.port}/0"
    client = Redis.from_url(url, decode_responses=True)
    prefix = f"wbench{os.getpid()}"
    stream = Keys(prefix).telemetry(ROUTE)
    try:
        started = time.perf_counter()
        await fill(client, stream, args.entries, args.assets)
        print(f"filled {args.entries:,} entries of {args.assets:,} assets in "
              f"{time.perf_counter() - started:.1f} s; batch {args.batch}", flush=True)  # fmt: skip
        pid = service.pid if service else int((await client.info("server"))["process_id"])
        total = args.entries
        floor = await measure(
            "ack-only", pid, lambda: ack_only(client, stream, "ack", args.batch, total), total
        )
        await measure(
            "bare", pid, lambda: worker(url, prefix, "bare", args.batch, total, False), total
        )
        full = await measure(
            "full", pid, lambda: worker(url, prefix, "full", args.batch, total, True), total
        )
        print(f"full / ack-only: {full['entries/s'] / floor['entries/s']:.2f} of the rate, "
              f"{full['cpu us/entry'] / floor['cpu us/entry']:.1f}x the CPU per entry")  # fmt: skip
        per_asset, checkpoint = state_bytes_per_asset(args.state_assets, 40)
        print(f"state: {per_asset:,.0f} bytes per asset in memory (tracemalloc, "
              f"{args.state_assets:,} assets, every detector), {checkpoint:,.0f} bytes per asset "
              f"in the checkpoint")  # fmt: skip
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        if service is not None:
            service.stop()
            shutil.rmtree(service.workdir, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--assets", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--state-assets", type=int, default=10_000)
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    asyncio.run(main(parser.parse_args()))
