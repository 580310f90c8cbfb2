"""The processes of a benchmark subject: started, watched and stopped by PID, measured from outside.

A subject is `limit` (`mosquitto_sub`, a C subscriber that only counts), `baseline`
(bench/baseline.py), `bridge` (one `iotbridge bridge`), `bridge2` (two bridges in one shared
subscription group) or `pipeline` (one bridge and one `iotbridge worker`), each configured through
its command line or environment.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.results import WorkerBench, WorkerRun

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SHARED_GROUP = "bench"
# What `python -m bridge.cli bridge` (and `worker`) imports from the repository.
PACKAGES = ("bridge", "config", "observability", "workers")
SUBJECTS = ("limit", "baseline", "bridge", "bridge2", "pipeline")

# The integration tests' server helpers, imported by name so that `mypy bench` checks bench only.
services = importlib.import_module("tests.services")
free_port, wait_until = services.free_port, services.wait_until
# User + system CPU of a process (all its threads), from /proc/<pid>/stat.
cpu_seconds = importlib.import_module("tests.faults").cpu_s


@dataclass
class Proc:
    """One process of a subject, started and stopped by PID, its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path = ROOT
    metrics_port: int | None = None  # a bridge: ready when /readyz answers 200
    client_id: str = ""  # a subject's MQTT client id: its session is cleared after the run
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0  # the baseline prints `ready` once per start
    stdout: Path | None = None  # the C subscriber's output (/dev/null), apart from the log
    session_argv: list[str] | None = None  # run to its exit to create the session (C subscriber)
    early: bool = False  # the worker: started and ready before the drain window can open
    holds_session: bool = True  # an MQTT client: its session is created before the backlog

    def start(self) -> None:
        with self.log.open("ab") as err, contextlib.ExitStack() as files:
            out = files.enter_context(self.stdout.open("wb")) if self.stdout else err
            stderr = err if self.stdout else subprocess.STDOUT
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=stderr, cwd=self.cwd, env=self.env
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited: {self.tail()}")
        if self.metrics_port is None:
            return self.log.read_text(errors="replace").count("ready") >= self.starts
        status, _ = services.http_get(self.metrics_port, "/readyz", 0.5)
        return bool(status == 200)

    def terminate(self) -> None:
        """One SIGTERM: a second one would make the bridge exit without draining."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 30) -> int | None:
        if self.popen is None:
            return None
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        return self.popen.returncode

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def snapshot_code(dest: Path) -> tuple[Path, str]:
    """Copy the packages a bridge imports, so that every process of the run runs the same code
    even while someone edits the working tree; (the copy, a short hash of its sources)."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))  # fmt: skip
        for path in sorted((dest / package).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(dest)).encode() + b"\0" + path.read_bytes())
    return dest, digest.hexdigest()[:12]


def subject_procs(
    subject: str, mqtt_url: str, redis_url: str, prefix: str, workdir: Path, code: Path,
    bridge_env: dict[str, str] | None = None, route_filter: str = "plant/+/+/+/telemetry",
    drain_n: int = 0,
) -> list[Proc]:  # fmt: skip
    """The subject's processes; a bridge or worker runs from `code` (its working directory comes
    first on sys.path, before the editable install's finder)."""
    client_id = f"{prefix}-0"
    if subject == "limit":
        return [limit_proc(mqtt_url, route_filter, client_id, workdir, drain_n)]
    if subject == "baseline":
        argv = [sys.executable, str(BENCH / "baseline.py"), "--mqtt-url", mqtt_url,
                "--redis-url", redis_url, "--prefix", prefix, "--client-id", client_id]  # fmt: skip
        return [Proc("baseline", argv, dict(os.environ), workdir / f"{prefix}-0.log",
                     client_id=client_id)]  # fmt: skip
    count = {"bridge": 1, "bridge2": 2, "pipeline": 1}[subject]
    env = iotbridge_env(redis_url, prefix) | {"IOTBRIDGE_MQTT__URL": mqtt_url,
                                              "IOTBRIDGE_MQTT__PROTOCOL": "5"}  # fmt: skip
    procs = []
    for index in range(count):
        port = free_port()
        client_id = f"{prefix}-{index}"
        mine = env | {"IOTBRIDGE_MQTT__CLIENT_ID": client_id,
                      "IOTBRIDGE_BRIDGE__METRICS_PORT": str(port)}  # fmt: skip
        if count > 1:
            mine["IOTBRIDGE_BRIDGE__SHARED_GROUP"] = SHARED_GROUP
        mine |= bridge_env or {}
        argv = [sys.executable, "-m", "bridge.cli", "bridge"]
        log = workdir / f"{prefix}-{index}.log"
        procs.append(Proc(f"bridge-{index}", argv, mine, log, cwd=code, metrics_port=port,
                          client_id=client_id))  # fmt: skip
    if subject == "pipeline":
        port = free_port()
        # The same settings as the bridge (--bridge-env too: a shard count must agree).
        mine = iotbridge_env(redis_url, prefix) | {"IOTBRIDGE_WORKER__METRICS_PORT": str(port)}
        mine |= bridge_env or {}
        argv = [sys.executable, "-m", "bridge.cli", "worker"]
        procs.append(Proc("worker", argv, mine, workdir / f"{prefix}-worker.log", cwd=code,
                          metrics_port=port, early=True, holds_session=False))  # fmt: skip
    return procs


