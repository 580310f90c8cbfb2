"""Bridge benchmark: iotbridge against the limit (a C subscriber) and the naive lossless baseline,
the whole pipeline (bridge + worker) beside them, same Mosquitto and Redis, one run.

    .venv/bin/python bench/run.py                      # full run, updates bench/RESULTS.md
    .venv/bin/python bench/run.py --quick              # smoke run, small N, RESULTS.md untouched
    .venv/bin/python bench/run.py --subjects limit,bridge,pipeline --rounds 1 --results skip
    .venv/bin/python bench/run.py --cpu-hog 0.5         # beside a neighbour busy half a core

Every subject runs as its own processes, measured from outside: `limit` (`mosquitto_sub`, which
only counts what it receives: what this broker delivers to one QoS 1 session), `baseline`
(bench/baseline.py), `bridge` (one `iotbridge bridge`), `bridge2` (two bridges in one shared
subscription group), `pipeline` (one bridge and one `iotbridge worker` with every detector).

1. Drain. The subject's persistent session is created (started until subscribed, then SIGTERM;
   the C subscriber with `-E`), N QoS 1 messages are queued for it at the broker, and the subject
   is started again. From the first entry seen in the stream to the N-th (the limit: from its
   first message written out to its exit after the N-th; the pipeline: until the worker's group
   has read and acked all N): msg/s, and CPU microseconds per message of the subject's processes
   (utime + stime from /proc/<pid>/stat; Redis's and Mosquitto's apart).
2. Live (bridges and baseline). With the subject running, publishers send at a fixed rate (half
   the drain rate just measured, uncapped unless `--max-live-rate`) for a bounded time;
   publish-to-XADD latency is the entry id's milliseconds (Redis's clock) minus the payload's
   `ts` (the publisher's clock at publish). A round whose publishers fell short of the rate
   (below `LIVE_RATE_KEPT` of it) does not count towards the latency goal.
3. Check. Stopped, the stream is read back: its (asset, seq) pairs must equal what the broker
   acknowledged to the publishers, with no pair missing and none twice (the limit: it counted N).

Then bench/worker_bench.py: the worker alone on stored entries, every detector on, each run after
a run of the same bench on the worker of `--worker-base` (the commit its speed was first measured
at), whose ratio is the worker's goal.
Numbers from this shared, noisy machine mean something only as ratios against the limit and the
baseline measured in the same round. Every wait is bounded; only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ import as packages

# After the sys.path line above, as `python bench/run.py` needs it.
from bench.drain import (  # noqa: E402
    Drain,
    Stalled,
    measure_drain,
    measure_limit,
    percentile,
    read_streams,
    run_to_exit,
    wait_for_length,
)
from bench.procs import (  # noqa: E402
    SUBJECTS,
    Layout,
    Proc,
    clear_session,
    counters,
    cpu_hog,
    cpu_seconds,
    layout,
    services,
    snapshot_code,
    start_all,
    stop_all,
    subject_procs,
    wait_ready,
    worker_bench,
)
from bench.publisher import expected_pairs, publish  # noqa: E402
from bench.results import (  # noqa: E402
    MOSQUITTO_CONF,
    RESULTS,
    WORKER_BASE,
    About,
    Plan,
    Result,
    WorkerBench,
    code_version,
    goals_table,
    machine_note,
    markdown,
    per_round,
    summarize,
    table,
    targets,
    versions,
    write_results,
)
from config.keys import Keys  # noqa: E402

ROUTE = "telemetry"  # the default route: plant/{site}/{line}/{asset}/telemetry
HOG_MAX_S = 900.0  # a --cpu-hog process ends by itself after this, should the harness die


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
    layout: Layout  # route filter, stream shards and worker group of the run's settings


def run_subject(subject: str, plan: Plan, env: Env, round_no: int) -> Result:
    prefix = f"bench-{env.run_id}-r{round_no + 1}-{subject}"
    # The baseline writes one stream, whatever the bridge's shard count.
    keys = Keys(prefix, 1 if subject == "baseline" else env.layout.stream_shards)
    procs = subject_procs(subject, env.mqtt_url, env.redis_url, prefix, env.workdir, env.code,
                          plan.bridge_env, env.layout.route_filter,
                          plan.drain_n[subject])  # fmt: skip
    result = Result(subject, len(procs), round_no, drain_n=plan.drain_n[subject])
    print(f"\n== round {round_no + 1}/{plan.rounds}, {subject}: {len(procs)} process(es), "
          f"drain N={result.drain_n:,}", flush=True)  # fmt: skip
    try:
        with cpu_hog(plan.cpu_hog, HOG_MAX_S):
            _measure(subject, plan, env, procs, keys, result)
    except (RuntimeError, TimeoutError, OSError, redis.RedisError, Stalled) as exc:
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
            if proc.client_id:
                clear_session("127.0.0.1", env.mqtt_port, proc.client_id)
        leftovers = list(env.r.scan_iter(match=f"{prefix}:*", count=1000))
        if leftovers:
            env.r.delete(*leftovers)
    return result


def _measure(
    subject: str, plan: Plan, env: Env, procs: list[Proc], keys: Keys, result: Result
) -> None:
    tag, streams = keys.prefix, keys.telemetry_streams(ROUTE)
    expected = _session_and_backlog(plan, env, procs, tag, result)
    if subject == "limit":
        _limit(plan, env, procs[0], result)
        return
    live_seq = max(seq for _, seq in expected) + 1  # above every backlog seq of every asset
    try:
        group = env.layout.worker_group if subject == "pipeline" else None
        _drain(plan, env, procs, streams, group, result)
        if subject != "pipeline":  # the live phase measures the bridge: the pipeline has none
            wait_ready(procs)
            pids = [p.pid for p in procs]
            cpu0 = [cpu_seconds(pid) for pid in [*pids, env.redis_pid, env.broker_pid]]
            expected |= _live(plan, env, procs, tag, live_seq, result)
            wait_for_length(env.r, streams, len(expected), "live")
            cpu = [cpu_seconds(pid) - c for pid, c in
                   zip([*pids, env.redis_pid, env.broker_pid], cpu0, strict=True)]  # fmt: skip
            result.live_cpu_us = sum(cpu[:-2]) / result.live_msgs * 1e6
            result.live_redis_cpu_us = cpu[-2] / result.live_msgs * 1e6
            result.live_broker_cpu_us = cpu[-1] / result.live_msgs * 1e6
    except Stalled as exc:
        result.error = str(exc)
        print(f"   FAILED: {exc}", flush=True)
    _check(env, procs, keys, expected, live_seq, result)


def _session_and_backlog(
    plan: Plan, env: Env, procs: list[Proc], tag: str, result: Result
) -> set[tuple[str, int]]:
    """Create the persistent session(s): subscribed once, then away while the backlog queues."""
    clients = [p for p in procs if p.holds_session]
    for proc in clients:
        if proc.session_argv is not None:
            run_to_exit(proc.session_argv, f"{proc.name} creating its session")
    started = [p for p in clients if p.session_argv is None]
    start_all(started)
    wait_ready(started)
    codes = stop_all(started)
    if any(code != 0 for code in codes):
        raise RuntimeError(f"subject exited with {codes} after creating its session")
    backlog = publish(env.mqtt_url, plan, f"{tag}-backlog", env.workdir,
                      start_seq=0, count=result.drain_n)  # fmt: skip
    if not all(rep["all_acked"] for rep in backlog):
        raise RuntimeError(f"backlog not fully acknowledged by the broker: {backlog}")
    return expected_pairs(plan, backlog, 0)


def _drain(
    plan: Plan, env: Env, procs: list[Proc], streams: list[str], group: str | None, result: Result
) -> None:
    servers = (env.redis_pid, env.broker_pid)
    drain = measure_drain(env.r, streams, procs, servers, result.drain_n, plan, group)
    _record_drain(drain, result)
    if "worker" in drain.cpu_s:
        result.worker_cpu_us = drain.cpu_s["worker"] / drain.msgs * 1e6
    print(f"   drain: {drain.msgs} msgs in {drain.secs:.2f} s = {result.rate:,.0f} msg/s"
          + (" (stored, read and acked by the worker group)" if group else "")
          + f", {result.cpu_us:.1f} CPU us/msg"
          + (f" (worker {result.worker_cpu_us:.0f})" if group else "")
          + f" (+ Redis {result.redis_cpu_us:.0f}, Mosquitto {result.broker_cpu_us:.0f})",
          flush=True)  # fmt: skip


def _record_drain(drain: Drain, result: Result) -> None:
    msgs = result.drain_msgs = drain.msgs
    result.drain_s, result.startup_cpu_s = drain.secs, drain.startup_cpu_s
    result.rate = msgs / drain.secs
    result.cpu_us = drain.subject_cpu_s / msgs * 1e6
    result.redis_cpu_us = drain.redis_cpu_s / msgs * 1e6
    result.broker_cpu_us = drain.broker_cpu_s / msgs * 1e6


def _limit(plan: Plan, env: Env, proc: Proc, result: Result) -> None:
    """The C subscriber drains its backlog and exits: 0 once it has counted N (`-C N`)."""
    drain = measure_limit(proc, env.broker_pid, result.drain_n, plan)
    result.exit_codes = stop_all([proc])
    result.published, result.stored = result.drain_n, drain.received
    result.lost = result.drain_n - drain.received
    if drain.received:
        _record_drain(drain, result)
        print(f"   drain: {drain.msgs} msgs in {drain.secs:.2f} s = {result.rate:,.0f} msg/s, "
              f"mosquitto_sub {result.cpu_us:.1f} CPU us/msg (+ Mosquitto "
              f"{result.broker_cpu_us:.1f})", flush=True)  # fmt: skip
    print(f"   check: queued {result.drain_n:,}, counted {drain.received:,} "
          f"(exit code {result.exit_codes})", flush=True)  # fmt: skip


def _live(
    plan: Plan, env: Env, procs: list[Proc], tag: str, live_seq: int, result: Result
) -> set[tuple[str, int]]:
    """Publish to the running subject at a fixed rate; what was published."""
    result.live_target_rate = result.rate * plan.live_fraction
    if plan.max_live_rate:
        result.live_target_rate = min(result.live_target_rate, plan.max_live_rate)
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
    result.counters = [counters(p) for p in procs if p.name.startswith("bridge") and p.alive()]
    result.exit_codes = stop_all(procs)
    pairs, latencies = read_streams(env.r, keys.telemetry_streams(ROUTE), live_seq)
    result.published = len(expected)
    result.stored = sum(pairs.values())
    result.lost = len(expected - pairs.keys())
    result.unexpected = len(pairs.keys() - expected)
    result.duplicated = sum(count - 1 for count in pairs.values() if count > 1)
    # A worker's dead letters too (the pipeline): valid telemetry must never end there.
    result.dead_letters = sum(
        int(env.r.xlen(key))
        for key in (*keys.dead_letter_streams(), *keys.worker_dead_letter_streams())
    )
    result.p50_ms = percentile(latencies, 0.50)
    result.p99_ms = percentile(latencies, 0.99)
    result.max_ms = latencies[-1] if latencies else math.nan
    if result.live_msgs:
        print(f"   live: {result.live_rate:,.0f} msg/s achieved (target "
              f"{result.live_target_rate:,.0f}), p50 {result.p50_ms:.1f} ms, p99 "
              f"{result.p99_ms:.1f} ms, max {result.max_ms:.1f} ms; subject "
              f"{result.live_cpu_us:.1f} CPU us/msg (+ Redis {result.live_redis_cpu_us:.0f}, "
              f"Mosquitto {result.live_broker_cpu_us:.0f}), publishers "
              f"{result.publisher_cpu_us:.0f}, publisher max lag "
              f"{result.publisher_max_lag_ms:.1f} ms", flush=True)  # fmt: skip
    print(f"   check: published {result.published}, stored {result.stored}, lost {result.lost}, "
          f"duplicated {result.duplicated}, unexpected {result.unexpected}, "
          f"dead letters {result.dead_letters}, exit codes {result.exit_codes}"
          + (f", bridge counters {result.counters}" if result.counters else ""),
          flush=True)  # fmt: skip


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, short live phase (smoke)")
    parser.add_argument("--subjects", default=",".join(SUBJECTS),
                        help=f"comma-separated, of: {', '.join(SUBJECTS)}")  # fmt: skip
    parser.add_argument("--n-baseline", type=int, help="backlog of the baseline")
    parser.add_argument("--n-bridge", type=int,
                        help="backlog of the other subjects")  # fmt: skip
    parser.add_argument("--live-s", type=float, help="seconds of the live phase")
    parser.add_argument("--rounds", type=int, help="rounds of all subjects (default 3; quick 1)")
    parser.add_argument("--assets", type=int, default=1000,
                        help="assets the messages go round (the limit is defined on 1,000)")  # fmt: skip
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--publisher", choices=["raw", "paho"], default="raw",
                        help="publisher client (bench/publisher.py)")  # fmt: skip
    parser.add_argument("--live-fraction", type=float, default=0.5,
                        help="live rate as a fraction of the subject's drain rate")  # fmt: skip
    parser.add_argument("--max-live-rate", type=float, default=0.0,
                        help="cap of the live rate in msg/s (default 0: none, the goal's half "
                             "of the drain rate)")  # fmt: skip
    parser.add_argument("--results", choices=["auto", "write", "skip"], default="auto",
                        help="update bench/RESULTS.md (auto: on full runs only)")  # fmt: skip
    parser.add_argument("--bridge-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra setting for the bridges and the worker, e.g. "
                             "IOTBRIDGE_BRIDGE__BATCH__MAX_SIZE=1000")  # fmt: skip
    parser.add_argument("--stagger-s", type=float, default=0.0,
                        help="bridge2: start the second bridge this much later (uneven drain)")  # fmt: skip
    parser.add_argument("--cpu-hog", type=float, default=0.0, metavar="FRACTION",
                        help="run a process busy this fraction of one core beside each subject "
                             "(a noisy neighbour), e.g. 0.5")  # fmt: skip
    parser.add_argument("--worker-entries", type=int,
                        help="entries of bench/worker_bench.py, run after the rounds "
                             "(default 600,000; quick and 0: not run)")  # fmt: skip
    parser.add_argument("--worker-base", default=WORKER_BASE, metavar="COMMIT",
                        help="the worker's entries/s are compared with this commit's, each run "
                             f"after one of it (default {WORKER_BASE}; '': not run)")  # fmt: skip
    parser.add_argument("--worker-runs", type=int, default=2,
                        help="runs of bench/worker_bench.py (and of the base's before each)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = set(subjects) - set(SUBJECTS)
    if unknown or not subjects:
        parser.error(f"unknown subjects: {sorted(unknown)}")
    args.subject_list = subjects
    if args.worker_entries is None:
        args.worker_entries = 0 if args.quick else 600_000
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
        worker_entries=args.worker_entries,
    )
    return args, plan


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    command = " ".join([".venv/bin/python bench/run.py", *(argv or sys.argv[1:])])
    workdir = Path(tempfile.mkdtemp(prefix="iotbridge-bench-"))
    code, code_hash = snapshot_code(workdir / "code")
    servers: list[Any] = []
    results: list[Result] = []
    worker: WorkerBench | None = None
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
                  red.pid, mosq.pid, r, workdir, uuid.uuid4().hex[:6], code,
                  layout(ROUTE, plan.bridge_env))  # fmt: skip
        print(f"mosquitto {env.mqtt_url}, redis {env.redis_url}, work dir {workdir}")
        print(f"machine: {about.machine}\ncode: {about.code}\nservers: {about.servers}")
        results = [
            run_subject(subject, plan, env, round_no)
            for round_no in range(plan.rounds)
            for subject in args.subject_list
        ]
        if plan.worker_entries:
            print(f"\n== bench/worker_bench.py --entries {plan.worker_entries:,}", flush=True)
            worker = worker_bench(env.redis_url, plan.worker_entries, plan.assets, workdir,
                                  args.worker_base, args.worker_runs)  # fmt: skip
            print(f"   {worker.note()}", flush=True)
        r.close()
    finally:
        for server in reversed(servers):
            server.stop()
    if plan.rounds > 1:
        print("\n" + table(per_round(results)))
    print("\n" + table(summarize(results)) + "\n")
    for note in targets(results):
        print(f"- {note}")
    if worker is not None:
        print(f"- {worker.note()}")
    print("\n" + goals_table(results))
    (workdir / "results.json").write_text(json.dumps([asdict(x) for x in results], indent=2))
    if args.results == "write" or (args.results == "auto" and not args.quick):
        write_results(markdown(results, plan, about, worker))
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    ok = all(x.ok for x in results)
    if ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"logs kept in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
