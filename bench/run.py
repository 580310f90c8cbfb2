"""Bridge benchmark: iotbridge against the naive lossless baseline, same Mosquitto and Redis, one run.

    .venv/bin/python bench/run.py                      # full run, updates bench/RESULTS.md
    .venv/bin/python bench/run.py --quick              # smoke run, small N, RESULTS.md untouched
    .venv/bin/python bench/run.py --subjects baseline,bridge
    .venv/bin/python bench/run.py --cpu-hog 0.5         # beside a neighbour busy half a core

Every subject (`baseline`: bench/baseline.py; `bridge`: one `iotbridge bridge`; `bridge2`: two
bridges in one shared subscription group) runs as its own processes, measured from outside:

1. Drain. The subject's persistent session is created (started until subscribed, then SIGTERM),
   N QoS 1 messages are queued for it at the broker, and the subject is started again. From the
   first entry seen in the stream to the N-th: msg/s, and CPU microseconds per message of the
   subject's processes (utime + stime from /proc/<pid>/stat; Redis's and Mosquitto's apart).
2. Live. With the subject running, publishers send at a fixed rate (half the drain rate, capped)
   for a bounded time; publish-to-XADD latency is the entry id's milliseconds (Redis's clock)
   minus the payload's `ts` (the publisher's clock at publish; the same host).
3. Check. Stopped, the stream is read back: its (asset, seq) pairs must equal what the broker
   acknowledged to the publishers, with no pair missing and none twice.

Numbers from this shared, noisy machine mean something only as ratios against the baseline
measured in the same run. Every wait is bounded; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ import as packages

# After the sys.path line above, as `python bench/run.py` needs it.
from bench.procs import (  # noqa: E402
    BENCH,
    Proc,
    clear_session,
    counters,
    cpu_hog,
    cpu_seconds,
    services,
    snapshot_code,
    start_all,
    stop_all,
    subject_procs,
    wait_ready,
)
from bench.results import (  # noqa: E402
    MOSQUITTO_CONF,
    RESULTS,
    About,
    Plan,
    Result,
    code_version,
    machine_note,
    markdown,
    per_round,
    summarize,
    table,
    targets,
    versions,
    write_results,
)
from bridge.record import entry_ms  # noqa: E402
from config.keys import Keys  # noqa: E402
from simulators import audit  # noqa: E402

ROUTE = "telemetry"  # the default route: plant/{site}/{line}/{asset}/telemetry
POLL_S = 0.005  # XLEN poll while draining: well under 1 % of a drain window
STALL_S = 15.0  # a stream that does not grow for this long will not: check what is missing
HOG_MAX_S = 900.0  # a --cpu-hog process ends by itself after this, should the harness die


class Stalled(Exception):
    """The stream stopped growing short of what was published; the check still counts it."""


# --- publishing -----------------------------------------------------------------------------------


def publish(
    mqtt_url: str, plan: Plan, tag: str, workdir: Path, *, start_seq: int, count: int = 0,
    rate: float = 0.0, duration_s: float = 0.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run the publisher processes (backlog: `count` in all; paced: `rate` in all) to the end."""
    n = plan.publishers
    start_at = time.time() + 1.5  # time to start and connect, so all begin together
    runs = []
    for index in range(n):
        argv = [sys.executable, str(BENCH / "publisher.py"), "--mqtt-url", mqtt_url,
                "--client-id", f"{tag}-pub-{index}", "--client", plan.publisher,
                "--assets", str(plan.assets),
                "--index", str(index), "--of", str(n), "--start-seq", str(start_seq)]  # fmt: skip
        if count:
            argv += ["--count", str(count // n + (1 if index < count % n else 0))]
        else:
            argv += ["--rate", str(rate / n), "--duration", str(duration_s)]
            argv += ["--start-at", str(start_at)]
        log = (workdir / f"{tag}-pub-{index}.err").open("wb")
        runs.append((subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=ROOT), log))
    reports = []
    limit_s = 120 + duration_s + count / 2000
    for popen, log in runs:
        try:
            out, _ = popen.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            out, _ = popen.communicate()
        log.close()
        if popen.returncode != 0 or not out.strip():
            raise RuntimeError(f"publisher exited with {popen.returncode}; see {log.name}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    return reports


def expected_pairs(
    plan: Plan, reports: list[dict[str, Any]], start_seq: int
) -> set[tuple[str, int]]:
    """What the publishers sent, rebuilt from their counts (see bench/publisher.py)."""
    pairs = set()
    for index, report in enumerate(reports):
        mine = [k for k in range(plan.assets) if k % len(reports) == index]
        for i in range(report["published"]):
            pairs.add((f"a{mine[i % len(mine)]}", start_seq + i // len(mine)))
    return pairs


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Drain:
    """A drain window: messages, seconds, and the CPU seconds each process spent in it."""

    msgs: int
    secs: float
    cpu_s: float  # the subject's processes
    redis_cpu_s: float
    broker_cpu_s: float
    startup_cpu_s: float  # the subject's, before the window


def measure_drain(
    r: redis.Redis, stream: str, procs: list[Proc], servers: tuple[int, int], n: int, plan: Plan
) -> Drain:
    """Start the subject on its backlog and measure from the first entry seen to the n-th.
    With a stagger, later processes start late."""
    begin = time.monotonic()
    waiting = [(begin + index * plan.stagger_s, proc) for index, proc in enumerate(procs)]
    running: list[Proc] = []
    first: tuple[int, float, float, list[float]] | None = None
    last_length, last_change = 0, begin
    while True:
        while waiting and waiting[0][0] <= time.monotonic():
            running.append(waiting.pop(0)[1])
            start_all(running[-1:])
        length = int(r.xlen(stream))
        now = time.monotonic()
        if first is None and length > 0:
            cpu = sum(cpu_seconds(p.pid) for p in running)
            first = (length, now, cpu, [cpu_seconds(pid) for pid in servers])
        if length >= n:
            break
        if length != last_length:
            last_length, last_change = length, now
        if now - begin > plan.drain_timeout_s or now - last_change > STALL_S:
            raise Stalled(f"drain stopped at {length:,} of {n:,} entries")
        if not all(p.alive() for p in running):
            raise RuntimeError(f"subject exited while draining: {running[0].tail()}")
        time.sleep(POLL_S)
    if waiting:
        raise RuntimeError("drained before every process started: the stagger is too long")
    cpu_end = sum(cpu_seconds(p.pid) for p in procs)
    redis_end, broker_end = (cpu_seconds(pid) for pid in servers)
    assert first is not None
    length0, t0, cpu0, (redis0, broker0) = first
    return Drain(n - length0, now - t0, cpu_end - cpu0, redis_end - redis0, broker_end - broker0,
                 cpu0)  # fmt: skip


def wait_for_length(r: redis.Redis, stream: str, n: int, phase: str) -> None:
    """Until the stream holds n entries; Stalled when it stops growing before."""
    last_length, last_change = -1, time.monotonic()
    for _ in range(100_000):  # bounded: STALL_S without growth ends it long before
        length = int(r.xlen(stream))
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


def read_stream(
    r: redis.Redis, stream: str, live_from_seq: int
) -> tuple[Counter[tuple[str, int]], list[float]]:
    """(asset, seq) counts of every entry; latencies (ms) of the entries of the live phase."""
    pairs: Counter[tuple[str, int]] = Counter()
    latencies = []
    # The client is not decode_responses: ids, keys and values are bytes.
    entries = cast(Iterator[tuple[bytes, dict[bytes, bytes]]], audit.read_stream(r, stream, 1000))
    for entry_id, fields in entries:
        seq = int(fields[b"seq"])
        pairs[(fields[b"asset"].decode(), seq)] += 1
        if seq >= live_from_seq:
            # An id carries whole milliseconds, floored: +0.5 centres the estimate (+-0.5 ms).
            added_ms = entry_ms(entry_id.decode()) + 0.5
            latencies.append(added_ms - float(fields[b"ts"]) * 1000)
    latencies.sort()
    return pairs, latencies


# --- one subject ----------------------------------------------------------------------------------


@dataclass
class Env:
    mqtt_url: str
    mqtt_port: int
    redis_url: str
    redis_pid: int
    broker_pid: int
    r: redis.Redis
    workdir: Path
    run_id: str
    code: Path  # the bridge's packages, copied at the start of the run


def run_subject(subject: str, plan: Plan, env: Env, round_no: int) -> Result:
    prefix = f"bench-{env.run_id}-r{round_no + 1}-{subject}"
    keys = Keys(prefix)
    procs = subject_procs(subject, env.mqtt_url, env.redis_url, prefix, env.workdir, env.code,
                          plan.bridge_env)  # fmt: skip
    result = Result(subject, len(procs), round_no, drain_n=plan.drain_n[subject])
    print(f"\n== round {round_no + 1}/{plan.rounds}, {subject}: {len(procs)} process(es), "
          f"drain N={result.drain_n:,}", flush=True)  # fmt: skip
    try:
        with cpu_hog(plan.cpu_hog, HOG_MAX_S):
            _measure(subject, plan, env, procs, keys, result)
    except (RuntimeError, TimeoutError, OSError, redis.RedisError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        print(f"   FAILED: {result.error}", flush=True)
        for proc in procs:
            print(f"   --- {proc.name} log tail ---\n{proc.tail()}", flush=True)
            if proc.metrics_port is not None and proc.alive():
                # The bridge's own account (received, forwarded, in flight) before it is stopped.
                status, body = services.http_get(proc.metrics_port, "/metrics", 2)
                if status == 200:
                    proc.log.with_suffix(".metrics").write_text(body)
    finally:
        codes = stop_all(procs)
        result.exit_codes = result.exit_codes or codes
        for proc in procs:
            clear_session("127.0.0.1", env.mqtt_port, proc.client_id)
        leftovers = list(env.r.scan_iter(match=f"{prefix}:*", count=1000))
        if leftovers:
            env.r.delete(*leftovers)
    return result


def _measure(
    subject: str, plan: Plan, env: Env, procs: list[Proc], keys: Keys, result: Result
) -> None:
    tag, stream = keys.prefix, keys.telemetry(ROUTE)
    expected = _session_and_backlog(plan, env, procs, tag, result)
    live_seq = max(seq for _, seq in expected) + 1  # above every backlog seq of every asset
    try:
        _drain(plan, env, procs, stream, result)
        wait_ready(procs)
        cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        expected |= _live(plan, env, procs, tag, live_seq, result)
        wait_for_length(env.r, stream, len(expected), "live")
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
        result.live_cpu_us = cpu / result.live_msgs * 1e6
    except Stalled as exc:
        result.error = str(exc)
        print(f"   FAILED: {exc}", flush=True)
    _check(env, procs, keys, expected, live_seq, result)


def _session_and_backlog(
    plan: Plan, env: Env, procs: list[Proc], tag: str, result: Result
) -> set[tuple[str, int]]:
    """Create the persistent session(s): subscribed once, then away while the backlog queues."""
    start_all(procs)
    wait_ready(procs)
    codes = stop_all(procs)
    if any(code != 0 for code in codes):
        raise RuntimeError(f"subject exited with {codes} after creating its session")
    backlog = publish(env.mqtt_url, plan, f"{tag}-backlog", env.workdir,
                      start_seq=0, count=result.drain_n)  # fmt: skip
    if not all(rep["all_acked"] for rep in backlog):
        raise RuntimeError(f"backlog not fully acknowledged by the broker: {backlog}")
    return expected_pairs(plan, backlog, 0)


def _drain(plan: Plan, env: Env, procs: list[Proc], stream: str, result: Result) -> None:
    servers = (env.redis_pid, env.broker_pid)
    drain = measure_drain(env.r, stream, procs, servers, result.drain_n, plan)
    msgs = result.drain_msgs = drain.msgs
    result.drain_s, result.startup_cpu_s = drain.secs, drain.startup_cpu_s
    result.rate = msgs / drain.secs
    result.cpu_us = drain.cpu_s / msgs * 1e6
    result.redis_cpu_us = drain.redis_cpu_s / msgs * 1e6
    result.broker_cpu_us = drain.broker_cpu_s / msgs * 1e6
    print(f"   drain: {msgs} msgs in {drain.secs:.2f} s = {result.rate:,.0f} msg/s, "
          f"{result.cpu_us:.0f} CPU us/msg (+ Redis {result.redis_cpu_us:.0f}, "
          f"Mosquitto {result.broker_cpu_us:.0f})", flush=True)  # fmt: skip


def _live(
    plan: Plan, env: Env, procs: list[Proc], tag: str, live_seq: int, result: Result
) -> set[tuple[str, int]]:
    """Publish to the running subject at a fixed rate; what was published."""
    result.live_target_rate = min(result.rate * plan.live_fraction, plan.max_live_rate)
    live = publish(env.mqtt_url, plan, f"{tag}-live", env.workdir, start_seq=live_seq,
                   rate=result.live_target_rate, duration_s=plan.live_s)  # fmt: skip
    if not all(rep["all_acked"] for rep in live):
        raise RuntimeError(f"live messages not fully acknowledged by the broker: {live}")
    result.live_msgs = sum(rep["published"] for rep in live)
    result.live_rate = sum(rep["rate"] for rep in live)
    result.publisher_max_lag_ms = max(rep["max_lag_s"] for rep in live) * 1000
    result.publisher_cpu_us = sum(rep["cpu_s"] for rep in live) / result.live_msgs * 1e6
    return expected_pairs(plan, live, live_seq)


def _check(
    env: Env, procs: list[Proc], keys: Keys, expected: set[tuple[str, int]], live_seq: int,
    result: Result,
) -> None:  # fmt: skip
    """Stop the subject, then: exactly what was published is in the stream, once each."""
    result.counters = [counters(p) for p in procs if p.metrics_port is not None and p.alive()]
    result.exit_codes = stop_all(procs)
    pairs, latencies = read_stream(env.r, keys.telemetry(ROUTE), live_seq)
    result.published = len(expected)
    result.stored = sum(pairs.values())
    result.lost = len(expected - pairs.keys())
    result.unexpected = len(pairs.keys() - expected)
    result.duplicated = sum(count - 1 for count in pairs.values() if count > 1)
    result.dead_letters = int(env.r.xlen(keys.dead_letters))
    result.p50_ms = percentile(latencies, 0.50)
    result.p99_ms = percentile(latencies, 0.99)
    result.max_ms = latencies[-1] if latencies else math.nan
    print(f"   live: {result.live_rate:,.0f} msg/s achieved (target {result.live_target_rate:,.0f}), "
          f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, max {result.max_ms:.1f} ms; "
          f"subject {result.live_cpu_us:.0f} CPU us/msg, publishers {result.publisher_cpu_us:.0f}, "
          f"publisher max lag {result.publisher_max_lag_ms:.1f} ms", flush=True)  # fmt: skip
    print(f"   check: published {result.published}, stored {result.stored}, lost {result.lost}, "
          f"duplicated {result.duplicated}, unexpected {result.unexpected}, "
          f"dead letters {result.dead_letters}, exit codes {result.exit_codes}"
          + (f", bridge counters {result.counters}" if result.counters else ""),
          flush=True)  # fmt: skip


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, short live phase (smoke)")
    parser.add_argument("--subjects", default="baseline,bridge,bridge2",
                        help="comma-separated: baseline, bridge, bridge2")  # fmt: skip
    parser.add_argument("--n-baseline", type=int, help="backlog of the baseline")
    parser.add_argument("--n-bridge", type=int, help="backlog of bridge and bridge2")
    parser.add_argument("--live-s", type=float, help="seconds of the live phase")
    parser.add_argument("--rounds", type=int, help="rounds of all subjects (default 3; quick 1)")
    parser.add_argument("--assets", type=int, default=1000)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--publisher", choices=["raw", "paho"], default="raw",
                        help="publisher client (bench/publisher.py)")  # fmt: skip
    parser.add_argument("--live-fraction", type=float, default=0.5,
                        help="live rate as a fraction of the subject's drain rate")  # fmt: skip
    parser.add_argument("--max-live-rate", type=float, default=25_000,
                        help="cap of the live rate: what the publishers sustain here")  # fmt: skip
    parser.add_argument("--results", choices=["auto", "write", "skip"], default="auto",
                        help="update bench/RESULTS.md (auto: on full runs only)")  # fmt: skip
    parser.add_argument("--bridge-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra setting for the bridges, e.g. IOTBRIDGE_BRIDGE__BATCH__MAX_SIZE=1000")  # fmt: skip
    parser.add_argument("--stagger-s", type=float, default=0.0,
                        help="bridge2: start the second bridge this much later (uneven drain)")  # fmt: skip
    parser.add_argument("--cpu-hog", type=float, default=0.0, metavar="FRACTION",
                        help="run a process busy this fraction of one core beside each subject "
                             "(a noisy neighbour), e.g. 0.5")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = set(subjects) - {"baseline", "bridge", "bridge2"}
    if unknown or not subjects:
        parser.error(f"unknown subjects: {sorted(unknown)}")
    args.subject_list = subjects
    n_base = args.n_baseline or (2_000 if args.quick else 10_000)
    n_bridge = args.n_bridge or (10_000 if args.quick else 100_000)
    plan = Plan(
        assets=args.assets,
        drain_n={s: n_base if s == "baseline" else n_bridge for s in subjects},
        live_s=args.live_s or (3.0 if args.quick else 10.0),
        live_fraction=args.live_fraction,
        max_live_rate=args.max_live_rate,
        publishers=args.publishers,
        publisher=args.publisher,
        rounds=args.rounds or (1 if args.quick else 3),
        stagger_s=args.stagger_s,
        cpu_hog=args.cpu_hog,
        bridge_env=dict(item.split("=", 1) for item in args.bridge_env),
        drain_timeout_s=180.0,
    )
    return args, plan


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    command = " ".join([".venv/bin/python bench/run.py", *(argv or sys.argv[1:])])
    workdir = Path(tempfile.mkdtemp(prefix="iotbridge-bench-"))
    code, code_hash = snapshot_code(workdir / "code")
    servers: list[Any] = []
    results: list[Result] = []
    try:
        mosq = services.mosquitto_service(workdir / "mosquitto", extra_conf=MOSQUITTO_CONF)
        red = services.redis_service(workdir / "redis")
        if mosq is None or red is None:
            print("bench needs mosquitto and redis-server (make services)", file=sys.stderr)
            return 2
        servers = [mosq.start(), red.start()]
        about = About(dt.datetime.now(dt.UTC), command, machine_note(), code_version(code_hash),
                      versions(mosq.argv[0], red.argv[0]))  # fmt: skip
        r = redis.Redis(host="127.0.0.1", port=red.port)
        env = Env(f"mqtt://127.0.0.1:{mosq.port}", mosq.port, f"redis://127.0.0.1:{red.port}/0",
                  red.pid, mosq.pid, r, workdir, uuid.uuid4().hex[:6], code)  # fmt: skip
        print(f"mosquitto {env.mqtt_url}, redis {env.redis_url}, work dir {workdir}")
        print(f"machine: {about.machine}\ncode: {about.code}\nservers: {about.servers}")
        results = [
            run_subject(subject, plan, env, round_no)
            for round_no in range(plan.rounds)
            for subject in args.subject_list
        ]
        r.close()
    finally:
        for server in reversed(servers):
            server.stop()
    if plan.rounds > 1:
        print("\n" + table(per_round(results)))
    print("\n" + table(summarize(results)) + "\n")
    for note in targets(results):
        print(f"- {note}")
    (workdir / "results.json").write_text(json.dumps([asdict(x) for x in results], indent=2))
    if args.results == "write" or (args.results == "auto" and not args.quick):
        write_results(markdown(results, plan, about))
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    ok = all(x.ok for x in results)
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
