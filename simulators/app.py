"""The fleet simulator: virtual assets publishing telemetry over a pool of MQTT connections.

`run()` splits the fleet over `simulator.processes` engines (a thread here for one, child
processes for more), each on whole connections; waits until every engine has opened its
connections at the ramp rate; starts them all at one wall time; follows their progress (the
metrics, the live display, the ground-truth file); and, once every engine has drained its acks and
disconnected, writes the acknowledged set (`--acked`) and builds the report. The asyncio loop only
coordinates, so /metrics and /readyz stay responsive under load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import resource
import shutil
import time
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry

from config.errors import ConfigError, ConfigProblem
from config.settings import Settings
from observability.metrics import SimulatorMetrics
from simulators import acked as acked_file
from simulators.engine import ShardSpec
from simulators.fleet import messages_per_asset
from simulators.progress import Progress
from simulators.runner import ProcessRunner, Runner, ThreadRunner
from simulators.scenario import Event, Scenario, plan
from simulators.stats import Totals, quantiles

log = logging.getLogger(__name__)

# File descriptors a process keeps for itself beside its connections (logs, pipes, selector).
FD_RESERVE = 64
START_DELAY_S = 0.1  # engines start together this long after the last one is ready


def shard_specs(assets: int, per_connection: int, processes: int, rate: float) -> list[ShardSpec]:
    """Split the fleet into `processes` contiguous shares of whole connections."""
    connections = math.ceil(assets / per_connection)
    processes = min(processes, connections)
    specs, first_conn = [], 0
    for shard in range(processes):
        conns = connections // processes + (1 if shard < connections % processes else 0)
        first = first_conn * per_connection
        count = min(assets, (first_conn + conns) * per_connection) - first
        specs.append(ShardSpec(shard, first, count, rate / processes))
        first_conn += conns
    return specs


def raise_fd_limit(needed: int) -> None:
    """Raise the soft descriptor limit to what `needed` connections take, or refuse to start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + FD_RESERVE
    if want <= soft:
        return
    if hard != resource.RLIM_INFINITY and want > hard:
        raise ConfigError([ConfigProblem(
            "simulator.assets_per_connection",
            f"{needed} connections per process need {want} file descriptors, the limit is {hard}:"
            " put more assets on a connection, or use more --processes",
        )])  # fmt: skip
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class SimulatorApp:
    """Drives the fleet; see `report()` for what a run achieved."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        *,
        scenario: Scenario | None = None,
        ground_truth: Path | None = None,
        acked: Path | None = None,
        progress: bool = False,
    ) -> None:
        """`settings` with the scenario already applied (`Scenario.apply`), so options given on
        the command line win over the scenario's; the scenario gives the plan of injections."""
        sim = settings.simulator
        self._settings = settings
        self._scenario = scenario
        self._events: list[Event] = plan(scenario, sim) if scenario is not None else []
        self._specs = shard_specs(
            sim.assets, sim.assets_per_connection, sim.processes, sim.connect_rate_per_s
        )
        if acked is not None:  # each engine writes its share; run() joins them
            self._specs = [dataclasses.replace(s, acked_part=f"{acked}.part{s.shard}")
                           for s in self._specs]  # fmt: skip
        raise_fd_limit(max(-(-s.count // sim.assets_per_connection) for s in self._specs))
        self._truth_path, self._acked_path = ground_truth, acked
        self._show_progress = progress
        self._metrics = SimulatorMetrics(registry)
        self._metrics.assets = sim.assets
        self._metrics.processes = len(self._specs)
        self.target_rate = sim.assets * sim.rate_hz
        self._metrics.target_rate = self.target_rate
        self._connections = math.ceil(sim.assets / sim.assets_per_connection)
        self.totals = Totals()
        self._connected: dict[int, int] = {}
        self._ready: set[int] = set()
        self._finals: dict[int, dict[str, Any]] = {}
        self._truth: IO[str] | None = None
        self._changed = asyncio.Event()
        self._started = False
        self._finished = False
        self._started_at = 0.0
        self._elapsed_s = 0.0

    @property
    def events(self) -> list[Event]:
        return self._events

    def readiness(self) -> tuple[bool, str]:
        if self._finished:
            return False, "finished"
        up = sum(self._connected.values())
        status = f"{up}/{self._connections} mqtt connections up"
        return self._started and up == self._connections, status

    async def run(self, stop: asyncio.Event) -> None:
        """Publish the schedule, or until `stop` is set; then drain acks and disconnect."""
        sim = self._settings.simulator
        if self._truth_path is not None:
            self._truth = self._truth_path.open("w", encoding="utf-8")
        kind = ThreadRunner if len(self._specs) == 1 else ProcessRunner
        runners: list[Runner] = []
        progress = Progress(self, enabled=self._show_progress)
        try:
            for spec in self._specs:
                events = [
                    e for e in self._events if spec.first <= e.index < spec.first + spec.count
                ]
                runners.append(kind(self._settings, spec, events, self._deliver))
            for runner in runners:
                await runner.launch()
            log.info("simulator starting", extra={"assets": sim.assets, "processes": len(runners),
                                                   "connections": self._connections})  # fmt: skip
            async with progress:
                await self._run(runners, stop, progress)
        finally:
            for runner in runners:
                runner.stop()
            # Also when cancelled: no engine thread or child process may outlive run().
            await asyncio.shield(asyncio.gather(*(runner.wait() for runner in runners)))
            self._finish()

    async def _run(self, runners: list[Runner], stop: asyncio.Event, progress: Progress) -> None:
        """Start the engines together once all are ready; return when every one has ended."""
        waits = [asyncio.create_task(r.wait(), name=f"simulator-wait-{i}")
                 for i, r in enumerate(runners)]  # fmt: skip
        stopping: asyncio.Task[Any] | None = asyncio.create_task(stop.wait(), name="stop")
        try:
            while not all(w.done() for w in waits):
                if stopping is not None and stopping.done():
                    stopping = None
                    for runner in runners:
                        runner.stop()
                ended = sum(w.done() for w in waits)
                if (
                    not self._started
                    and len(self._ready) + ended >= len(runners)
                    and not (stop.is_set())
                ):
                    self._start(runners)
                changed = asyncio.create_task(self._changed.wait())
                watched = [changed, *(w for w in waits if not w.done())]
                if stopping is not None:
                    watched.append(stopping)
                await asyncio.wait(watched, timeout=0.25, return_when="FIRST_COMPLETED")
                changed.cancel()
                self._changed.clear()
                progress.refresh()
        finally:
            for task in [*waits, *([stopping] if stopping is not None else [])]:
                task.cancel()
            await asyncio.wait([*waits, *([stopping] if stopping is not None else [])])

    def _start(self, runners: list[Runner]) -> None:
        at = time.time() + START_DELAY_S
        for runner in runners:
            runner.start(at)
        self._started, self._started_at = True, time.monotonic()
        log.info("simulator connected", extra={
            "connections_up": sum(self._connected.values()), "connections": self._connections,
        })  # fmt: skip

    def _deliver(self, shard: int, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "truth":
            if self._truth is not None:
                self._truth.write(_json_line(message["record"]))
                self._truth.flush()
            return
        if kind == "ready":
            self._ready.add(shard)
            self._connected[shard] = int(message["connected"])
        elif kind in ("progress", "final"):
            self._connected[shard] = int(message["connected"])
            if kind == "final":
                self._finals[shard] = message
                self._ready.add(shard)
            self.totals.update(shard, message)
            self._update_metrics()
        self._changed.set()

    def _update_metrics(self) -> None:
        m, totals = self._metrics, self.totals
        m.sent, m.acked = totals.total("sent"), totals.total("acked")
        m.failed, m.faults = totals.kinds("failed_by_kind"), totals.kinds("faults")
        m.anomalies = totals.kinds("anomalies")
        m.connections = sum(self._connected.values())
        m.outstanding = totals.outstanding
        m.latency_buckets, m.latency_sum = totals.buckets()

    def _finish(self) -> None:
        self._finished = True
        self._elapsed_s = max((float(f.get("elapsed_s", 0.0)) for f in self._finals.values()),
                              default=0.0)  # fmt: skip
        if self._truth is not None:
            self._truth.close()
        if self._acked_path is not None:
            self._write_acked(self._acked_path)
        counts = self.report()
        log.info("simulator finished",
                 extra={k: counts[k] for k in ("sent", "acked", "failed", "skipped")})  # fmt: skip

    def _write_acked(self, path: Path) -> None:
        sim, route = self._settings.simulator, self._settings.bridge.routes[0]
        header = {"route": route.name, "topic": route.topic, "asset_level": route.asset_level,
                  "assets": sim.assets, "qos": sim.qos, "seed": sim.seed,
                  "prefix": self._settings.redis.key_prefix}  # fmt: skip
        with path.open("w", encoding="utf-8") as out:
            acked_file.write_header(out, header)
            for spec in self._specs:
                part = Path(spec.acked_part or "")
                if part.is_file():
                    with part.open(encoding="utf-8") as lines:
                        shutil.copyfileobj(lines, out)
                    part.unlink()

    def report(self) -> dict[str, Any]:
        """What the run asked for and what it achieved; JSON-able."""
        sim, totals = self._settings.simulator, self.totals
        per_asset = messages_per_asset(sim.duration_s, sim.rate_hz)
        sent = totals.total("sent")
        in_schedule = sum(int(f.get("sent_in_schedule", 0)) for f in self._finals.values())
        elapsed = self._elapsed_s or (time.monotonic() - self._started_at if self._started else 0.0)
        latencies = [x for f in self._finals.values() for x in f.get("latencies", ())]
        faults = totals.kinds("faults")
        skipped = totals.kinds("skipped")
        failed_by_kind = totals.kinds("failed_by_kind")
        return {
            "scenario": self._scenario.name if self._scenario is not None else None,
            "assets": sim.assets,
            "processes": len(self._specs),
            "connections": self._connections,
            "qos": sim.qos,
            "seed": sim.seed,
            "rate_hz": sim.rate_hz,
            "target_rate": self.target_rate,
            "duration_s": sim.duration_s,
            "elapsed_s": round(elapsed, 3),
            # sent - extras_sent + skipped == scheduled: every scheduled message was handed to
            # a connection or skipped, for the reason given.
            "scheduled": sim.assets * per_asset,
            "skipped": sum(skipped.values()),
            "skipped_by_reason": skipped,
            "unsent": sum(skipped.values()),
            "silenced": skipped.get("silenced", 0),
            "sent": sent,
            "extras_sent": totals.total("extras_sent"),
            "acked": totals.total("acked"),
            # Sent, and given up without a PUBACK: in the --acked file as unconfirmed.
            "unconfirmed": failed_by_kind.get("unacked", 0) if sim.qos == 1 else 0,
            "failed": totals.failed,
            "failed_by_kind": failed_by_kind,
            "faults": faults,
            "faults_total": sum(faults.values()),
            "anomalies": totals.kinds("anomalies"),
            "anomalies_injected": sum(totals.kinds("anomalies").values()),
            # Handed over while the schedule ran: a QoS 1 backlog drained afterwards is not
            # rate achieved.
            "achieved_rate_msgs_per_s": round((in_schedule or sent) / elapsed, 1)
            if elapsed > 0
            else 0.0,
            "publish_ack_latency_s": quantiles(latencies) if sim.qos == 1 else quantiles(()),
        }


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"
