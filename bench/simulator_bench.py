"""Simulator benchmark: memory per asset, schedule accuracy at the broker, throughput, CPU.

Runs `iotbridge simulate` against a Mosquitto of its own (with `sys_interval 1`), and measures
at the broker: `$SYS/broker/publish/messages/received` once a second, over the middle of the run
(the ramp and the drain left out). Memory is the sum over the simulator's processes (parent and
children) of RSS and PSS from /proc, sampled through the run; the bytes per asset are the
difference between a 100,000-asset run and a 100-asset run, divided by the difference in assets.
CPU is the simulator's processes' user + system time: over the whole run per message sent
(`cpu_us_per_msg`, start-up included), and over the middle of the run per message the broker
counted (`steady_cpu_us_per_msg`). `stall` stops the broker (SIGSTOP) for half of the run
(from 30% of it): memory must stay flat, and what could not be sent is counted as skipped.

    .venv/bin/python -m bench.simulator_bench                 # everything (about 4 minutes)
    .venv/bin/python -m bench.simulator_bench --only memory   # memory, schedule, qos0, qos1
    .venv/bin/python -m bench.simulator_bench --only target   # 100K assets, 10,000 msg/s QoS 1
    .venv/bin/python -m bench.simulator_bench --only stall    # the same, the broker stopped 50%

Prints one JSON object. Not a test: the numbers depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.procs import ROOT, cpu_seconds, services


class BrokerCounter:
    """`$SYS/broker/publish/messages/received` as (time, count) samples."""

    def __init__(self, port: int) -> None:
        self.samples: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, f"bench-sys-{port}")
        self.client.on_connect = lambda c, *_: c.subscribe("$SYS/broker/publish/messages/received")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.samples.append((time.monotonic(), int(message.payload)))

    def rate(self, start: float, end: float) -> float:
        with self._lock:
            inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return 0.0
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(p)
    return total


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes of a process and its children."""
    rss = pss = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                name, _, value = line.partition(":")
                if name == "Rss":
                    rss += int(value.split()[0]) * 1024
                elif name == "Pss":
                    pss += int(value.split()[0]) * 1024
        except OSError:
            continue
    return rss, pss


