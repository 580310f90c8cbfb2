"""Dead-letter replay against the gateway's own ingest, in one run, same Redis, same process.

    .venv/bin/python bench/admin_replay_bench.py                  # prints, writes its section
    .venv/bin/python bench/admin_replay_bench.py --letters 2000 --rounds 1 --results skip

Per round, against a redis-server of its own on a free loopback port:
1. N readings refused by a too-strict contract are dead-lettered (a gateway with that contract).
2. A gateway with the fixed contract serves HTTP in this process. Baseline: N other valid
   readings go through `ctx.ingest` (the path every HTTP message takes), 500 in flight at a time
   as the replay does: readings/s and CPU per reading.
3. `POST /api/v1/dead-letters/replay` over HTTP replays the N dead letters (read, re-validated,
   written through the dedup, removed): letters/s and CPU per letter; checked: N stored, the
   stream holds 2N entries, the dead-letter stream is empty; a second replay stores 0.
CPU is this process's (user + system, resource.getrusage) plus redis-server's (/proc), over the
step. The ratio replay/ingest says what reading and removing the dead letters costs on top.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ import as packages

services = importlib.import_module("tests.services")
redis_cpu_s = importlib.import_module("tests.faults").cpu_s

from config.settings import Settings  # noqa: E402
from gateway.server import GatewayApp  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- admin-replay-bench: begin -->", "<!-- admin-replay-bench: end -->"
TOKEN = "bench-admin-token-0123456789abcdef"  # noqa: S105 -- a throwaway gateway of the run
IN_FLIGHT = 500
ASSETS = 100


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def settings(redis_url: str, prefix: str, flow_max: float) -> Settings:
    return Settings(
        redis={"url": redis_url, "key_prefix": prefix},
        bridge={
            "routes": [{"name": "pumps", "topic": "plant/{site}/{line}/{asset}/pump",
                        "contract": "pump"}],
            "contracts": {"pump": {"values": {"flow": {"type": "number", "min": 0,
                                                       "max": flow_max}}}},
        },
        gateway={"host": "127.0.0.1", "port": 0, "admin_token": TOKEN},
    )  # fmt: skip


def payload(seq: int, flow: float) -> bytes:
    return json.dumps({"ts": time.time(), "seq": seq, "values": {"flow": flow}}).encode()


def topic(i: int) -> str:
    return f"plant/s1/l1/p{i % ASSETS}/pump"


async def gateway(config: Settings) -> tuple[GatewayApp, asyncio.Event, asyncio.Task[None]]:
    app = GatewayApp(config, CollectorRegistry())
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    async with asyncio.timeout(15):
        while not app.readiness()[0]:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)
    return app, stop, task


async def ingest_all(app: GatewayApp, items: list[tuple[str, bytes]]) -> list[str]:
    statuses: list[str] = []
    for start in range(0, len(items), IN_FLIGHT):
        chunk = items[start : start + IN_FLIGHT]
        outcomes = await asyncio.gather(*(app.ingestor.ingest(t, p) for t, p in chunk))
        statuses += [o.status for o in outcomes]
    return statuses


async def one_round(redis_url: str, redis_pid: int, letters: int) -> dict[str, Any]:
    prefix = "b" + uuid.uuid4().hex[:8]
    # Sequence numbers per asset: the dead letters take 0.., the baseline readings follow them.
    refused = [(topic(i), payload(i // ASSETS, 50.0)) for i in range(letters)]
    valid = [(topic(i), payload(letters + i // ASSETS, 50.0)) for i in range(letters)]

    app, stop, task = await gateway(settings(redis_url, prefix, flow_max=10))
    assert set(await ingest_all(app, refused)) == {"rejected"}
    stop.set()
    await task

    app, stop, task = await gateway(settings(redis_url, prefix, flow_max=500))
    keys = app.keys
    try:
        cpu0, rcpu0, t0 = _self_cpu_s(), redis_cpu_s(redis_pid), time.perf_counter()
        assert set(await ingest_all(app, valid)) == {"stored"}
        ingest_s = time.perf_counter() - t0
        ingest_cpu = _self_cpu_s() - cpu0, redis_cpu_s(redis_pid) - rcpu0

        headers = {"Authorization": f"Bearer {TOKEN}"}
        base = f"http://127.0.0.1:{app.port}"
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600) as http:
            cpu0, rcpu0, t0 = _self_cpu_s(), redis_cpu_s(redis_pid), time.perf_counter()
            first = (await http.post("/api/v1/dead-letters/replay", json={"limit": letters})).json()
            replay_s = time.perf_counter() - t0
            replay_cpu = _self_cpu_s() - cpu0, redis_cpu_s(redis_pid) - rcpu0
            again = (await http.post("/api/v1/dead-letters/replay", json={})).json()
        stream = int(await app.reader.xlen(keys.telemetry("pumps")))
        left = int(await app.reader.xlen(keys.dead_letters))
    finally:
        stop.set()
        await task
    assert first["stored"] == letters, first
    assert again["matched"] == 0, again
    assert (stream, left) == (2 * letters, 0), (stream, left)
    return {
        "ingest_per_s": letters / ingest_s,
        "replay_per_s": letters / replay_s,
        "ingest_cpu_us": [c / letters * 1e6 for c in ingest_cpu],
        "replay_cpu_us": [c / letters * 1e6 for c in replay_cpu],
    }


def section(rounds: list[dict[str, Any]], letters: int) -> str:
    def med(key: str, index: int | None = None) -> float:
        values = [r[key] if index is None else r[key][index] for r in rounds]
        return float(statistics.median(values))

    ratio = statistics.median(r["replay_per_s"] / r["ingest_per_s"] for r in rounds)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        BEGIN,
        f"### Latest run: {when}, {letters:,} dead letters, {len(rounds)} round(s), medians",
        "",
        "| step | per s | CPU µs each: gateway process | redis-server |",
        "| --- | --- | --- | --- |",
        f"| ingest (baseline: `ctx.ingest`, {IN_FLIGHT} in flight) | {med('ingest_per_s'):,.0f} "
        f"| {med('ingest_cpu_us', 0):.0f} | {med('ingest_cpu_us', 1):.0f} |",
        f"| replay-all (`POST /api/v1/dead-letters/replay`) | {med('replay_per_s'):,.0f} "
        f"| {med('replay_cpu_us', 0):.0f} | {med('replay_cpu_us', 1):.0f} |",
        "",
        f"Replay against ingest in the same round: {ratio:.2f}x. Every round checked: "
        f"{letters:,} stored, the stream 2x{letters:,} entries, no dead letter left, a second "
        "replay 0.",
        END,
    ])  # fmt: skip


def write(text: str) -> None:
    current = RESULTS.read_text()
    if BEGIN in current:
        head, rest = current.split(BEGIN, 1)
        current = head + text + rest.split(END, 1)[1]
    else:
        current += "\n## Gateway: dead-letter replay\n\n`bench/admin_replay_bench.py`: " \
                   "replay-all against the gateway's ingest, same Redis, same process.\n\n" + text + "\n"  # fmt: skip
    RESULTS.write_text(current)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--letters", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", choices=["write", "skip"], default="write")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        redis = services.redis_service(Path(tmp))
        if redis is None:
            sys.exit("redis-server is not installed")
        redis.start()
        try:
            url = f"redis://127.0.0.1:{redis.port}/0"
            rounds = [await one_round(url, redis.pid, args.letters) for _ in range(args.rounds)]
        finally:
            redis.stop()
    for number, result in enumerate(rounds, 1):
        print(f"round {number}: " + json.dumps(result))
    text = section(rounds, args.letters)
    print(text)
    if args.results == "write":
        write(text)


if __name__ == "__main__":
    asyncio.run(main())
