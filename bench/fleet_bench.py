"""A fleet of bridges over 4 session partitions: the drain of one backlog by 1, 2 and 3 bridges,
and the failover time of the shipped lease (10 s) when one of two bridges is killed.

Per fleet size and round: the fleet is started once so the partitions' sessions exist (one per
site, `plant/s<k>/#`), stopped (each bridge hands its partitions back), then N QoS 1 messages
over 4 sites are queued at the broker (bench/publisher.py, raw client) and the fleet is started on
them. The window runs from the first entry in the stream to the N-th; CPU is user + system of the
bridges, Redis and Mosquitto over it. The stream is read back: every (asset, seq) once. Start-up
of the fleet (every bridge takes its share: the first up takes all four, then hands over as the
others join) is inside the window, as it is when a fleet restarts on a backlog.

    flock -x /tmp/iotbridge-bench.lock .venv/bin/python bench/fleet_bench.py --messages 200000

Loopback only; every phase is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drain import read_streams
from bench.procs import ROOT, cpu_seconds, free_port, services, wait_until

SITES = 4
PARTITIONS = json.dumps([{"name": f"s{k}", "filters": [f"plant/s{k}/#"]} for k in range(1, 5)])
ASSETS = 400


def bridge_env(
    mqtt_url: str, redis_url: str, prefix: str, port: int, ttl_s: float
) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("IOTBRIDGE_")}
    return base | {
        "IOTBRIDGE_MQTT__URL": mqtt_url, "IOTBRIDGE_MQTT__CLIENT_ID": prefix,
        "IOTBRIDGE_REDIS__URL": redis_url, "IOTBRIDGE_REDIS__KEY_PREFIX": prefix,
        "IOTBRIDGE_BRIDGE__PARTITIONS": PARTITIONS,
        "IOTBRIDGE_BRIDGE__PARTITION_COVERAGE": "declared",
        "IOTBRIDGE_BRIDGE__PARTITION_LEASE_TTL_S": str(ttl_s),
        "IOTBRIDGE_BRIDGE__METRICS_PORT": str(port), "IOTBRIDGE_LOGGING__LEVEL": "WARNING",
    }  # fmt: skip


class Fleet:
    def __init__(self, size: int, mqtt_url: str, redis_url: str, prefix: str, workdir: Path,
                 ttl_s: float) -> None:  # fmt: skip
        self.ports = [free_port() for _ in range(size)]
        self.envs = [bridge_env(mqtt_url, redis_url, prefix, p, ttl_s) for p in self.ports]
        self.logs = [workdir / f"{prefix}-bridge-{i}.log" for i in range(size)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        argv = [sys.executable, "-m", "bridge.cli", "bridge"]
        for env, log in zip(self.envs, self.logs, strict=True):
            with log.open("ab") as out:
                self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                   env=env, cwd=ROOT))  # fmt: skip

    def owned(self) -> list[int]:
        out = []
        for port in self.ports:
            status, text = services.http_get(port, "/metrics", 1)
            line = next((x for x in text.splitlines() if x.startswith("iotbridge_bridge_partitions_owned ")), None)  # fmt: skip
            out.append(int(float(line.split()[1])) if status == 200 and line else -1)
        return out

    def settled(self) -> bool:
        try:
            owned = self.owned()
        except OSError:
            return False
        ready = all(services.http_get(p, "/readyz", 1)[0] == 200 for p in self.ports)
        return ready and sum(owned) == SITES and max(owned) - min(owned) <= 1

    def stop(self) -> None:
        services.stop_processes(self.procs, 30)
        self.procs = []


def publish_backlog(mqtt_url: str, n: int, tag: str) -> dict[str, int]:
    argv = [sys.executable, str(ROOT / "bench" / "publisher.py"), "--mqtt-url", mqtt_url,
            "--client-id", f"{tag}-pub", "--assets", str(ASSETS), "--sites", str(SITES),
            "--count", str(n)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, check=True, timeout=300, cwd=ROOT).stdout
    report: dict[str, int] = json.loads(out)
    return report


def drain(size: int, n: int, mqtt_url: str, redis_url: str, pids: tuple[int, int], workdir: Path,
          tag: str) -> dict[str, float]:  # fmt: skip
    r = redis.Redis.from_url(redis_url)
    fleet = Fleet(size, mqtt_url, redis_url, tag, workdir, 3.0)
    fleet.start()  # creates the partitions' sessions
    wait_until(fleet.settled, 60, "the fleet settled", poll_s=0.1)
    fleet.stop()
    sent = publish_backlog(mqtt_url, n, tag)
    assert sent["acked"] == n, sent
    stream = f"{tag}:tel:telemetry"
    fleet = Fleet(size, mqtt_url, redis_url, tag, workdir, 3.0)
    fleet.start()
    deadline = time.monotonic() + 240
    first: tuple[float, float, float, float] | None = None
    while (length := int(r.xlen(stream))) < n:
        if first is None and length:
            first = (time.monotonic(), sum(cpu_seconds(p.pid) for p in fleet.procs),
                     *(cpu_seconds(pid) for pid in pids))  # fmt: skip
        if time.monotonic() > deadline:
            raise RuntimeError(f"drain stopped at {length:,} of {n:,}")
        time.sleep(0.005)
    end = (time.monotonic(), sum(cpu_seconds(p.pid) for p in fleet.procs),
           *(cpu_seconds(pid) for pid in pids))  # fmt: skip
    fleet.stop()
    assert first is not None
    pairs, _ = read_streams(r, [stream], 1 << 62)
    secs = end[0] - first[0]
    return {"bridges": size, "msgs": n, "secs": round(secs, 3), "rate": round(n / secs),
            "bridge_cpu_us": round((end[1] - first[1]) / n * 1e6, 1),
            "redis_cpu_us": round((end[2] - first[2]) / n * 1e6, 1),
            "broker_cpu_us": round((end[3] - first[3]) / n * 1e6, 1),
            "lost": n - len(pairs), "dup": sum(pairs.values()) - len(pairs)}  # fmt: skip


def failover(mqtt_url: str, redis_url: str, workdir: Path, tag: str, ttl_s: float) -> float:
    """Two idle bridges, 2 partitions each; kill -9 one: seconds until the other owns all 4."""
    fleet = Fleet(2, mqtt_url, redis_url, tag, workdir, ttl_s)
    fleet.start()
    wait_until(fleet.settled, 60, "the fleet settled", poll_s=0.1)
    fleet.procs[0].kill()
    fleet.procs[0].wait()
    killed = time.monotonic()
    survivor = fleet.ports[1]

    def took_over() -> bool:
        return services.http_get(survivor, "/readyz", 1)[0] == 200 and fleet.owned()[1] == SITES

    fleet.ports[0] = survivor  # the dead one is not asked again
    wait_until(took_over, ttl_s * 3, "the takeover", poll_s=0.02)
    seconds = time.monotonic() - killed
    fleet.stop()
    return round(seconds, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sizes", default="1,2,3")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="iotbridge-fleet-"))
    mosq = services.mosquitto_service(
        workdir / "mosquitto", extra_conf="max_queued_messages 2000000\n"
    )
    red = services.redis_service(workdir / "redis")
    mosq.start()
    red.start()
    mqtt_url, redis_url = f"mqtt://127.0.0.1:{mosq.port}", f"redis://127.0.0.1:{red.port}/0"
    runs: list[dict[str, float]] = []
    failovers: list[float] = []
    try:
        for rnd in range(args.rounds):
            for size in (int(s) for s in args.sizes.split(",")):
                run = drain(size, args.messages, mqtt_url, redis_url, (red.pid, mosq.pid), workdir,
                            f"f{size}r{rnd}")  # fmt: skip
                print(json.dumps(run), flush=True)
                runs.append(run)
            failovers.append(failover(mqtt_url, redis_url, workdir, f"fo{rnd}", 10.0))
            print(json.dumps({"failover_s": failovers[-1], "lease_ttl_s": 10.0}), flush=True)
    finally:
        mosq.stop()
        red.stop()
    sizes = sorted({int(r["bridges"]) for r in runs})
    one = statistics.median(r["rate"] for r in runs if r["bridges"] == 1) if 1 in sizes else None
    for size in sizes:
        mine = [r for r in runs if r["bridges"] == size]
        rate = statistics.median(r["rate"] for r in mine)
        print(f"| {size} | {rate:,.0f} | {rate / one:.2f}x |" if one else f"| {size} | {rate:,.0f} |",
              f"{statistics.median(r['bridge_cpu_us'] for r in mine)} |",
              f"{statistics.median(r['redis_cpu_us'] for r in mine)} |",
              f"{statistics.median(r['broker_cpu_us'] for r in mine)} |",
              f"{sum(r['lost'] for r in mine)} / {sum(r['dup'] for r in mine)} |")  # fmt: skip
    print(f"failover (kill -9 of 1 of 2 bridges, lease 10 s): {failovers} s")
    return 0 if all(r["lost"] == 0 and r["dup"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
