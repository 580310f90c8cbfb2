"""The soak: the whole pipeline under steady load and a fault every few minutes, then an audit.

Real processes on free loopback ports: mosquitto with the shipped broker/mosquitto.conf (port,
paths, password and ACL files adapted, as compose runs it), redis-server with an append-only file
and `maxmemory-policy noeviction`, two bridges, each with its on-disk spool, one worker, and the fleet simulator publishing `rate` msg/s at QoS 1 over a few
hundred assets, recording what the broker acknowledged (`--acked`). Both bridges reach the broker,
and the bridges and the worker reach Redis, through fault proxies (`tests.proxy`), so a
connection reset is a real one.

The two bridges run as compose.yaml deploys them by default: one fleet over compose's session
partitions (`bridge.partitions`, a persistent session per partition, owned through leases in Redis),
so a killed bridge's partitions are taken over by the other after the lease. `--bridges pair` makes
them a redundant pair instead (each its own persistent session on every topic; Redis's dedup keeps
one copy of what both write). `--shared-group` makes them split one shared subscription; with
Mosquitto 2.0.11 that loses, at a broker restart, what devices publish before the first bridge has
subscribed again: Mosquitto does not save `$share` subscriptions in its persistence file.

Every `fault_interval_s` one fault, drawn from a seeded shuffle of all five kinds in turn (so any
five consecutive faults include each kind once):

- `bridge_kill`: kill -9 bridge-1, start it again (same client id, session and spool);
- `redis_kill`: kill -9 redis-server, start it again on the same append-only file;
- `broker_restart`: SIGTERM mosquitto (it saves its persistence file), start it again;
- `connection_reset`: drop every proxied connection, to the broker and to Redis, at once;
- `redis_pause`: `CLIENT PAUSE 5000 WRITE`.

Bridge-2 and the worker are never killed, so their memory and open descriptors can be compared
between the end of the warm-up and the end of the run. When the simulator is done, the soak waits
for everything to be written and processed, then checks its claims (`SoakReport.claims`): lost 0,
duplicated 0 and unexpected 0 (`iotbridge audit` against the acknowledged set), the load held,
RSS drift under 10% and descriptors stable, the worker caught up within 60 s of the last fault,
the counters of each live bridge adding up exactly, every fault kind injected.

    python -m tests.soak --duration-s 1800 --fault-interval-s 120 --rate 500   # make soak

prints the report and writes it as JSON; the exit code is 1 when a claim fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis as redis_py
import yaml

from config.keys import Keys
from tests.compose_config import PASSWORDS, mosquitto_as_compose_runs_it
from tests.faults import ROOT, Bridge, rss_bytes
from tests.proxy import FaultProxy
from tests.services import (
    Service,
    free_port,
    http_get,
    redis_service,
    require,
    wait_until,
)

FAULT_KINDS = ("bridge_kill", "redis_kill", "broker_restart", "connection_reset", "redis_pause")
ASSETS = 300
SHARDS = 4  # as compose.yaml: the route's stream split by asset
ROUTE = "telemetry"
GROUP = "workers"  # the worker's default consumer group
PREFIX = "soak"
PAUSE_MS = 5000
RSS_DRIFT_MAX = 0.10
# Open descriptors may differ by a few between two moments of a healthy process: the Redis client
# pool opens a connection for a command that overlaps another (a retention pass beside a batch
# write) and keeps it, the spool opens its next segment file before closing the last, and the
# metrics server holds a scrape's socket while answering. A leak grows with every fault and every
# reconnect (14 faults in the long run, each one reconnecting every link), far past 5.
FD_SLACK = 5
CAUGHT_UP_WITHIN_S = 60.0
# Back to normal after a fault: what is waiting on the worker (pending + lag) and unacknowledged
# in each bridge is at most half a second of traffic, what a healthy pipeline holds between a
# bridge's batch and the worker's ack at this rate (measured: tens of entries at 500 msg/s).
CAUGHT_UP_TRAFFIC_S = 0.5
STABLE_S = 2.0
DRAIN_TIMEOUT_S = 180.0
SAMPLE_S = 2.0
RSS_WINDOW_S = 10.0
LOAD_HELD = 0.9  # acknowledged messages of the rate's schedule: broker restarts refuse a few
M = "iotbridge_bridge_messages_"


def warmup_s(duration_s: float) -> float:
    """When the memory baseline is taken: after the allocators, caches and connection pools have
    grown to their working size (20 s in the 3-minute run, 3 minutes in the 30-minute one), so
    that first growth is not counted as drift."""
    return min(max(20.0, duration_s / 10), 300.0)


def fault_plan(duration_s: float, interval_s: float, seed: int) -> list[tuple[float, str]]:
    """(time, kind) of every fault: at each multiple of the interval before the end, the kinds in
    a shuffled round robin (each cycle of five shuffled anew by the seeded generator)."""
    rng = random.Random(seed)
    times: list[float] = []
    t = interval_s
    while t < duration_s:
        times.append(t)
        t += interval_s
    kinds: list[str] = []
    while len(kinds) < len(times):
        cycle = list(FAULT_KINDS)
        rng.shuffle(cycle)
        kinds += cycle
    return list(zip(times, kinds, strict=False))


# --- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    name: str
    ok: bool
    detail: str


@dataclass
class Fault:
    kind: str
    at_s: float  # since publishing began
    took_s: float  # until the faulted process was back (or the fault applied)
    caught_up_s: float | None = None  # from the fault until the pipeline had caught up


@dataclass
class SoakReport:
    seed: int
    duration_s: float
    fault_interval_s: float
    rate: float
    workdir: str
    wall_s: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    publisher: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, dict[str, float]] = field(default_factory=dict)
    fds: dict[str, dict[str, int]] = field(default_factory=dict)
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    caught_up_after_last_fault_s: float | None = None
    redis_reported_lag: int | None = None  # XINFO GROUPS lag at the end, for comparison
    drained_after_stop_s: float | None = None
    claims: list[Claim] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.claims) and all(c.ok for c in self.claims)

    def claim(self, name: str) -> Claim:
        return next(c for c in self.claims if c.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def text(self) -> str:
        lines = [
            f"soak: {self.duration_s:.0f} s at {self.rate:.0f} msg/s, a fault every "
            f"{self.fault_interval_s:.0f} s, seed {self.seed}; wall time {self.wall_s:.0f} s",
            "faults:",
            *(
                f"  {f.at_s:7.1f} s  {f.kind:<17} back after {f.took_s:.1f} s, caught up after "
                f"{f.caught_up_s} s"
                for f in self.faults
            ),
            "claims:",
            *(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:<22} {c.detail}" for c in self.claims),
            f"result: {'PASS' if self.ok else 'FAIL'} (logs and the JSON report in {self.workdir})",
        ]
        return "\n".join(lines)


# --- processes ----------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def durable_redis(workdir: Path) -> Service:
    """redis-server with an append-only file (fsynced every second: a kill -9 of the process keeps
    what it wrote to the page cache) that refuses writes at a memory bound instead of evicting."""
    service = redis_service(workdir, None, "--appendonly", "yes", "--appendfsync", "everysec",
                            "--maxmemory-policy", "noeviction")  # fmt: skip
    return require(service, "redis-server")


class Proxies:
    """Fault proxies on an event loop of their own thread, driven from the soak's thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxies",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self.proxies: dict[str, FaultProxy] = {}

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def add(self, name: str, port: int) -> int:
        """A proxy to a loopback port; returns the proxy's own port."""
        self.proxies[name] = self._call(FaultProxy("127.0.0.1", port).start())
        return self.proxies[name].port

    def reset_all(self) -> None:
        async def reset() -> None:
            for proxy in self.proxies.values():
                proxy.reset_all()

        self._call(reset())

    def connections(self) -> dict[str, int]:
        return {name: proxy.connections for name, proxy in self.proxies.items()}

    def close(self) -> None:
        async def close_all() -> None:
            for proxy in self.proxies.values():
                await proxy.close()

        with contextlib.suppress(Exception):
            self._call(close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()


# --- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, workdir: Path, duration_s: float, interval_s: float, rate: float,
                 seed: int, shared_group: str | None = None, bridges: str = "partitions") -> None:  # fmt: skip
        self.workdir = workdir
        self.shared_group = shared_group
        self.fleet = bridges == "partitions" and shared_group is None
        self.duration_s, self.interval_s, self.rate, self.seed = duration_s, interval_s, rate, seed
        self.report = SoakReport(seed, duration_s, interval_s, rate, str(workdir))
        self.keys = Keys(PREFIX, SHARDS)
        self.proxies = Proxies()
        self.services: list[Service] = []
        self.bridges: list[Bridge] = []
        self.simulator: subprocess.Popen[bytes] | None = None
        self.acked_path = workdir / "acked.jsonl"
        self.samples: dict[str, list[tuple[float, int, int]]] = {"bridge-2": [], "worker": []}
        self.started = 0.0
        self.backlog_bound = max(1, int(rate * CAUGHT_UP_TRAFFIC_S))
        self._fault_at = 0.0
        self._ok_since: float | None = None
        self.stored = 0  # entries in the route's streams at the last look

    # --- set-up

    def start(self) -> None:
        self.redis = durable_redis(self.workdir / "redis").start()
        self.broker = mosquitto_as_compose_runs_it(self.workdir / "mosquitto", free_port()).start()
        self.services += [self.redis, self.broker]
        to_broker = self.proxies.add("broker", self.broker.port)
        to_redis = self.proxies.add("redis", self.redis.port)
        common = {"IOTBRIDGE_REDIS__KEY_PREFIX": PREFIX, "IOTBRIDGE_REDIS__STREAM_SHARDS": str(SHARDS),
                  "IOTBRIDGE_BACKOFF__MAX_S": "1", "IOTBRIDGE_LOGGING__FORMAT": "json"}  # fmt: skip
        for n in (1, 2):
            self.bridges.append(Bridge(
                self.workdir / f"bridge-{n}",
                mqtt_url=f"mqtt://127.0.0.1:{to_broker}",
                redis_url=f"redis://127.0.0.1:{to_redis}/0",
                name=f"bridge-{n}",
                spool_dir=self.workdir / f"bridge-{n}" / "spool",
                env={**common, "IOTBRIDGE_MQTT__CLIENT_ID": "soak-bridge" if self.fleet else f"soak-bridge-{n}",
                     "IOTBRIDGE_MQTT__USERNAME": "iotbridge", "IOTBRIDGE_MQTT__PASSWORD": PASSWORDS["MQTT_PASSWORD"],
                     **(compose_partitions() if self.fleet else {}),
                     **({"IOTBRIDGE_BRIDGE__SHARED_GROUP": self.shared_group} if self.shared_group else {})},
            ))  # fmt: skip
        for bridge in self.bridges:
            bridge.start(ready_timeout_s=60)
        worker_port = free_port()
        worker_env = {**common, "IOTBRIDGE_REDIS__URL": f"redis://127.0.0.1:{to_redis}/0",
                      "IOTBRIDGE_WORKER__METRICS_PORT": str(worker_port),
                      "IOTBRIDGE_WORKER__BLOCK_MS": "200"}  # fmt: skip
        argv = [sys.executable, "-m", "bridge.cli", "worker"]
        self.worker = Service("worker", argv, worker_port, self.workdir / "worker", worker_env)
        self.services.append(self.worker.start())
        wait_until(lambda: http_get(worker_port, "/readyz", 1)[0] == 200, 60, "the worker ready")
        self._start_simulator(common)

    def _start_simulator(self, common: dict[str, str]) -> None:
        env = {**os.environ, **common, "IOTBRIDGE_MQTT__URL": f"mqtt://127.0.0.1:{self.broker.port}",
               "IOTBRIDGE_MQTT__USERNAME": "simulator", "IOTBRIDGE_MQTT__PASSWORD": PASSWORDS["MQTT_SIMULATOR_PASSWORD"],
               "IOTBRIDGE_SIMULATOR__METRICS_PORT": str(free_port()),
               "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": "soak-sim",
               "IOTBRIDGE_SIMULATOR__ASSETS_PER_CONNECTION": "100"}  # fmt: skip
        argv = [sys.executable, "-m", "bridge.cli", "simulate", "--assets", str(ASSETS),
                "--rate", repr(self.rate / ASSETS), "--duration", repr(self.duration_s),
                "--seed", str(self.seed), "--acked", str(self.acked_path), "--no-progress"]  # fmt: skip
        out = self.workdir / "simulator.json"
        with out.open("wb") as stdout, (self.workdir / "simulator.log").open("ab") as stderr:
            self.simulator = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)
        wait_until(
            lambda: self._received() > 0 or self.simulator is None or self.simulator.poll() is not None,
            60,
            "the first messages through the bridges",
            poll_s=0.1,
        )  # fmt: skip
        if self.simulator.poll() is not None:
            raise RuntimeError(f"the simulator exited with {self.simulator.returncode}")
        self.started = time.monotonic()

    # --- observations

    def publishing(self) -> bool:
        running = self.simulator is not None and self.simulator.poll() is None
        return running and time.monotonic() - self.started < self.duration_s - 1

    def _received(self) -> float:
        return sum(b.total(M + "received_total") for b in self.bridges if b.alive)

    def _db(self) -> redis_py.Redis:
        return redis_py.Redis(port=self.redis.port, socket_timeout=5, decode_responses=True)

    def backlog(self, limit: int) -> int | None:
        """Entries the worker's group has not finished over every shard stream: pending, plus
        those after its last-delivered id (counted up to `limit + 1` per stream). None when Redis
        cannot tell (down, loading, paused).

        Not XINFO GROUPS `lag`: redis-server 7.0.15 restarted from its append-only file has no
        entries-read for the group (nil), and once the group reads on it comes back far too low:
        `lag` (entries-added - entries-read) stayed about 10,500 per stream for good, with
        pending 0 and the last-delivered id the stream's last (`redis_lag` records it)."""
        total = 0
        try:
            with self._db() as db:
                for stream in self.keys.telemetry_streams(ROUTE):
                    group = next((g for g in db.xinfo_groups(stream) if g["name"] == GROUP), None)
                    if group is None:
                        return None
                    after = db.xrange(
                        stream, "(" + group["last-delivered-id"], "+", count=limit + 1
                    )
                    total += int(group["pending"]) + len(after)
        except redis_py.RedisError:
            return None
        return total

    def redis_lag(self) -> int | None:
        """The group's lag as XINFO GROUPS reports it (and the worker's lag metric shows it)."""
        try:
            with self._db() as db:
                lags = [g.get("lag") for s in self.keys.telemetry_streams(ROUTE)
                        for g in db.xinfo_groups(s) if g["name"] == GROUP]  # fmt: skip
        except redis_py.RedisError:
            return None
        return None if None in lags else sum(int(lag) for lag in lags)

    def bridge_state(self, bridge: Bridge) -> tuple[float, float] | None:
        """(in flight, spooled) of a live bridge; None when it does not answer."""
        if not bridge.alive:
            return None
        try:
            m = bridge.metrics()
        except (AssertionError, OSError, ValueError):
            return None
        return m.get("iotbridge_bridge_in_flight_messages", 0), m.get(
            "iotbridge_bridge_spool_entries", 0
        )

    def caught_up(self, bound: int) -> bool:
        """Every bridge connected and holding at most `bound` messages, none spooled, the
        worker's group at most `bound` entries behind, and, while the simulator publishes, new
        entries in the streams since the last look (a pipeline that stopped delivering holds
        nothing either)."""
        previous, self.stored = self.stored, self._stored()
        if self.publishing() and self.stored <= previous:
            return False
        for bridge in self.bridges:
            state = self.bridge_state(bridge)
            if state is None or state[0] > bound or state[1] > 0 or not bridge.ready():
                return False
        backlog = self.backlog(bound)
        return backlog is not None and backlog <= bound

    def sample(self) -> None:
        t = time.monotonic() - self.started
        for name, pid in (("bridge-2", self.bridges[1].pid), ("worker", self.worker.pid)):
            with contextlib.suppress(OSError):
                self.samples[name].append((t, rss_bytes(pid), open_fds(pid)))

    # --- faults

    def inject(self, kind: str) -> None:
        if kind == "bridge_kill":
            self.bridges[0].kill()
            self.bridges[0].start(ready_timeout_s=60)
        elif kind == "redis_kill":
            self.redis.kill()
            self.redis.start(timeout_s=60)
            wait_until(self._redis_loaded, 120, "redis to load its append-only file", poll_s=0.1)
        elif kind == "broker_restart":
            self.broker.stop(timeout_s=30)
            self.broker.start(timeout_s=60)
        elif kind == "connection_reset":
            self.proxies.reset_all()
        elif kind == "redis_pause":
            with self._db() as db:
                db.execute_command("CLIENT", "PAUSE", str(PAUSE_MS), "WRITE")
        else:
            raise ValueError(f"unknown fault {kind}")

    def _redis_loaded(self) -> bool:
        try:
            with self._db() as db:
                return int(db.info("persistence")["loading"]) == 0
        except redis_py.RedisError:
            return False

    # --- the phases

    def publish_with_faults(self) -> None:
        """Until the simulator's duration is over: faults on schedule, samples of memory and
        descriptors, and after each fault, the time until the pipeline has caught up."""
        plan = fault_plan(self.duration_s, self.interval_s, self.seed)
        next_sample = 0.0
        while (now := time.monotonic() - self.started) < self.duration_s:
            if plan and now >= plan[0][0]:
                _, kind = plan.pop(0)
                at = time.monotonic()
                self.inject(kind)
                self.report.faults.append(
                    Fault(kind, round(at - self.started, 1), round(time.monotonic() - at, 1))
                )
                self._fault_at, self._ok_since = at, None
            if now >= next_sample:
                self.sample()
                next_sample = now + SAMPLE_S
            self._note_caught_up(self.backlog_bound)
            self._check_alive()
            time.sleep(0.25)

    def _note_caught_up(self, bound: int) -> None:
        """Time the last fault's recovery: the first moment from which `caught_up` held for
        STABLE_S (a bridge just restarted holds nothing for an instant, before the broker
        delivers what it queued for it)."""
        fault = self.report.faults[-1] if self.report.faults else None
        if fault is None or fault.caught_up_s is not None:
            return
        now = time.monotonic()
        if not self.caught_up(bound):
            self._ok_since = None
        elif self._ok_since is None:
            self._ok_since = now
        elif now - self._ok_since >= STABLE_S:
            fault.caught_up_s = round(self._ok_since - self._fault_at, 1)

    def _check_alive(self) -> None:
        dead = [b.name for b in self.bridges if not b.alive]
        dead += [s.name for s in self.services if s.proc is None or s.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"exited during the soak: {', '.join(dead)}")

    def finish_publishing(self) -> None:
        assert self.simulator is not None
        try:
            self.simulator.wait(timeout=120)  # the simulator's ack timeout is 10 s
        except subprocess.TimeoutExpired:
            self.simulator.kill()
            self.simulator.wait()
        text = (self.workdir / "simulator.json").read_text().strip()
        report = json.loads(text.splitlines()[-1]) if text else {}
        keep = ("scheduled", "sent", "acked", "failed", "failed_by_kind", "skipped_by_reason",
                "unconfirmed", "target_rate", "achieved_rate_msgs_per_s", "elapsed_s",
                "publish_ack_latency_s")  # fmt: skip
        self.report.publisher = {k: report.get(k) for k in keep}

    def drain(self) -> None:
        """Wait (bounded) until nothing has been held anywhere for STABLE_S: no message in a
        bridge or its spool, the worker's group without pending or lag, no new stream entry."""
        stopped = time.monotonic()
        since: float | None = None
        stored_since = 0
        while time.monotonic() < stopped + DRAIN_TIMEOUT_S:
            self._note_caught_up(self.backlog_bound)
            now = time.monotonic()
            if not self.caught_up(0) or (since is not None and self.stored != stored_since):
                since = None
            elif since is None:
                since, stored_since = now, self.stored
            elif now - since >= STABLE_S:
                self.report.drained_after_stop_s = round(since - stopped, 1)
                return
            time.sleep(0.25)

    def _stored(self) -> int:
        try:
            with self._db() as db:
                return sum(int(db.xlen(s)) for s in self.keys.telemetry_streams(ROUTE))
        except redis_py.RedisError:
            return -1

    def audit(self) -> None:
        env = {**os.environ, "IOTBRIDGE_REDIS__URL": f"redis://127.0.0.1:{self.redis.port}/0",
               "IOTBRIDGE_REDIS__KEY_PREFIX": PREFIX, "IOTBRIDGE_REDIS__STREAM_SHARDS": str(SHARDS)}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "bridge.cli", "audit", "--acked", str(self.acked_path)],
            env=env, cwd=ROOT, capture_output=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode not in (0, 1):
            raise RuntimeError(f"iotbridge audit exited with {done.returncode}: {done.stderr!r}")
        self.report.audit = json.loads(done.stdout)

    def measure_processes(self) -> None:
        # Every sample (seconds, RSS bytes, descriptors), for a look at a drift's shape.
        (self.workdir / "samples.json").write_text(json.dumps(self.samples))
        self.report.redis_reported_lag = self.redis_lag()
        warm = warmup_s(self.duration_s)
        for name, samples in self.samples.items():
            base = [s for s in samples if warm <= s[0] < warm + RSS_WINDOW_S]
            end = [s for s in samples if s[0] >= self.duration_s - RSS_WINDOW_S]
            if not base or not end:
                continue
            rss_base, rss_end = (
                statistics.median(s[1] for s in base),
                statistics.median(s[1] for s in end),
            )
            self.report.rss[name] = {"baseline_mb": round(rss_base / 2**20, 1),
                                     "end_mb": round(rss_end / 2**20, 1),
                                     "max_mb": round(max(s[1] for s in samples) / 2**20, 1),
                                     "drift": round((rss_end - rss_base) / rss_base, 4)}  # fmt: skip
        for name, pid in (("bridge-2", self.bridges[1].pid), ("worker", self.worker.pid)):
            base = [s for s in self.samples[name] if s[0] >= warm]
            if base:
                self.report.fds[name] = {"baseline": base[0][2], "end": open_fds(pid),
                                         "max": max(s[2] for s in self.samples[name])}  # fmt: skip
                self.report.fds[name]["delta"] = self.report.fds[name]["end"] - base[0][2]
        for bridge in self.bridges:
            m = bridge.metrics()
            terms = {k: bridge.total(M + k + "_total", m) for k in
                     ("received", "forwarded", "rejected", "duplicate", "skipped", "dropped")}  # fmt: skip
            terms["in_flight"] = m.get("iotbridge_bridge_in_flight_messages", 0.0)
            terms["spooled"] = m.get("iotbridge_bridge_spool_entries", 0.0)
            terms["starts"] = bridge.starts
            self.report.counters[bridge.name] = terms

    def judge(self) -> None:
        r, claims = self.report, self.report.claims
        a = r.audit
        lost = a.get("examples", {}).get("lost", [])
        claims.append(Claim("lost", a.get("lost") == 0, f"{a.get('lost')} of {a.get('acked')} acknowledged {lost}{self._when(lost)}"))  # fmt: skip
        claims.append(Claim("duplicated", a.get("duplicated") == 0, f"{a.get('duplicated')} {a.get('examples', {}).get('duplicated', [])}"))  # fmt: skip
        claims.append(Claim("unexpected", a.get("unexpected") == 0, f"{a.get('unexpected')} {a.get('examples', {}).get('unexpected', [])}"))  # fmt: skip
        acked, target = int(r.publisher.get("acked") or 0), int(self.rate * self.duration_s)
        claims.append(Claim("load", acked >= LOAD_HELD * target,
                            f"{acked} acknowledged of {target} scheduled at {self.rate:.0f} msg/s "
                            f"(achieved {r.publisher.get('achieved_rate_msgs_per_s')} msg/s; "
                            f"sent {r.publisher.get('sent')}, skipped {r.publisher.get('skipped_by_reason')}, "
                            f"failed {r.publisher.get('failed_by_kind')})"))  # fmt: skip
        for name in ("bridge-2", "worker"):
            rss = r.rss.get(name)
            claims.append(Claim(f"rss drift {name}", rss is not None and rss["drift"] < RSS_DRIFT_MAX,
                                f"{rss} (bound {RSS_DRIFT_MAX:.0%})"))  # fmt: skip
            fds = r.fds.get(name)
            claims.append(Claim(f"fds {name}", fds is not None and abs(fds["delta"]) <= FD_SLACK,
                                f"{fds} (slack {FD_SLACK})"))  # fmt: skip
        up = r.caught_up_after_last_fault_s = r.faults[-1].caught_up_s if r.faults else None
        drained = r.drained_after_stop_s
        settled = [x for x in (up, drained) if x is not None and x <= CAUGHT_UP_WITHIN_S]
        claims.append(Claim("caught up", len(settled) == 2,
                            f"{up} s after the last fault (bound {CAUGHT_UP_WITHIN_S:.0f} s, backlog "
                            f"<= {self.backlog_bound}); pending and lag 0 {r.drained_after_stop_s} s "
                            "after publishing stopped"))  # fmt: skip
        for name, c in r.counters.items():
            counted = sum(
                c[k] for k in ("forwarded", "rejected", "duplicate", "skipped", "dropped")
            )
            exact = c["received"] == counted + c["in_flight"] and c["in_flight"] == 0
            claims.append(Claim(f"counters {name}", exact,
                                f"received {c['received']:.0f} = forwarded {c['forwarded']:.0f} + rejected "
                                f"{c['rejected']:.0f} + duplicate {c['duplicate']:.0f} + skipped {c['skipped']:.0f} "
                                f"+ dropped {c['dropped']:.0f} + in flight {c['in_flight']:.0f}"))  # fmt: skip
        kinds = {f.kind for f in r.faults}
        expected = set(FAULT_KINDS) if len(r.faults) >= len(FAULT_KINDS) else kinds
        claims.append(Claim("faults", bool(r.faults) and kinds == expected,
                            f"{len(r.faults)} injected: " + ", ".join(f"{f.kind}@{f.at_s:.0f}s" for f in r.faults)))  # fmt: skip

    def _when(self, examples: list[str]) -> str:
        """When the examples (`asset/first..last`) were published, from their seq: each asset
        sends its seq k about k / (rate / ASSETS) s after the start."""
        seqs = [int(n) for e in examples for n in e.rpartition("/")[2].split("..") if n.isdigit()]
        if not seqs:
            return ""
        per_asset_s = ASSETS / self.rate
        return f", published about {min(seqs) * per_asset_s:.0f}-{max(seqs) * per_asset_s:.0f} s in"

    def stop(self) -> None:
        """Everything this soak started, by PID: producers first, servers last."""
        if self.simulator is not None and self.simulator.poll() is None:
            self.simulator.terminate()
            try:
                self.simulator.wait(15)
            except subprocess.TimeoutExpired:
                self.simulator.kill()
                self.simulator.wait()
        for bridge in self.bridges:
            bridge.close()
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.signal(signal.SIGCONT)
                service.stop(timeout_s=30)
        self.proxies.close()


