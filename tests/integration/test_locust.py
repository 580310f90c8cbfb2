"""Locust (simulators/locustfile.py) against the real pipeline: mosquitto, a bridge process and
redis-server from the fixtures. Locust runs only as subprocesses (a master and workers), so
gevent's monkeypatching never reaches the test process.

1. A distributed headless run, 2,000 devices x 1 Hz for 20 s: the rate within 10% of the target,
   0 failures, an Aggregated row with requests, and the audit of every PUBACK: lost 0.
2. During a run, the master's `/stats/requests` reports 2 workers and a rising total.
3. The web UI during that run, in headless Chromium: the route's row is shown; a screenshot.
4. The step ramp shape adds users step by step and ends the run.
5. The spike shape jumps to its peak and back.
6. GatewayUser against `iotbridge gateway`, single and NDJSON bulk: 0 failures, the entries in
   Redis are the readings answered "stored", and the audit finds each once.
7. A stalled broker: at most its Receive Maximum of PUBACK timeouts, the rest skipped, exit 1.
8. Neither Locust nor gevent's patches reach the test process.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.services import free_port, http_get, missing, stop_processes, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "simulators" / "locustfile.py"
CHROMIUM = "/usr/bin/chromium"
DEVICES_PER_USER = 100
FLEET_USERS = 20  # 2,000 devices
RATE_HZ = 1.0
TARGET = FLEET_USERS * DEVICES_PER_USER * RATE_HZ


@dataclass
class Pipeline:
    config: Path
    mqtt_url: str
    redis_url: str
    prefix: str
    route: str
    workdir: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONUNBUFFERED": "1"}


def locust_binary() -> str:
    found = Path(sys.executable).with_name("locust")
    if not found.exists():
        pytest.fail("locust (a dev dependency) is not installed")
    return str(found)


@pytest.fixture(scope="module")
def pipeline(
    mqtt_broker: tuple[str, str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """A bridge process on the fixtures' broker and Redis, with this module's own topic root and
    key prefix, and a settings file the Locust processes read."""
    if mqtt_broker[1] != "5":
        missing("mosquitto")
    workdir = tmp_path_factory.mktemp("locust")
    prefix = "t" + uuid.uuid4().hex[:10]
    metrics_port = free_port()
    settings = {
        "mqtt": {"url": mqtt_broker[0], "protocol": "5", "client_id": f"{prefix}-bridge"},
        "redis": {"url": redis_url, "key_prefix": prefix},
        "bridge": {
            "routes": [{"name": "telemetry", "topic": f"{prefix}/plant/{{site}}/{{line}}/{{asset}}/telemetry"}],
            "metrics_port": metrics_port,
            "shutdown_grace_s": 5,
        },
        "simulator": {"client_id_prefix": f"{prefix}-load"},
    }  # fmt: skip
    config = workdir / "settings.yaml"
    config.write_text(yaml.safe_dump(settings))
    log = (workdir / "bridge.log").open("wb")
    bridge = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "bridge", "--config", str(config)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_until(lambda: bridge.poll() is not None or http_get(metrics_port, "/readyz")[0] == 200,
                   30, "the bridge to be ready")  # fmt: skip
        assert bridge.poll() is None, (workdir / "bridge.log").read_text()
        yield Pipeline(config, mqtt_broker[0], redis_url, prefix, "telemetry", workdir)
    finally:
        bridge.send_signal(signal.SIGTERM)
        try:
            bridge.wait(20)
        except subprocess.TimeoutExpired:
            bridge.kill()
            bridge.wait()
        log.close()


class LocustRun:
    """A master and its workers, as subprocesses with their logs in `workdir`."""

    def __init__(self, pipeline: Pipeline, workdir: Path, master_args: list[str], workers: int):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.master_port = free_port()
        common = ["-f", str(LOCUSTFILE), "--iotbridge-config", str(pipeline.config)]
        self.argv_master = [locust_binary(), *common, "--master", "--master-bind-host", "127.0.0.1",
                            "--master-bind-port", str(self.master_port), "--expect-workers",
                            str(workers), "--host", pipeline.mqtt_url, *master_args]  # fmt: skip
        self.argv_worker = [locust_binary(), *common, "--worker", "--master-host", "127.0.0.1",
                            "--master-port", str(self.master_port)]  # fmt: skip
        self.workers = workers
        self.env = pipeline.env()
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stack = ExitStack()

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self._stack.enter_context((self.workdir / f"{name}.log").open("wb"))
        proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def start(self) -> LocustRun:
        self.master = self._start("master", self.argv_master)
        for index in range(self.workers):
            self._start(f"worker{index}", self.argv_worker)
        return self

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:])
            for p in sorted(self.workdir.glob("*.log"))
        )

    def wait(self, timeout_s: float) -> int:
        """Wait for every process to end; the master's exit code."""
        for proc in self.procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"locust did not end in {timeout_s} s\n{self.logs()}"
                ) from None
        return self.master.returncode

    def stop(self) -> None:
        stop_processes(self.procs, 15)
        self._stack.close()


