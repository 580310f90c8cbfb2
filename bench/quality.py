"""Anomaly quality on a scenario: precision, recall and flag latency per anomaly kind.

Runs mosquitto and redis-server on free loopback ports, `iotbridge bridge`, `iotbridge worker` and
`iotbridge simulate --scenario ... --ground-truth ... --acked ...`, waits until the worker has read
everything (and the staleness timers had their time), then scores the anomaly stream against the
ground truth (workers/score.py) and audits delivery (`iotbridge audit`).

    .venv/bin/python bench/quality.py [--scenario simulators/scenarios/standard.yaml]

A Sparkplug scenario (`fleet.protocol: sparkplug`, e.g. simulators/scenarios/sparkplug.yaml) runs
the bridge with its Sparkplug host on and scores the `sparkplug` stream; its DATA is QoS 0, so
there is no acknowledged set to audit.

The standard scenario takes about 11 minutes. Targets: precision >= 0.95 and recall >= 0.90 per
kind, publish-to-flag p99 <= 250 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
import yaml

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run as a script: bench/ imports as a package
from bench.procs import ROOT, Proc, free_port, services, wait_until
from bridge.shard_reads import merge
from config.keys import Keys
from simulators.audit import read_stream
from workers.score import flags_from, read_truth, score

TARGETS = {"precision": 0.95, "recall": 0.90, "publish_to_flag_p99_s": 0.25}


def _env(mqtt_port: int, redis_port: int, prefix: str, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "IOTBRIDGE_MQTT__URL": f"mqtt://127.0.0.1:{mqtt_port}",
        "IOTBRIDGE_REDIS__URL": f"redis://127.0.0.1:{redis_port}/0",
        "IOTBRIDGE_REDIS__KEY_PREFIX": prefix,
        "IOTBRIDGE_LOGGING__LEVEL": "WARNING",
        **extra,
    }


def _lag(db: redis.Redis, streams: list[str]) -> int:
    total = 0
    for stream in streams:
        if db.exists(stream):
            for group in db.xinfo_groups(stream):
                total += int(group.get("lag") or 0) + int(group.get("pending") or 0)
    return total


# Sparkplug DATA is QoS 0: nothing is acknowledged, so there is no set to audit.
_not_audited = subprocess.CompletedProcess[str]([], 0, "not audited: Sparkplug DATA is QoS 0", "")


def run(scenario: Path, work: Path) -> dict[str, object]:
    cli = [sys.executable, "-m", "bridge.cli"]
    broker = services.mosquitto_service(
        work / "mosquitto", extra_conf="max_inflight_messages 1000\n"
    )
    store = services.redis_service(work / "redis")
    broker.start()
    store.start()
    prefix = "quality"
    ports = {name: free_port() for name in ("bridge", "worker", "simulator")}
    sparkplug = (yaml.safe_load(scenario.read_text()).get("fleet") or {}).get(
        "protocol"
    ) == "sparkplug"
    env = _env(broker.port, store.port, prefix,
               **{f"IOTBRIDGE_{n.upper()}__METRICS_PORT": str(p) for n, p in ports.items()},
               **({"IOTBRIDGE_SPARKPLUG__ENABLED": "true"} if sparkplug else {}))  # fmt: skip
    truth, acked = work / "ground-truth.jsonl", work / "acked.jsonl"
    bridge = Proc(
        "bridge", [*cli, "bridge"], env, work / "bridge.log", metrics_port=ports["bridge"]
    )
    worker = Proc(
        "worker", [*cli, "worker"], env, work / "worker.log", metrics_port=ports["worker"]
    )
    simulator = Proc("simulator", [*cli, "simulate", "--scenario", str(scenario), "--ground-truth",
                                   str(truth), "--acked", str(acked), "--no-progress"],
                     env, work / "simulator.log")  # fmt: skip
    db = redis.Redis(port=store.port, decode_responses=True)
    keys = Keys(prefix)
    streams = keys.telemetry_streams("telemetry")
    if sparkplug:
        streams += keys.telemetry_streams("sparkplug")
    try:
        for proc in (bridge, worker):
            proc.start()
            wait_until(proc.ready, 30, f"{proc.name} ready")
        started = time.time()
        simulator.start()
        assert simulator.popen is not None
        simulator.popen.wait(timeout=3600)
        sim_report = json.loads(simulator.log.read_text().strip().splitlines()[-1])
        wait_until(lambda: _lag(db, streams) == 0, 300, "the worker to read everything", poll_s=0.5)
        time.sleep(5)  # the staleness timer's last tick over the tail of the run
        # Every anomaly stream (one per shard with redis.cluster), merged in id order;
        # decode_responses=True: ids and fields are str, which redis-py's stubs cannot say.
        streams_read = [read_stream(db, key) for key in keys.anomaly_streams()]
        entries: list[tuple[str, dict[str, str]]] = [
            entry  # type: ignore[misc]
            for _, entry in merge(streams_read)
        ]
        (work / "anomalies.jsonl").write_text(
            "".join(json.dumps([i, f]) + "\n" for i, f in entries)
        )
        flags = list(flags_from(entries))
        audit = _not_audited if sparkplug else subprocess.run([*cli, "audit", "--acked", str(acked), "--accept-reason", "json",
                                "--accept-reason", "schema", "--accept-reason", "size",
                                "--accept-reason", "clock"],
                               env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    finally:
        for proc in (simulator, worker, bridge):
            proc.terminate()
            proc.wait()
        broker.stop()
        store.stop()
    report = score(read_truth(truth), flags)
    return {"scenario": str(scenario.relative_to(ROOT)), "run_s": round(time.time() - started),
            "simulator": {k: sim_report.get(k) for k in ("sent", "acked", "failed", "achieved_rate_msgs_per_s")},
            "audit": audit.stdout.strip(), "score": report}  # fmt: skip


def _verdict(report: dict[str, object]) -> list[str]:
    score_ = report["score"]
    assert isinstance(score_, dict)
    lines = []
    for kind, row in score_.items():
        if isinstance(row, dict) and "recall" in row:
            ok = (row["precision"] or 0) >= TARGETS["precision"] and row["recall"] >= TARGETS[
                "recall"
            ]
            lines.append(f"| {kind} | {row['events']} | {row['detected']} | {row['recall']} | {row['flags']} | "
                         f"{row['false_flags']} | {row['precision']} | {row['detection_latency_s']['p50']} | "
                         f"{row['detection_latency_s']['p99']} | {'yes' if ok else 'NO'} |")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenario", type=Path, default=ROOT / "simulators/scenarios/standard.yaml"
    )
    parser.add_argument("--keep", action="store_true", help="Keep logs, ground truth and flags.")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="iotbridge-quality-"))
    try:
        report = run(args.scenario.resolve(), work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"files: {work}" if args.keep else "")
    print(json.dumps(report, indent=2))
    rows = _verdict(report)
    score_ = report["score"]
    assert isinstance(score_, dict)
    lines = [
        f"### Anomaly quality ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC, `bench/quality.py`, {report['scenario']})",
        "",
        "| kind | events | detected | recall | flags | false flags | precision | detect p50 s | detect p99 s | target met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"publish-to-flag: p50 {score_['publish_to_flag_s']['p50']} s, p99 {score_['publish_to_flag_s']['p99']} s "
        f"(target p99 <= {TARGETS['publish_to_flag_p99_s']} s); flags {score_['flags_total']}, "
        f"false flags {score_['false_flags_total']}; simulator {report['simulator']}; audit {report['audit']}",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
