"""Redis Cluster against one Redis: the bridge's drain (and the pipeline's) on one Redis and on a
3-master cluster, and what `redis.durability.replicas: 1` costs on each, in one run.

    flock -x /tmp/iotbridge-bench.lock .venv/bin/python bench/cluster_bench.py
    flock -x /tmp/iotbridge-bench.lock .venv/bin/python bench/cluster_bench.py --quick   # smoke
    .venv/bin/python bench/cluster_bench.py --subjects one,cluster --rounds 1 --results skip

Two Redis set-ups run side by side for the whole run, every node with an append-only file
(everysec): `one`, a redis-server and a replica of it (`--replicaof`); `cluster`, 3 masters with a
replica each (`redis-cli --cluster create`). The bridges and workers run with
`redis.stream_shards: 12` on both (4 shards per master on the cluster). The subjects, each round in
this order:

- `one`, `cluster`: one `iotbridge bridge`, `redis.durability.replicas: 0`;
- `one-wait1`, `cluster-wait1`: the same with `redis.durability.replicas: 1` (WAIT 1 after each
  write, on the connection that wrote it);
- `pipeline-one`, `pipeline-cluster`: one bridge and 2 `iotbridge worker`s (every default
  detector), the workers started, ready and holding 6 shards each before the bridge starts.

Per subject: the bridge's persistent session is created, N QoS 1 messages over 1,000 assets are
queued for it at Mosquitto (bench/publisher.py, raw client) and the subject is started on them.
The window runs from the first entry stored to the N-th (the pipeline: until the worker group has
read and acked all N): msg/s, CPU µs per message of the bridge, the workers, Redis (every node of
the set-up; the masters' and the replicas' parts) and Mosquitto, from /proc; and the busiest
master's share of one core over the window. Then, for a bridge, a live phase at a fixed rate, the
same for every subject: publish-to-XADD p50/p99 (the entry id's ms minus the payload's `ts`) and
the bridge's own mean write and receive-to-ack times (its /metrics; with WAIT a batch is acked only
once the replica has confirmed it). Last the streams are read back: every (asset, seq) once. Between
subjects every master is emptied and every append-only file rewritten. A ratio compares a subject
with its reference in the same round; the summary shows medians over the rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from redis.cluster import RedisCluster

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ import as packages

from bench.cluster_results import (  # noqa: E402
    SUBJECTS,
    Run,
    Subject,
    as_json,
    markdown,
    report,
    setup_notes,
    write_results,
)
from bench.drain import (  # noqa: E402
    STALL_S,
    Stalled,
    consumed,
    percentile,
    read_streams,
    stored,
    wait_for_length,
)
from bench.procs import (  # noqa: E402
    Proc,
    RedisNodes,
    clear_session,
    cpu_seconds,
    free_port,
    layout,
    redis_cluster,
    redis_pair,
    services,
    snapshot_code,
    start_all,
    stop_all,
    subject_procs,
    wait_ready,
    wait_until,
)
from bench.publisher import expected_pairs, publish  # noqa: E402
from bench.results import (  # noqa: E402
    MOSQUITTO_CONF,
    RESULTS,
    About,
    Plan,
    code_version,
    machine_note,
    versions,
)
from config.keys import Keys  # noqa: E402

ROUTE = "telemetry"
SHARDS = 12  # 4 per master of the 3-master cluster
POLL_S = 0.01  # XLEN (or XINFO GROUPS) of 12 streams per poll: a cluster's take 3 round trips


@dataclass
class Env:
    mqtt_url: str
    mqtt_port: int
    broker_pid: int
    nodes: dict[str, RedisNodes]  # by topology
    clients: dict[str, redis.Redis]  # the harness's, by topology (a cluster's: RedisCluster)
    workdir: Path
    code: Path
    route_filter: str
    run_id: str


# --- one subject ----------------------------------------------------------------------------------


def run_subject(subject: Subject, plan: Plan, args: argparse.Namespace, env: Env,
                round_no: int) -> Run:  # fmt: skip
    prefix = f"cb-{env.run_id}-r{round_no + 1}-{subject.name}"
    nodes = env.nodes[subject.topology]
    keys = Keys(prefix, SHARDS, nodes.cluster)
    procs = processes(subject, env, nodes, prefix)
    run = Run(subject.name, round_no, n=args.messages)
    print(f"\n== round {round_no + 1}/{plan.rounds}, {subject.name}: "
          f"{', '.join(p.name for p in procs)} on {subject.topology} ({nodes.url}), "
          f"durability replicas {subject.replicas}", flush=True)  # fmt: skip
    r = env.clients[subject.topology]
    try:
        expected = session_and_backlog(plan, env, procs, prefix, args.messages)
        live_seq = max(seq for _, seq in expected) + 1
        servers = {f"master-{i}": s.pid for i, s in enumerate(nodes.masters)}
        servers |= {f"replica-{i}": s.pid for i, s in enumerate(nodes.replicas)}
        servers["mosquitto"] = env.broker_pid
        group = (
            layout(ROUTE, settings_env(subject, nodes)).worker_group if subject.workers else None
        )
        streams = keys.telemetry_streams(ROUTE)
        drain(r, streams, procs, servers, group, run)
        if not subject.workers:
            expected |= live(plan, args, env, r, streams, procs, prefix, live_seq, run)
        check(r, keys, procs, expected, live_seq, run)
    except (RuntimeError, TimeoutError, OSError, redis.RedisError, Stalled) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        print(f"   FAILED: {run.error}", flush=True)
        for proc in procs:
            print(f"   --- {proc.name} log tail ---\n{proc.tail()}", flush=True)
    finally:
        run.exit_codes = run.exit_codes or stop_all(procs)
        run.log_lines = logged(procs)
        for proc in procs:
            if proc.client_id:
                clear_session("127.0.0.1", env.mqtt_port, proc.client_id)
        nodes.reset()
    return run


def settings_env(subject: Subject, nodes: RedisNodes) -> dict[str, str]:
    return {"IOTBRIDGE_REDIS__CLUSTER": "true" if nodes.cluster else "false",
            "IOTBRIDGE_REDIS__STREAM_SHARDS": str(SHARDS),
            "IOTBRIDGE_REDIS__DURABILITY__REPLICAS": str(subject.replicas)}  # fmt: skip


def processes(subject: Subject, env: Env, nodes: RedisNodes, prefix: str) -> list[Proc]:
    """bench/procs.py's `bridge` or `pipeline`, with as many workers as the subject has."""
    kind = "pipeline" if subject.workers else "bridge"
    procs = subject_procs(kind, env.mqtt_url, nodes.url, prefix, env.workdir, env.code,
                          settings_env(subject, nodes), env.route_filter)  # fmt: skip
    first = next((p for p in procs if p.name == "worker"), None)
    for index in range(1, subject.workers):
        assert first is not None
        port = free_port()
        procs.append(dataclasses.replace(
            first, name=f"worker-{index}", metrics_port=port,
            env=first.env | {"IOTBRIDGE_WORKER__METRICS_PORT": str(port)},
            log=env.workdir / f"{prefix}-worker-{index}.log",
        ))  # fmt: skip
    return procs