def stats_rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as rows:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(rows)}


def audit(pipeline: Pipeline, files: list[Path]) -> tuple[int, dict[str, Any]]:
    return audit_files(pipeline.config, files)


def audit_files(config: Path, files: list[Path]) -> tuple[int, dict[str, Any]]:
    args = [a for f in files for a in ("--acked", str(f))]
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "audit", *args, "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def stream_length(pipeline: Pipeline) -> int:
    import redis

    client = redis.Redis.from_url(pipeline.redis_url)
    try:
        return int(client.xlen(f"{pipeline.prefix}:tel:{pipeline.route}"))
    finally:
        client.close()


def test_1_distributed_headless_run_keeps_the_rate_and_loses_nothing(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """A master and 2 workers, headless, 2,000 devices x 1 Hz for 20 s, CSV and HTML reports."""
    acked = tmp_path / "acked.jsonl"
    run = LocustRun(pipeline, tmp_path, [
        "--headless", "-u", str(FLEET_USERS + 1), "-r", "100", "-t", "20s",
        "--csv", str(tmp_path / "run"), "--html", str(tmp_path / "report.html"),
        "--devices-per-user", str(DEVICES_PER_USER), "--device-rate", str(RATE_HZ), "--qos", "1",
        "--acked", str(acked), "--stop-timeout", "10",
        "MqttFleetUser", "TelemetryProbeUser",
    ], workers=2)  # fmt: skip
    try:
        code = run.start().wait(90)
    finally:
        run.stop()
    logs = run.logs()
    assert code == 0, logs

    rows = stats_rows(tmp_path / "run_stats.csv")
    mqtt, total = rows[("MQTT QoS 1", pipeline.route)], rows[("", "Aggregated")]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, (rows, logs)
    achieved = float(mqtt["Requests/s"])
    assert achieved == pytest.approx(TARGET, rel=0.10), (achieved, TARGET)
    # The probe saw the messages stored, and none missing.
    assert int(rows[("E2E", f"{pipeline.route} stored")]["Request Count"]) > 0
    assert ("E2E", f"{pipeline.route} missing") not in rows
    assert (tmp_path / "report.html").stat().st_size > 0
    assert "MQTT QoS 1" in (tmp_path / "report.html").read_text(errors="replace")

    # Each worker wrote what its PUBACKs acknowledged; the audit reads both against Redis.
    files = sorted(tmp_path.glob("acked.jsonl.w*"))
    assert [f.name for f in files] == ["acked.jsonl.w0", "acked.jsonl.w1"]
    headers = [json.loads(f.read_text().splitlines()[0]) for f in files]
    assert sum(h["assets"] for h in headers) == FLEET_USERS * DEVICES_PER_USER
    acked_count = int(mqtt["Request Count"])
    wait_until(
        lambda: stream_length(pipeline) >= acked_count, 30, "the bridge to store every message"
    )
    code, report = audit(pipeline, files)
    assert code == 0, report
    assert (report["lost"], report["duplicated"], report["unexpected"]) == (0, 0, 0), report
    assert report["acked"] == report["found"] == acked_count


@pytest.fixture(scope="module")
def ui_run(
    pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocustRun, int]]:
    """A master with its web UI on a free loopback port and 2 workers, started from the command
    line (--autostart) for at most 60 s."""
    workdir = tmp_path_factory.mktemp("locust-ui")
    web_port = free_port()
    run = LocustRun(pipeline, workdir, [
        "--web-host", "127.0.0.1", "--web-port", str(web_port), "--autostart", "--autoquit", "0",
        "-u", "5", "-r", "5", "-t", "60s", "--devices-per-user", "50", "--first-device", "500000",
        "MqttFleetUser", "TelemetryProbeUser",
    ], workers=2)  # fmt: skip
    run.start()
    try:
        wait_until(lambda: run.master.poll() is not None or http_get(web_port, "/")[0] == 200,
                   30, "the web UI")  # fmt: skip
        assert run.master.poll() is None, run.logs()
        yield run, web_port
    finally:
        run.stop()


