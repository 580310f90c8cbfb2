"""Locust against `iotbridge simulate`: the highest QoS 1 rate each drives into a Mosquitto of its
own on this machine, with the CPU it costs; and the MQTT client of Locust's users, paho-mqtt
against `simulators.loadclient`, under gevent's monkeypatching as Locust runs it.

Rates are counted at the broker (`$SYS/broker/publish/messages/received`, `sys_interval 1`) over
the middle of each run; both generators are asked for more than they can do (`--target`
messages a second: devices x 1 Hz), so the rate they reach is their limit. CPU is the generator's
processes' user + system time over the same window, per message the broker counted.

    .venv/bin/python -m bench.locust_bench                       # everything (about 3 minutes)
    .venv/bin/python -m bench.locust_bench --only clients        # paho against loadclient
    .venv/bin/python -m bench.locust_bench --only locust --workers 2

Prints one JSON object. Not a test: the numbers depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import ROOT, services
from bench.simulator_bench import BrokerCounter, _cpu, simulate

LOCUST = str(Path(sys.executable).with_name("locust"))
DEVICES_PER_USER = 500


def locust_run(port: int, counter: BrokerCounter, workdir: Path, *, target: int, duration: float,
               workers: int) -> dict[str, Any]:  # fmt: skip
    """One headless run of MqttFleetUser at `target` devices x 1 Hz: 1 process, or a master and
    `workers` workers; the broker's rate over the middle of the run and the CPU of every
    Locust process."""
    users = max(1, target // DEVICES_PER_USER)
    common = [LOCUST, "-f", str(ROOT / "simulators" / "locustfile.py"), "--loglevel", "WARNING"]
    run = [*common, "--headless", "-u", str(users), "-r", str(users), "-t", f"{duration:g}s",
           "--host", f"mqtt://127.0.0.1:{port}", "--devices-per-user", str(DEVICES_PER_USER),
           "--device-rate", "1", "--qos", "1", "--csv", str(workdir / "locust"),
           "--stop-timeout", "5", "--only-summary"]  # fmt: skip
    env = {**os.environ, "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": f"bench{time.monotonic_ns()}"}
    procs: list[subprocess.Popen[bytes]] = []
    log = (workdir / "locust.log").open("wb")
    try:
        if workers:
            master_port = services.free_port()
            procs.append(subprocess.Popen(
                [*run, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port",
                 str(master_port), "--expect-workers", str(workers), "MqttFleetUser"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
            procs += [subprocess.Popen(
                [*common, "--worker", "--master-host", "127.0.0.1", "--master-port",
                 str(master_port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                for _ in range(workers)]  # fmt: skip
        else:
            procs.append(subprocess.Popen([*run, "MqttFleetUser"], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))  # fmt: skip
        samples: list[tuple[float, float]] = []
        while procs[0].poll() is None:
            samples.append((time.monotonic(), sum(_cpu(p.pid) for p in procs if p.poll() is None)))
            time.sleep(0.5)
        for proc in procs:
            proc.wait(30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        log.close()
    ended = time.monotonic()
    # Users start within the first second, the stop drains for a few: keep the middle.
    publish_end = ended - 2.0
    window = (publish_end - duration * 0.8, publish_end - duration * 0.1)
    broker_rate = counter.rate(*window)
    inside = [s for s in samples if window[0] <= s[0] <= window[1]]
    cores = (
        (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) if len(inside) > 1 else 0.0
    )
    with (workdir / "locust_stats.csv").open(newline="") as rows:
        stats = {(r["Type"], r["Name"]): r for r in csv.DictReader(rows)}
    row = stats.get(("MQTT QoS 1", "telemetry"), {})
    failures = {f"{r['Name']}: {r['Error']}": int(r["Occurrences"])
                for r in csv.DictReader((workdir / "locust_failures.csv").open(newline=""))}  # fmt: skip
    return {
        "target_rate": users * DEVICES_PER_USER,
        "users": users,
        "workers": workers,
        "broker_rate": round(broker_rate, 1),
        "locust_requests": int(row.get("Request Count", 0)),
        "locust_failures": failures,
        "puback_ms_p50_p99": [row.get("50%"), row.get("99%")],
        "steady_cores": round(cores, 3),
        "steady_cpu_us_per_msg": round(cores * 1e6 / broker_rate, 1) if broker_rate else None,
    }


# --- the client under gevent ---------------------------------------------------------------------

CLIENT_MESSAGES = 30_000
WINDOW = 100


def client_child(kind: str, port: int) -> None:
    """In a process of its own: gevent's monkeypatching as Locust applies it, then CLIENT_MESSAGES
    QoS 1 publishes, at most WINDOW unacknowledged, with one client; prints CPU and wall time."""
    from gevent import monkey

    monkey.patch_all()
    import resource

    import gevent
    from gevent.event import Event

    payload = b'{"ts":1767225600.123456,"seq":1,"values":{"temperature":55.12}}'
    topic = "plant/s1/l1/a000001/telemetry"
    acked, room, done = [0], Event(), Event()

    def on_ack() -> None:
        acked[0] += 1
        room.set()
        if acked[0] == CLIENT_MESSAGES:
            done.set()

    if kind == "paho":
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        client = mqtt.Client(CallbackAPIVersion.VERSION2, f"bench-paho-{port}",
                             protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
        client.on_publish = lambda *_: on_ack()
        client.max_inflight_messages_set(WINDOW)
        client.connect("127.0.0.1", port)
        client.loop_start()  # paho's network loop in a thread: a greenlet, once patched

        def publish(_: int) -> None:
            client.publish(topic, payload, qos=1)
    else:
        from simulators.loadclient import Endpoint, MqttPublisher
        from simulators.wire import topic_field

        pub = MqttPublisher(Endpoint("127.0.0.1", port), f"bench-wire-{port}")
        pub.connect()
        field = topic_field(topic)

        def read_forever() -> None:
            while True:
                pub.read(lambda mid, refused: on_ack())

        gevent.spawn(read_forever)

        mids = itertools.cycle(range(1, 65_536))

        def publish(_: int) -> None:
            pub.publish(field, payload, next(mids))

    start_cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for n in range(CLIENT_MESSAGES):
        while n - acked[0] >= WINDOW:
            room.clear()
            room.wait(1.0)
        publish(n)
    done.wait(60)
    wall = time.perf_counter() - started
    end_cpu = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (end_cpu.ru_utime + end_cpu.ru_stime) - (start_cpu.ru_utime + start_cpu.ru_stime)
    print(json.dumps({"client": kind, "messages": acked[0], "wall_s": round(wall, 2),
                      "msgs_per_s": round(acked[0] / wall), "cpu_us_per_msg":
                      round(cpu * 1e6 / max(acked[0], 1), 1)}))  # fmt: skip


def clients(port: int) -> list[dict[str, Any]]:
    out = []
    for kind in ("paho", "loadclient"):
        done = subprocess.run([sys.executable, "-m", "bench.locust_bench", "--client-child", kind,
                               "--port", str(port)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, check=True)  # fmt: skip
        out.append(json.loads(done.stdout.splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--only", choices=["clients", "locust", "simulate"], action="append")
    parser.add_argument("--target", type=int, default=40_000, help="messages/s asked of both")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=0, help="Locust workers (0: one process)")
    parser.add_argument("--client-child", choices=["paho", "loadclient"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client_child:
        client_child(args.client_child, args.port)
        return
    todo = set(args.only or ["clients", "locust", "simulate"])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as workdir:
        broker = services.mosquitto_service(
            Path(workdir), extra_conf="sys_interval 1\nmax_connections -1\n"
        )
        if broker is None:
            sys.exit("locust_bench needs mosquitto (make services)")
        broker.start()
        counter = BrokerCounter(broker.port)
        try:
            if "clients" in todo:
                results["clients"] = clients(broker.port)
            if "locust" in todo:
                results["locust"] = locust_run(broker.port, counter, Path(workdir),
                                               target=args.target, duration=args.duration,
                                               workers=args.workers)  # fmt: skip
            if "simulate" in todo:
                run = simulate(broker.port, counter, assets=args.target, rate=1.0,
                               duration=args.duration, qos=1, processes=1)  # fmt: skip
                keep = ("target_rate", "broker_rate", "steady_cores", "steady_cpu_us_per_msg",
                        "publish_ack_latency_s", "skipped")  # fmt: skip
                results["simulate"] = {k: run[k] for k in keep}
        finally:
            counter.close()
            broker.stop()
    results["load_average"] = os.getloadavg()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