def iotbridge_env(redis_url: str, prefix: str) -> dict[str, str]:
    """The harness's environment without its own IOTBRIDGE_ settings, pointed at the run's Redis."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("IOTBRIDGE_")}
    return base | {"IOTBRIDGE_REDIS__URL": redis_url, "IOTBRIDGE_REDIS__KEY_PREFIX": prefix,
                   "IOTBRIDGE_LOGGING__LEVEL": "WARNING"}  # fmt: skip


def limit_proc(mqtt_url: str, route_filter: str, client_id: str, workdir: Path, n: int) -> Proc:
    """`mosquitto_sub` on the route's filter with the bridge's session and flow control (MQTT 5,
    QoS 1, a persistent session, receive maximum 1000), exiting after the n-th message (`-C`). It
    prints one `.` per message (nothing of the payload) to /dev/null: it still flushes stdout per
    message, one write to /dev/null beside its PUBACK. Its session is created with `-E` (exit once
    subscribed)."""
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        raise RuntimeError("the limit needs mosquitto_sub (mosquitto-clients)")
    host, port = mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
    argv = [binary, "-h", host, "-p", port, "-V", "mqttv5", "-q", "1", "-c", "-x", "7200",
            "-i", client_id, "-t", route_filter,
            "-D", "connect", "receive-maximum", "1000"]  # fmt: skip
    return Proc("mosquitto_sub", [*argv, "-F", ".", "-C", str(n)], dict(os.environ),
                workdir / f"{client_id}.log", client_id=client_id, stdout=Path(os.devnull),
                session_argv=[*argv, "-E"])  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """What the harness reads of the settings the subjects run with."""

    route_filter: str  # the default route's subscription filter
    stream_shards: int
    worker_group: str


def layout(route: str, bridge_env: dict[str, str]) -> Layout:
    """The shipped settings with the run's overrides, as the run's bridges and worker load them."""
    loader = importlib.import_module("config.loader")
    routing = importlib.import_module("bridge.routing")
    env = iotbridge_env("redis://127.0.0.1:6379/0", "bench") | bridge_env
    with mock.patch.dict(os.environ, env, clear=True):
        settings = loader.load()
    found = next(r for r in settings.bridge.routes if r.name == route)
    return Layout(routing.Route.compile(found).filter, settings.redis.stream_shards,
                  settings.worker.group)  # fmt: skip


def start_all(procs: list[Proc]) -> None:
    for proc in procs:
        proc.starts += 1
        proc.start()


def wait_ready(procs: list[Proc], timeout_s: float = 60) -> None:
    wait_until(lambda: all(p.ready() for p in procs), timeout_s, "subject ready", poll_s=0.05)


def stop_all(procs: list[Proc]) -> list[int | None]:
    for proc in procs:
        proc.terminate()
    return [proc.wait() for proc in procs]


def counters(proc: Proc) -> dict[str, int]:
    """The bridge process's own account, from its /metrics: messages received, forwarded,
    rejected, duplicate, dropped (each summed over its labels)."""
    if proc.metrics_port is None or not proc.name.startswith("bridge"):
        return {}
    status, text = services.http_get(proc.metrics_port, "/metrics", 2)
    if status != 200:
        return {}  # a diagnostic only: the stream itself is what the check counts
    totals: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("iotbridge_bridge_messages_") and "_total" in line:
            name = line.removeprefix("iotbridge_bridge_messages_").split("_total", 1)[0]
            totals[name] = totals.get(name, 0) + int(float(line.rsplit(" ", 1)[1]))
    return totals


def clear_session(host: str, port: int, client_id: str) -> None:
    """Connect with clean start and session expiry 0: the broker forgets the session and queue."""
    connected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv5)
    client.on_connect = lambda *_: connected.set()
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect(host, port, clean_start=True, properties=props)
    client.loop_start()
    try:
        connected.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()


# A busy loop for `fraction` of every 10 ms, asleep for the rest, ended after `seconds` at most.
_HOG = """
import sys, time
fraction, end = float(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    started = time.monotonic()
    while time.monotonic() - started < 0.01 * fraction:
        pass
    time.sleep(0.01 * (1 - fraction))
"""


@contextlib.contextmanager
def cpu_hog(fraction: float, seconds: float) -> Iterator[None]:
    """A neighbour that keeps `fraction` of one core busy while the block runs (0: none)."""
    if fraction <= 0:
        yield
        return
    hog = subprocess.Popen([sys.executable, "-c", _HOG, str(fraction), str(seconds)])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


_WORKER_FULL = re.compile(
    r"^full\s+([\d,]+) entries/s\s+([\d.]+) CPU us/entry\s+\(redis\s+([\d.]+)\)"
)


def worker_bench(
    redis_url: str, entries: int, assets: int, workdir: Path, base: str = "", runs: int = 1
) -> WorkerBench:
    """bench/worker_bench.py `runs` times on the working tree's worker, each after a run of the
    same bench file on the worker of commit `base` ("": none), whose tree is taken from git into
    `workdir`; logs in `workdir`."""
    result = WorkerBench(entries, base)
    tree = None
    if base:
        try:
            tree = git_tree(base, workdir / f"worker-{base}")
        except (OSError, subprocess.CalledProcessError, tarfile.TarError) as exc:
            result.base_error = f"no tree of {base}: {exc}"
    for n in range(runs):
        if tree is not None:
            log = workdir / f"worker_bench-{base}-{n + 1}.log"
            result.base_runs.append(worker_run(redis_url, entries, assets, log, tree))
        log = workdir / f"worker_bench-{n + 1}.log"
        result.runs.append(worker_run(redis_url, entries, assets, log))
    return result


def git_tree(commit: str, into: Path) -> Path:
    """The files of `commit` (git archive) in the directory `into`."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT,
                             capture_output=True, check=True, timeout=120).stdout  # fmt: skip
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def worker_run(
    redis_url: str, entries: int, assets: int, log: Path, tree: Path | None = None
) -> WorkerRun:
    """bench/worker_bench.py as its own process, on the run's Redis: its `full` line (one worker,
    every detector, on a stream filled beforehand), with the project's modules of `tree` (None:
    the working tree). Its other modes and the state measurement run too (the smallest state
    sample it takes); whatever it prints goes to `log`."""
    argv = [sys.executable, str(BENCH / "worker_bench.py"), "--entries", str(entries),
            "--assets", str(assets), "--state-assets", "100", "--redis-url", redis_url]  # fmt: skip
    # The bench imports the project's modules before it adds its own tree to the path.
    env = {**os.environ, "PYTHONPATH": str(tree or ROOT)}
    result = WorkerRun()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300,
                              check=False, env=env)  # fmt: skip
    except subprocess.TimeoutExpired:
        result.error = "timed out after 300 s"
        return result
    log.write_text(done.stdout + done.stderr)
    found = next(filter(None, map(_WORKER_FULL.match, done.stdout.splitlines())), None)
    if done.returncode != 0 or found is None:
        result.error = f"exit code {done.returncode}, no `full` line (see {log.name})"
        return result
    result.rate = float(found.group(1).replace(",", ""))
    result.cpu_us, result.redis_cpu_us = float(found.group(2)), float(found.group(3))
    return result