def session_and_backlog(
    plan: Plan, env: Env, procs: list[Proc], tag: str, n: int
) -> set[tuple[str, int]]:
    """The bridge's persistent session, subscribed once, then away while N messages queue."""
    bridges = [p for p in procs if p.holds_session]
    start_all(bridges)
    wait_ready(bridges)
    codes = stop_all(bridges)
    if any(code != 0 for code in codes):
        raise RuntimeError(f"the bridge exited with {codes} after creating its session")
    backlog = publish(env.mqtt_url, plan, f"{tag}-backlog", env.workdir, start_seq=0, count=n)
    if not all(report["all_acked"] for report in backlog):
        raise RuntimeError(f"backlog not fully acknowledged by the broker: {backlog}")
    return expected_pairs(plan, backlog, 0)


def drain(r: redis.Redis, streams: list[str], procs: list[Proc], servers: dict[str, int],
          group: str | None, run: Run) -> None:  # fmt: skip
    """The workers first (ready, their shards shared out), then the bridge on its backlog: from
    the first entry stored to the N-th, or to the group having read and acked all N."""
    workers = [p for p in procs if p.early]
    start_all(workers)
    wait_ready(workers)
    if workers:
        wait_until(lambda: shards_owned(workers) == [SHARDS // len(workers)] * len(workers), 60,
                   "the workers' shards shared out", poll_s=0.1)  # fmt: skip
    begin = time.monotonic()
    start_all([p for p in procs if not p.early])
    first: tuple[int, float, dict[str, float]] | None = None
    last_progress, last_change = -1, begin
    while True:
        if group is None:
            length = read = stored(r, streams)
            pending = 0
        else:
            length, read, pending = consumed(r, streams, group)
        now = time.monotonic()
        if first is None and length > 0:
            first = (length, now, cpu(procs, servers))
        if length >= run.n and read >= run.n and pending == 0:
            break
        if length + read != last_progress:
            last_progress, last_change = length + read, now
        if now - begin > 300 or now - last_change > STALL_S:
            raise Stalled(f"drain stopped at {length:,} stored, {read:,} read, {pending:,} "
                          f"pending of {run.n:,}")  # fmt: skip
        if not all(p.alive() for p in procs):
            dead = next(p for p in procs if not p.alive())
            raise RuntimeError(f"{dead.name} exited while draining: {dead.tail()}")
        time.sleep(POLL_S)
    assert first is not None
    end = cpu(procs, servers)
    record_drain(run, run.n - first[0], now - first[1],
                 {k: v - first[2].get(k, 0.0) for k, v in end.items()})  # fmt: skip


def shards_owned(workers: list[Proc]) -> list[int]:
    owned = []
    for proc in workers:
        assert proc.metrics_port is not None
        found = services.scrape(proc.metrics_port)
        owned.append(int(services.metric_total(found, "iotbridge_worker_shards_owned")))
    return sorted(owned)


def cpu(procs: list[Proc], servers: dict[str, int]) -> dict[str, float]:
    found = {p.name: cpu_seconds(p.pid) for p in procs}
    return found | {name: cpu_seconds(pid) for name, pid in servers.items()}


def record_drain(run: Run, msgs: int, secs: float, spent: dict[str, float]) -> None:
    def per_msg(prefix: str) -> float:
        return sum(v for k, v in spent.items() if k.startswith(prefix)) / msgs * 1e6

    run.secs, run.rate = secs, msgs / secs
    run.bridge_cpu_us, run.broker_cpu_us = per_msg("bridge"), per_msg("mosquitto")
    run.worker_cpu_us = (
        per_msg("worker") if any(k.startswith("worker") for k in spent) else math.nan
    )
    run.master_cpu_us, run.replica_cpu_us = per_msg("master"), per_msg("replica")
    run.busiest_master = max(v for k, v in spent.items() if k.startswith("master")) / secs
    print(f"   drain: {msgs:,} msgs in {secs:.2f} s: {run.drain_note()}", flush=True)


def live(plan: Plan, args: argparse.Namespace, env: Env, r: redis.Redis, streams: list[str],
         procs: list[Proc], tag: str, live_seq: int, run: Run) -> set[tuple[str, int]]:  # fmt: skip
    """The running bridge at a fixed rate: its CPU and mean write and receive-to-ack times."""
    bridge = procs[0]
    assert bridge.metrics_port is not None
    wait_ready(procs)
    before, cpu0 = services.scrape(bridge.metrics_port), cpu_seconds(bridge.pid)
    reports = publish(env.mqtt_url, plan, f"{tag}-live", env.workdir, start_seq=live_seq,
                      rate=args.live_rate, duration_s=plan.live_s)  # fmt: skip
    if not all(report["all_acked"] for report in reports):
        raise RuntimeError(f"live messages not fully acknowledged by the broker: {reports}")
    published = sum(report["published"] for report in reports)
    wait_for_length(r, streams, run.n + published, "live")
    wait_until(lambda: in_flight(bridge) == 0, 30, "the bridge's last acks", poll_s=0.05)
    after, spent = services.scrape(bridge.metrics_port), cpu_seconds(bridge.pid) - cpu0
    run.live_target, run.live_rate = args.live_rate, sum(report["rate"] for report in reports)
    run.live_bridge_cpu_us = spent / published * 1e6
    run.write_ms = mean_ms(before, after, "iotbridge_bridge_xadd_duration_seconds")
    run.ack_ms = mean_ms(before, after, "iotbridge_bridge_receive_to_ack_seconds")
    return expected_pairs(plan, reports, live_seq)


def in_flight(bridge: Proc) -> float:
    assert bridge.metrics_port is not None
    found = services.scrape(bridge.metrics_port)
    return float(services.metric_total(found, "iotbridge_bridge_in_flight_messages"))


def mean_ms(before: dict[str, float], after: dict[str, float], histogram: str) -> float:
    def delta(suffix: str) -> float:
        total = services.metric_total
        return float(total(after, histogram + suffix) - total(before, histogram + suffix))

    count = delta("_count")
    return delta("_sum") / count * 1000 if count else math.nan


def check(r: redis.Redis, keys: Keys, procs: list[Proc], expected: set[tuple[str, int]],
          live_seq: int, run: Run) -> None:  # fmt: skip
    """Stop the subject, then: exactly what was published is in the streams, once each."""
    run.exit_codes = stop_all(procs)
    pairs, latencies = read_streams(r, keys.telemetry_streams(ROUTE), live_seq)
    run.published, run.stored = len(expected), sum(pairs.values())
    run.lost = len(expected - pairs.keys())
    run.unexpected = len(pairs.keys() - expected)
    run.duplicated = sum(count - 1 for count in pairs.values() if count > 1)
    letters = [*keys.dead_letter_streams(), *keys.worker_dead_letter_streams()]
    run.dead_letters = sum(int(r.xlen(stream)) for stream in letters)
    run.p50_ms, run.p99_ms = percentile(latencies, 0.5), percentile(latencies, 0.99)
    run.max_ms = latencies[-1] if latencies else math.nan
    if run.live_rate:
        print(f"   live: {run.live_note()}", flush=True)
    print(f"   check: {run.check_note()}", flush=True)


def logged(procs: list[Proc]) -> list[str]:
    """The processes log at WARNING: whatever they wrote is worth a look, a few lines of it."""
    lines = []
    for proc in procs:
        text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
        lines += [f"{proc.name}: {line[:300]}" for line in text.splitlines() if line.strip()]
    if lines:
        print(f"   {len(lines)} log line(s), first: {lines[0]}", flush=True)
    return lines[:20]


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Plan]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, one round (smoke)")
    parser.add_argument("--subjects", default=",".join(SUBJECTS),
                        help=f"comma-separated, of: {', '.join(SUBJECTS)}")  # fmt: skip
    parser.add_argument("--messages", type=int, help="drain N (default 100,000; quick 10,000)")
    parser.add_argument("--rounds", type=int, help="rounds of every subject (default 3; quick 1)")
    parser.add_argument("--live-rate", type=float, default=20_000,
                        help="msg/s of the live phase, the same for every subject")  # fmt: skip
    parser.add_argument("--live-s", type=float, help="seconds of the live phase (default 8)")
    parser.add_argument("--results", choices=["auto", "write", "skip"], default="auto",
                        help="update bench/RESULTS.md (auto: on full runs only)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="where the results go (default: work dir)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' files too")
    args = parser.parse_args(argv)
    args.subject_list = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = set(args.subject_list) - set(SUBJECTS)
    if unknown or not args.subject_list:
        parser.error(f"unknown subjects: {sorted(unknown)}")
    args.messages = args.messages or (10_000 if args.quick else 100_000)
    plan = Plan(
        assets=1000,
        drain_n=dict.fromkeys(args.subject_list, args.messages),
        live_s=args.live_s or (3.0 if args.quick else 8.0),
        live_fraction=0.0,
        max_live_rate=args.live_rate,
        publishers=2,
        publisher="raw",
        rounds=args.rounds or (1 if args.quick else 3),
        drain_timeout_s=300.0,
    )
    return args, plan


def start_servers(workdir: Path, topologies: set[str]) -> tuple[Any, dict[str, RedisNodes]]:
    mosq = services.mosquitto_service(workdir / "mosquitto", extra_conf=MOSQUITTO_CONF)
    if mosq is None:
        raise RuntimeError("the bench needs mosquitto")
    mosq.start()
    nodes: dict[str, RedisNodes] = {}
    try:
        if "one" in topologies:
            nodes["one"] = redis_pair(workdir / "one")
        if "cluster" in topologies:
            nodes["cluster"] = redis_cluster(workdir / "cluster")
    except BaseException:
        for found in nodes.values():
            found.stop()
        mosq.stop()
        raise
    return mosq, nodes


def harness_client(nodes: RedisNodes) -> redis.Redis:
    port = nodes.masters[0].port
    if nodes.cluster:
        # Typed as a plain client: the harness's reads (XLEN, XINFO GROUPS, XRANGE) are single-key.
        return cast(redis.Redis, RedisCluster(host="127.0.0.1", port=port))
    return redis.Redis(port=port)


def main(argv: list[str] | None = None) -> int:
    args, plan = parse_args(argv)
    command = " ".join([".venv/bin/python bench/cluster_bench.py", *(argv or sys.argv[1:])])
    workdir = Path(tempfile.mkdtemp(prefix="iotbridge-cluster-bench-"))
    code, code_hash = snapshot_code(workdir / "code")
    subjects = [SUBJECTS[name] for name in args.subject_list]
    mosq, nodes = start_servers(workdir / "servers", {s.topology for s in subjects})
    runs: list[Run] = []
    clients = {name: harness_client(found) for name, found in nodes.items()}
    try:
        some = next(iter(nodes.values()))
        about = About(dt.datetime.now(dt.UTC), command, machine_note(), code_version(code_hash),
                      versions(mosq.argv[0], some.masters[0].argv[0]))  # fmt: skip
        env = Env(f"mqtt://127.0.0.1:{mosq.port}", mosq.port, mosq.pid, nodes, clients, workdir,
                  code, layout(ROUTE, {}).route_filter, uuid.uuid4().hex[:6])  # fmt: skip
        for name, found in nodes.items():
            print(f"{name}: {found.url} (masters {[s.port for s in found.masters]}, replicas "
                  f"{[s.port for s in found.replicas]})")  # fmt: skip
        print(f"mosquitto {env.mqtt_url}, work dir {workdir}\nmachine: {about.machine}\n"
              f"code: {about.code}\nservers: {about.servers}", flush=True)  # fmt: skip
        runs = [run_subject(subject, plan, args, env, round_no)
                for round_no in range(plan.rounds) for subject in subjects]  # fmt: skip
    finally:
        for client in clients.values():
            client.close()
        for found in nodes.values():
            found.stop()
        mosq.stop()
    print(report(runs))
    out = args.json or workdir / "results.json"
    out.write_text(json.dumps(as_json(runs, about), indent=1))
    print(f"\nwrote {out}")
    if args.results == "write" or (args.results == "auto" and not args.quick):
        setup = setup_notes(plan.rounds, args.subject_list, args.messages, SHARDS, args.live_rate,
                            plan.live_s)  # fmt: skip
        write_results(markdown(runs, about, setup))
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    shutil.rmtree(code, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(workdir / "servers", ignore_errors=True)
    ok = all(r.ok for r in runs)
    print(f"logs in {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