def requests_stats(port: int) -> dict[str, Any]:
    status, body = http_get(port, "/stats/requests")
    assert status == 200, body
    return dict(json.loads(body))


def test_2_stats_report_two_workers_and_a_rising_total(ui_run: tuple[LocustRun, int]) -> None:
    _run, port = ui_run
    seen: list[int] = []

    def total() -> int:
        stats = requests_stats(port)
        return next(int(s["num_requests"]) for s in stats["stats"] if s["name"] == "Aggregated")

    wait_until(lambda: total() > 0, 30, "the first requests", poll_s=0.2)
    stats = requests_stats(port)
    assert stats["worker_count"] == 2, stats
    assert {w["state"] for w in stats["workers"]} <= {"running", "spawning"}, stats["workers"]
    seen.append(total())
    wait_until(lambda: total() > seen[0], 10, "the total to rise", poll_s=0.2)
    seen.append(total())
    assert seen[1] > seen[0]
    assert stats["total_fail_per_sec"] == 0, stats


def test_3_web_ui_renders_in_headless_chromium(
    ui_run: tuple[LocustRun, int], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        missing("chromium")
    from playwright.sync_api import sync_playwright

    _, port = ui_run
    screenshot = tmp_path / "locust-ui.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            row = page.get_by_role("row").filter(has_text="MQTT QoS 1")
            row.first.wait_for(timeout=30_000)
            assert "telemetry" in row.first.inner_text()
            page.screenshot(path=str(screenshot))
            # The load's options are the web UI's custom parameters (its start and edit forms).
            options = page.evaluate("window.templateArgs.extra_options")
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
    assert {"devices_per_user", "device_rate", "qos", "puback_timeout"} <= set(options), options
    assert options["devices_per_user"]["default_value"] == 50  # as the command line set it
    if target := os.environ.get("IOTBRIDGE_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(target) / screenshot.name)


def user_counts(history: Path) -> list[int]:
    with history.open(newline="") as rows:
        return [
            int(row["User Count"]) for row in csv.DictReader(rows) if row["Name"] == "Aggregated"
        ]


def run_shape(pipeline: Pipeline, workdir: Path, shape: str, *options: str) -> list[int]:
    """A local (single process) headless run of a load shape; the user count each second."""
    workdir.mkdir()
    argv = [locust_binary(), "-f", f"{LOCUSTFILE},{REPO / 'simulators' / 'shapes' / shape}",
            "--iotbridge-config", str(pipeline.config), "--host", pipeline.mqtt_url, "--headless",
            "--csv", str(workdir / "run"), "--devices-per-user", "10", *options, "MqttFleetUser"]  # fmt: skip
    with (workdir / "locust.log").open("wb") as log:
        done = subprocess.run(argv, cwd=REPO, env=pipeline.env(), stdout=log,
                              stderr=subprocess.STDOUT, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, (workdir / "locust.log").read_text()
    rows = stats_rows(workdir / "run_stats.csv")
    assert int(rows[("", "Aggregated")]["Failure Count"]) == 0, rows
    return user_counts(workdir / "run_stats_history.csv")


def test_4_step_ramp_adds_users_step_by_step_then_stops(pipeline: Pipeline, tmp_path: Path) -> None:
    counts = run_shape(pipeline, tmp_path / "ramp", "step_ramp.py",
                       "--ramp-step-users", "2", "--ramp-step-s", "2", "--ramp-steps", "3")  # fmt: skip
    assert counts == sorted(counts), counts
    assert {2, 4, 6} <= set(counts), counts
    assert max(counts) == 6


def test_5_spike_jumps_to_its_peak_and_back(pipeline: Pipeline, tmp_path: Path) -> None:
    counts = run_shape(pipeline, tmp_path / "spike", "spike.py",
                       "--spike-base-users", "1", "--spike-peak-users", "5", "--spike-at-s", "2",
                       "--spike-s", "3", "--spike-total-s", "8")  # fmt: skip
    peak = counts.index(5)
    assert 1 in counts[:peak], counts
    assert 1 in counts[peak:], counts
    assert max(counts) == 5


def test_6_gateway_user_stores_what_the_gateway_answers_stored(
    redis_url: str, tmp_path: Path
) -> None:
    """GatewayUser against `iotbridge gateway`: one reading a POST, then NDJSON bulk of 10: 0
    failures, and the entries in Redis are the readings answered "stored", each once."""
    import redis

    from tests.gateway_process import GatewayProcess

    # A user is one HTTP connection posting one request at a time: 10 devices at 1 Hz leave room
    # for answers of up to 100 ms.
    prefix = "t" + uuid.uuid4().hex[:10]
    gateway = GatewayProcess(tmp_path / "gateway", redis_url=redis_url, name=prefix).start()
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"redis": {"url": redis_url, "key_prefix": prefix}}))
    env = {**os.environ, "IOTBRIDGE_LOAD_GATEWAY_TOKEN": gateway.token("*")}
    stored = 0
    try:
        # Each run's devices start at seq 0: the second run has devices of its own.
        for name, bulk, seconds, first in (
            ("single", "0", "6s", "0"),
            ("bulk", "10", "8s", "1000"),
        ):
            workdir = tmp_path / name
            workdir.mkdir()
            argv = [locust_binary(), "-f", str(LOCUSTFILE), "--iotbridge-config", str(config),
                    "--headless", "-u", "2", "-r", "2", "-t", seconds, "--csv", str(workdir / "run"),
                    "--gateway-url", gateway.url, "--gateway-bulk", bulk, "--devices-per-user",
                    "10", "--device-rate", "1", "--acked", str(workdir / "acked.jsonl"),
                    "--stop-timeout", "10", "--json-file", str(workdir / "stats"), "--first-device", first,
                    "GatewayUser"]  # fmt: skip
            with (workdir / "locust.log").open("wb") as log:
                done = subprocess.run(argv, cwd=REPO, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=60, check=False)  # fmt: skip
            output = (workdir / "locust.log").read_text(errors="replace")
            assert done.returncode == 0, output
            # The JSON file is written once every user has stopped (the CSV's last write may
            # come before the requests of users finishing their task).
            rows = {(r["method"], r["name"]): r
                    for r in json.loads((workdir / "stats.json").read_text())}  # fmt: skip
            row = rows[("POST", "telemetry" if bulk == "0" else "telemetry bulk")]
            assert row["num_requests"] > 0, rows
            assert sum(r["num_failures"] for r in rows.values()) == 0, (rows, output)
            header = json.loads((workdir / "acked.jsonl").read_text().splitlines()[0])
            assert header["gateway_duplicate"] == 0
            if bulk == "0":
                assert header["gateway_stored"] == row["num_requests"], header
            else:  # 10 readings a request, and each device's last few when its user stops
                assert row["num_requests"] < header["gateway_stored"] <= 10 * row["num_requests"]
            stored += header["gateway_stored"]
        client = redis.Redis.from_url(redis_url)
        try:
            assert client.xlen(f"{prefix}:tel:telemetry") == stored
        finally:
            client.close()
        code, report = audit_files(
            config, [tmp_path / n / "acked.jsonl" for n in ("single", "bulk")]
        )
        assert code == 0, report
        assert (report["lost"], report["duplicated"], report["unexpected"]) == (0, 0, 0), report
        assert report["acked"] == report["found"] == stored
    finally:
        gateway.stop()