def compose_partitions() -> dict[str, str]:
    """The bridges' partition settings as compose.yaml sets them."""
    env = yaml.safe_load((ROOT / "compose.yaml").read_text())["x-bridge-env"]
    return {k: v for k, v in env.items() if k.startswith("IOTBRIDGE_BRIDGE__PARTITION")}


def run_soak(workdir: Path, duration_s: float, fault_interval_s: float, rate: float,
             seed: int, shared_group: str | None = None, bridges: str = "partitions") -> SoakReport:  # fmt: skip
    """Run the soak in `workdir` (logs, data and `soak-report.json` stay there)."""
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    soak = Soak(workdir, duration_s, fault_interval_s, rate, seed, shared_group, bridges)
    try:
        soak.start()
        soak.publish_with_faults()
        soak.finish_publishing()
        soak.drain()
        soak.audit()
        soak.measure_processes()
        soak.judge()
    finally:
        soak.stop()
        soak.report.wall_s = round(time.monotonic() - began, 1)
        (workdir / "soak-report.json").write_text(json.dumps(soak.report.as_dict(), indent=2))
    return soak.report


# --- the command --------------------------------------------------------------------------------


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--duration-s", type=float, default=1800, help="publishing time")
    parser.add_argument("--fault-interval-s", type=float, default=120, help="time between faults")
    parser.add_argument("--rate", type=float, default=500, help="messages per second, in total")
    parser.add_argument("--seed", type=int, default=1, help="seeds the order of the faults")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary dir")
    parser.add_argument("--shared-group", default=None,
                        help="the bridges share one subscription")  # fmt: skip
    parser.add_argument("--bridges", choices=("partitions", "pair"), default="partitions",
                        help="one fleet over compose's partitions (default), or a redundant pair")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="iotbridge-soak-"))
    signal.signal(signal.SIGTERM, _interrupted)  # stop every process in run_soak's finally
    report = run_soak(workdir, args.duration_s, args.fault_interval_s, args.rate, args.seed,
                      args.shared_group, args.bridges)  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    sys.stdout.write(report.text() + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