def simulate(
    port: int,
    counter: BrokerCounter,
    stall: tuple[float, float, int] | None = None,
    env_extra: dict[str, str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """One run; the broker-side rate over its middle, peak memory, CPU, and the simulator's
    report. `stall`: (after s, for s, broker pid): the broker is stopped (SIGSTOP) that long."""
    args = [sys.executable, "-m", "bridge.cli", "simulate", "--no-progress", "--log-level",
            "WARNING"]  # fmt: skip
    for name, value in options.items():
        if name not in ("assets_per_connection", "connect_rate_per_s"):
            args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "IOTBRIDGE_MQTT__URL": f"mqtt://127.0.0.1:{port}",
           "IOTBRIDGE_SIMULATOR__METRICS_PORT": "0",
           "IOTBRIDGE_SIMULATOR__ASSETS_PER_CONNECTION": str(options.get("assets_per_connection", 250)),
           "IOTBRIDGE_SIMULATOR__CONNECT_RATE_PER_S": str(options.get("connect_rate_per_s", 1000)),
           "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": f"bench{time.monotonic_ns()}",
           **(env_extra or {})}  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    cpu_samples: list[tuple[float, float]] = []  # (time, CPU seconds of the simulator's processes)
    stopped_at: float | None = None
    try:
        while proc.poll() is None:
            rss, pss = _memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            cpu_samples.append((time.monotonic(), _cpu(proc.pid)))
            if stall is not None:
                after_s, for_s, broker_pid = stall
                now = time.monotonic()
                if stopped_at is None and now - started >= after_s:
                    os.kill(broker_pid, signal.SIGSTOP)
                    stopped_at = now
                elif stopped_at is not None and now - stopped_at >= for_s:
                    os.kill(broker_pid, signal.SIGCONT)
                    stall = None
            time.sleep(0.5)
    finally:
        if stall is not None and stopped_at is not None:
            os.kill(stall[2], signal.SIGCONT)
    output = proc.stdout.read() if proc.stdout else ""
    ended = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    report = json.loads(output.splitlines()[-1]) if output.strip() else {}
    # The publishing window is the last `duration` seconds before the drain; keep its middle.
    duration = float(options["duration"])
    publish_end = ended - 1.5
    window = (publish_end - duration * 0.8, publish_end - duration * 0.1)
    broker_rate = counter.rate(*window)
    inside = [c for c in cpu_samples if window[0] <= c[0] <= window[1]]
    steady_cpu = (
        (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) if len(inside) > 1 else 0.0
    )
    target = report.get("target_rate", 0.0)
    return {
        "options": options,
        "wall_s": round(ended - started, 1),
        "target_rate": target,
        "broker_rate": round(broker_rate, 1),
        "broker_vs_target_pct": round(100 * (broker_rate / target - 1), 2) if target else None,
        "achieved_rate": report.get("achieved_rate_msgs_per_s"),
        "processes": report.get("processes"),
        "scheduled": report.get("scheduled"),
        "sent": report.get("sent"),
        "acked": report.get("acked"),
        "unsent": report.get("unsent"),
        "skipped": report.get("skipped"),
        "skipped_by_reason": report.get("skipped_by_reason"),
        "failed": report.get("failed_by_kind"),
        "publish_ack_latency_s": report.get("publish_ack_latency_s"),
        "peak_rss_mb": round(peak_rss / 1e6, 1),
        "peak_pss_mb": round(peak_pss / 1e6, 1),
        "cpu_s": round(cpu_s, 2),
        "cpu_us_per_msg": round(cpu_s * 1e6 / report["sent"], 1) if report.get("sent") else None,
        # Over the middle of the run, against the broker's count: without start-up and drain.
        "steady_cores": round(steady_cpu, 3),
        "steady_cpu_us_per_msg": round(steady_cpu * 1e6 / broker_rate, 1) if broker_rate else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only", choices=["memory", "schedule", "qos0", "qos1", "target", "stall"], action="append"
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--duration", type=float, default=40.0, help="target and stall runs")
    parser.add_argument(
        "--target-processes",
        default="1",
        help="target run: a process count, or 0 for the simulator's own choice (auto)",
    )
    parser.add_argument("--protocol", choices=["5", "3.1.1"], default="5",
                        help="target and stall runs: MQTT 3.1.1 has no Receive Maximum")  # fmt: skip
    args = parser.parse_args()
    protocol = {"IOTBRIDGE_MQTT__PROTOCOL": args.protocol}
    todo = set(args.only or ["memory", "schedule", "qos0", "qos1"])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir:
        broker = services.mosquitto_service(
            Path(workdir), extra_conf="sys_interval 1\nmax_connections -1\n"
        )
        if broker is None:
            sys.exit("simulator_bench needs mosquitto (make services)")
        broker.start()
        counter = BrokerCounter(broker.port)
        try:
            if "target" in todo:
                # The goal: 100,000 assets every 10 s, 10,000 msg/s at QoS 1.
                chosen = (
                    {} if args.target_processes == "0" else {"processes": args.target_processes}
                )
                results["target"] = simulate(broker.port, counter, env_extra=protocol,
                                             assets=100_000, rate=0.1, duration=args.duration,
                                             qos=1, **chosen)  # fmt: skip
            if "stall" in todo:
                # The broker stopped (SIGSTOP) for half the run: memory must stay bounded and
                # what was not sent is counted.
                stall = (args.duration * 0.3, args.duration * 0.5, broker.pid)
                results["stall"] = simulate(broker.port, counter, stall=stall, env_extra=protocol,
                                            assets=100_000, rate=0.1, duration=args.duration,
                                            qos=1, processes=1)  # fmt: skip
            if todo & {"memory", "schedule"}:
                # 100,000 assets every 10 s: 10,000 msg/s, QoS 1, over 400 connections; the
                # bytes per asset from one process against a 100-asset run of one process.
                small = simulate(broker.port, counter, assets=100, rate=0.1, duration=10, qos=1,
                                 processes=1)  # fmt: skip
                runs = [simulate(broker.port, counter, assets=100_000, rate=0.1, duration=40,
                                 qos=1, processes=p) for p in sorted({1, args.processes})]  # fmt: skip
                per_asset = (runs[0]["peak_rss_mb"] - small["peak_rss_mb"]) * 1e6 / (100_000 - 100)
                results["memory_and_schedule"] = {
                    "runs_100k": runs,
                    "run_100": small,
                    "bytes_per_asset_rss": round(per_asset),
                }
            for key, assets, qos in (("qos0", 60_000, 0), ("qos1", 40_000, 1)):
                if key in todo:
                    results[key] = [
                        simulate(broker.port, counter, assets=assets, rate=1.0, duration=20,
                                 qos=qos, processes=p) for p in sorted({1, args.processes})
                    ]  # fmt: skip
        finally:
            counter.close()
            broker.stop()
    results["load_average"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