def test_7_a_stalled_broker_gives_bounded_puback_timeouts_then_skips(tmp_path: Path) -> None:
    """The broker stops (SIGSTOP) for 3 s under 50 devices at 10 Hz on one connection: at most
    its Receive Maximum (20) publishes wait, each failing after --puback-timeout as unconfirmed in
    the acked file; what falls due meanwhile is skipped behind schedule, never queued; the run
    says so (exit 1), and publishing resumes once the broker does."""
    from tests.services import mosquitto_service

    broker = mosquitto_service(tmp_path / "mosquitto", extra_conf="max_inflight_messages 20\n")
    if broker is None:
        missing("mosquitto")
    broker.start()
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({"simulator": {"client_id_prefix": "stall"}}))
    argv = [locust_binary(), "-f", str(LOCUSTFILE), "--iotbridge-config", str(config),
            "--host", f"mqtt://127.0.0.1:{broker.port}", "--headless", "-u", "1", "-r", "1",
            "-t", "12s", "--csv", str(tmp_path / "run"), "--devices-per-user", "50",
            "--device-rate", "10", "--puback-timeout", "1", "--acked", str(tmp_path / "acked"),
            "--stop-timeout", "5", "--json-file", str(tmp_path / "stats"), "MqttFleetUser"]  # fmt: skip
    log = (tmp_path / "locust.log").open("wb")
    proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def csv_rows(name: str) -> list[dict[str, str]]:
        path = tmp_path / f"run_{name}.csv"
        if not path.exists():
            return []
        with path.open(newline="") as rows:
            return list(csv.DictReader(rows))

    def requests() -> int:
        rows = [r for r in csv_rows("stats") if r["Name"] == "telemetry"]
        return int(rows[0]["Request Count"]) if rows else 0

    def failures(kind: str) -> int:
        return sum(int(r["Occurrences"]) for r in csv_rows("failures") if kind in r["Error"])

    try:
        wait_until(lambda: requests() > 500, 20, "the first PUBACKs", poll_s=0.2)
        broker.signal(signal.SIGSTOP)
        wait_until(lambda: failures("BehindSchedule") > 0, 20, "skips behind schedule", poll_s=0.2)
        before = requests()
        broker.signal(signal.SIGCONT)
        wait_until(lambda: requests() > before + 500, 20, "publishing to resume", poll_s=0.2)
        assert proc.wait(60) == 1  # failures: Locust's exit code says so
    finally:
        broker.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        broker.stop()

    stats = json.loads((tmp_path / "stats.json").read_text())
    row = next(r for r in stats if r["name"] == "telemetry")
    # Given up publishes keep their slot of the window until the connection ends: never more
    # than the broker's Receive Maximum at a time (before, 60 in a 3 s stall).
    timeouts = failures("PubackTimeout")
    assert 0 < timeouts <= 20, timeouts
    assert failures("BehindSchedule") > 0
    records = [json.loads(line) for line in (tmp_path / "acked").read_text().splitlines()[1:]]
    unconfirmed = sum(
        last - first + 1 for r in records for _, first, last in r.get("unconfirmed", [])
    )
    assert unconfirmed == timeouts
    acked = sum(last - first + 1 for r in records for _, first, last in r["acked"])
    assert acked == row["num_requests"] - row["num_failures"]


def test_8_locust_and_gevent_stay_out_of_the_test_process() -> None:
    """Locust patches the standard library with gevent when imported; it runs only in the
    subprocesses above, so this process (and every test after it) keeps the real socket."""
    import socket
    import threading

    assert "locust" not in sys.modules
    assert socket.socket.__module__ == "socket"
    assert threading.Thread.__module__ == "threading"