# --- Redis with replicas: one master and its replica, or a cluster -------------------------------

# Every node of bench/cluster_bench.py as tests/cluster.py's LocalCluster starts a cluster's: an
# append-only file as a production node keeps it, with no rewrite of its own inside a measured
# window (the harness rewrites between subjects).
NODE_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec",
             "--auto-aof-rewrite-percentage", "0", "--repl-diskless-sync-delay", "0")  # fmt: skip


@dataclass
class RedisNodes:
    """The Redis servers of a run: one master and its replica, or a cluster's masters and
    replicas; `url` is what the bridges and workers are given."""

    url: str
    cluster: bool
    masters: list[Any] = field(default_factory=list)  # tests.services.Service
    replicas: list[Any] = field(default_factory=list)

    def pids(self) -> dict[str, list[int]]:
        return {
            "masters": [s.pid for s in self.masters],
            "replicas": [s.pid for s in self.replicas],
        }

    @staticmethod
    def info(service: Any, section: str) -> dict[str, Any]:
        """INFO `section` of one node; "cluster" is CLUSTER INFO (cluster_state and the rest)."""
        with redis.Redis(port=service.port, decode_responses=True, socket_timeout=5) as r:
            if section != "cluster":
                return dict(r.info(section))
            text = str(r.execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def reset(self, timeout_s: float = 60) -> None:
        """Empty every master (the replicas follow), then rewrite every append-only file, so each
        subject starts from the same small files and no rewrite falls inside its window."""
        for service in self.masters:
            with redis.Redis(port=service.port, socket_timeout=30) as r:
                r.flushall()
        every = self.masters + self.replicas
        wait_until(lambda: not any(self.info(s, "keyspace") for s in every), timeout_s,
                   "the replicas emptied")  # fmt: skip
        for service in every:
            with redis.Redis(port=service.port, socket_timeout=5) as r:
                r.bgrewriteaof()

        def rewritten(service: Any) -> bool:
            found = self.info(service, "persistence")
            return bool(found["aof_rewrite_in_progress"] == 0 == found["aof_rewrite_scheduled"])

        wait_until(lambda: all(map(rewritten, every)), timeout_s, "the AOF rewrites", poll_s=0.1)

    def stop(self) -> None:
        services.stop_processes([s.proc for s in self.masters + self.replicas if s.proc], 10)


def _node(workdir: Path, *extra: str) -> Any:
    port = free_port()
    service = services.redis_service(workdir / f"redis-{port}", port, *NODE_ARGS, *extra)
    if service is None:
        raise RuntimeError("the bench needs redis-server")
    return service.start()


def redis_pair(workdir: Path, timeout_s: float = 30) -> RedisNodes:
    """One Redis and one replica of it (`--replicaof`), the replica in sync."""
    nodes = RedisNodes("", cluster=False)
    try:
        master = _node(workdir)
        nodes.masters.append(master)
        nodes.replicas.append(_node(workdir, "--replicaof", "127.0.0.1", str(master.port)))
        wait_until(lambda: nodes.info(nodes.replicas[0], "replication")
                   .get("master_link_status") == "up", timeout_s, "the replica in sync")  # fmt: skip
    except BaseException:
        nodes.stop()
        raise
    nodes.url = f"redis://127.0.0.1:{master.port}/0"
    return nodes


def redis_cluster(workdir: Path, masters: int = 3, timeout_s: float = 60) -> RedisNodes:
    """A Redis Cluster of `masters` masters with one replica each: the tests' LocalCluster (its
    nodes' append-only files as NODE_ARGS has them), healthy and every replica in sync."""
    local = importlib.import_module("tests.cluster").LocalCluster(
        workdir, "--auto-aof-rewrite-percentage", "0"
    )
    local.start(masters=masters, replicas_per_master=1, timeout_s=timeout_s)
    roles = {node.port: node.role for node in local.nodes()}
    nodes = RedisNodes(local.url, cluster=True)
    for port, service in sorted(local.services.items()):
        (nodes.masters if roles[port] == "master" else nodes.replicas).append(service)
    return nodes
