"""HTTP gateway benchmark: `iotbridge gateway` against a naive FastAPI ingestor that awaits one
XADD per request (bench/naive_gateway.py), same Redis, same load generator (Debian's `wrk` with a
Lua script), in one run.

    .venv/bin/python bench/gateway_bench.py                 # writes its section of bench/RESULTS.md
    .venv/bin/python bench/gateway_bench.py --duration 5 --rounds 1 --results skip

Per round, each subject a process of its own, `wrk -t1 -c64`:
1. Max rate: single JSON POSTs as fast as 64 connections go: requests/s, latency percentiles,
   CPU microseconds per request of the subject and of Redis (utime + stime from /proc).
2. Half rate: the gateway at half its max rate (wrk's per-connection `delay()`, 64 connections):
   p50/p99 latency. wrk measures from each request's send, so a stalled server's queueing before
   the send is not seen (coordinated omission): these are the latencies of answered requests.
3. Bulk: NDJSON of 100 readings a request against the gateway: readings/s.
Every 200 is checked against the stream afterwards (entries added == readings answered stored).
Only loopback addresses; every run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ import as packages

services = importlib.import_module("tests.services")
cpu_seconds = importlib.import_module("tests.faults").cpu_s

CONNECTIONS = 64
ASSETS = 200  # per run: readings spread over this many assets
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- gateway-bench: begin -->", "<!-- gateway-bench: end -->"

_LUA = r"""
local counter = 0
local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end
function init(args)
  prefix, assets, lines = args[1], tonumber(args[2]), tonumber(args[3])
  ok, other = 0, 0
  wrk.method = "POST"
  wrk.headers["Content-Type"] = lines > 1 and "application/x-ndjson" or "application/json"
  if args[4] ~= "" then wrk.headers["Authorization"] = "Bearer " .. args[4] end
end
function request()
  counter = counter + 1
  local asset = prefix .. tid .. "-" .. (counter % assets)
  local first = math.floor(counter / assets) * lines
  local ts = os.time()
  local body = {}
  for i = 0, lines - 1 do
    body[#body + 1] = string.format(
      '{"ts": %d, "seq": %d, "values": {"temperature": %d.5, "vibration": 0.25}}',
      ts, first + i, (first + i) % 40 + 50)
  end
  return wrk.format(nil, "/api/v1/topics/plant/s1/l1/" .. asset .. "/telemetry", nil,
                    table.concat(body, "\n"))
end
function response(status, headers, body)
  if status == 200 then ok = ok + 1 else other = other + 1 end
end
%DELAY%
function done(summary, latency, requests)
  local good, bad = 0, 0
  for _, t in ipairs(threads) do
    good = good + t:get("ok")
    bad = bad + t:get("other")
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "duration_us": %d, "ok": %d, "other": %d, "socket_errors": %d, ' ..
    '"p50_us": %d, "p90_us": %d, "p99_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, good, bad, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


@dataclass
class Run:
    subject: str
    phase: str  # max, half, bulk
    rps: float
    readings_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    ok: int
    other: int
    socket_errors: int
    cpu_us_subject: float  # per request
    cpu_us_redis: float
    stored: int  # entries added to the stream
    batch_mean: float  # messages per group-commit write (gateway only; 0: naive)


class Subject:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path):
        self.name, self.argv, self.env, self.port, self.log = name, argv, env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env={**os.environ, **self.env}, cwd=ROOT,
                                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        path = "/readyz" if self.name == "gateway" else "/docs"
        services.wait_until(lambda: services.http_get(self.port, path)[0] == 200, 30,
                            f"{self.name} ready")  # fmt: skip

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wrk(port: int, script: Path, duration_s: float, args: list[str]) -> dict[str, Any]:
    argv = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration_s:g}s", "--timeout", "10s",
            "-s", str(script), f"http://127.0.0.1:{port}", "--", *args]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60,
                         check=True).stdout  # fmt: skip
    match = re.search(r"^RESULT (\{.*\})$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    return dict(json.loads(match.group(1)))


def script(workdir: Path, delay_ms: float | None) -> Path:
    delay = "" if delay_ms is None else f"function delay() return {delay_ms:.3f} end"
    path = workdir / f"load-{'paced' if delay_ms else 'max'}.lua"
    path.write_text(_LUA.replace("%DELAY%", delay))
    return path


def batch_totals(subject: Subject) -> tuple[float, float]:
    """(writes, messages written) so far by the gateway's group commit; (0, 0) for the naive one."""
    if subject.name != "gateway":
        return 0.0, 0.0
    text = services.http_get(subject.port, "/metrics")[1]
    found = dict(re.findall(r"^iotbridge_gateway_batch_size_(count|sum) (\S+)$", text, re.M))
    return float(found.get("count", 0)), float(found.get("sum", 0))


def length(r: redis.Redis, stream: str) -> int:
    return int(r.xlen(stream)) if r.exists(stream) else 0


def measure(subject: Subject, redis_pid: int, r: redis.Redis, stream: str, phase: str,
            duration_s: float, workdir: Path, token: str, lines: int = 1,
            delay_ms: float | None = None) -> Run:  # fmt: skip
    prefix = f"{subject.name[0]}{uuid.uuid4().hex[:6]}-"
    before = length(r, stream)
    batches = batch_totals(subject)
    cpu = (cpu_seconds(subject.pid), cpu_seconds(redis_pid))
    res = wrk(subject.port, script(workdir, delay_ms), duration_s,
              [prefix, str(ASSETS), str(lines), token])  # fmt: skip
    used = (cpu_seconds(subject.pid) - cpu[0], cpu_seconds(redis_pid) - cpu[1])
    stored = length(r, stream) - before
    count, total = (after - was for after, was in zip(batch_totals(subject), batches, strict=True))
    seconds = res["duration_us"] / 1e6
    n = max(1, res["requests"])
    # wrk stops with requests still unanswered (one per connection, and those its delay() had
    # queued): the server may have stored those too. Nothing answered 200 may be missing.
    if not res["ok"] * lines <= stored <= (res["ok"] + 2 * CONNECTIONS) * lines:
        raise RuntimeError(f"{subject.name} {phase}: {res['ok']} requests answered 200 with "
                           f"{lines} reading(s) each, but {stored} entries were added")  # fmt: skip
    return Run(subject.name, phase, res["requests"] / seconds, res["ok"] * lines / seconds,
               res["p50_us"] / 1000, res["p90_us"] / 1000, res["p99_us"] / 1000, res["ok"],
               res["other"], res["socket_errors"], used[0] / n * 1e6, used[1] / n * 1e6,
               stored, total / count if count else 0.0)  # fmt: skip


def run_round(workdir: Path, redis_port: int, redis_pid: int, duration_s: float) -> list[Run]:
    r = redis.Redis(port=redis_port)
    name = "gb" + uuid.uuid4().hex[:6]
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    gw_port, naive_port = services.free_port(), services.free_port()
    env = {"IOTBRIDGE_REDIS__URL": redis_url, "IOTBRIDGE_REDIS__KEY_PREFIX": name,
           "IOTBRIDGE_GATEWAY__PORT": str(gw_port), "IOTBRIDGE_LOGGING__LEVEL": "WARNING"}  # fmt: skip
    token = subprocess.run([sys.executable, "-m", "bridge.cli", "token", "create", "--asset", "*"],
                           env={**os.environ, **env}, capture_output=True, text=True, check=True,
                           cwd=ROOT).stdout.strip()  # fmt: skip
    gateway = Subject("gateway", [sys.executable, "-m", "bridge.cli", "gateway"], env, gw_port,
                      workdir / "gateway.log")  # fmt: skip
    naive_stream = f"{name}:naive"
    naive = Subject("naive", [sys.executable, str(ROOT / "bench" / "naive_gateway.py"), "--port",
                              str(naive_port), "--redis", redis_url, "--stream", naive_stream],
                    {}, naive_port, workdir / "naive.log")  # fmt: skip
    stream = f"{name}:tel:telemetry"
    runs = []
    for subject, key, auth in ((naive, naive_stream, ""), (gateway, stream, token)):
        subject.start()
        try:
            top = measure(subject, redis_pid, r, key, "max", duration_s, workdir, auth)
            runs.append(top)
            # Half the subject's own max rate, over the same 64 connections.
            delay_ms = CONNECTIONS / (top.rps / 2) * 1000
            runs.append(measure(subject, redis_pid, r, key, "half", duration_s, workdir, auth,
                                delay_ms=delay_ms))  # fmt: skip
            if subject is gateway:
                runs.append(measure(subject, redis_pid, r, key, "bulk100", duration_s, workdir,
                                    auth, lines=100))  # fmt: skip
        finally:
            subject.stop()
    r.close()
    return runs


def render(rounds: list[list[Run]], started: str, version: str, duration_s: float) -> str:
    def med(subject: str, phase: str, field: str) -> float:
        return statistics.median(float(getattr(run, field)) for rnd in rounds for run in rnd
                                 if run.subject == subject and run.phase == phase)  # fmt: skip

    rows = []
    for rnd_no, rnd in enumerate(rounds, 1):
        for run in rnd:
            rows.append(f"| {rnd_no} | {run.subject} | {run.phase} | {run.rps:,.0f} | "
                        f"{run.readings_s:,.0f} | {run.p50_ms:.1f} | {run.p99_ms:.1f} | "
                        f"{run.cpu_us_subject:.0f} | {run.cpu_us_redis:.0f} | {run.ok:,} | "
                        f"{run.other:,} | {run.socket_errors} | "
                        f"{run.batch_mean:.1f} |")  # fmt: skip
    ratio = med("gateway", "max", "rps") / med("naive", "max", "rps")
    p99 = med("gateway", "half", "p99_ms")
    bulk = med("gateway", "bulk100", "readings_s") / med("gateway", "max", "readings_s")
    goal = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    return "\n".join([
        BEGIN,
        "## HTTP gateway (`bench/gateway_bench.py`)",
        "",
        f"Run {started}, code {version}, {len(rounds)} round(s) of {duration_s:g} s per "
        f"measurement; `wrk -t1 -c{CONNECTIONS}` (Debian's wrk, Lua script), one redis-server "
        "(no persistence) shared by both subjects, each subject one process (uvicorn with httptools, "
        "asyncio loop). Medians over rounds:",
        "",
        f"- requests/s at {CONNECTIONS} connections: gateway {med('gateway', 'max', 'rps'):,.0f} "
        f"against naive (one awaited XADD per request) {med('naive', 'max', 'rps'):,.0f}: "
        f"**{ratio:.2f}x** (goal >= 2x: {goal(ratio >= 2)}).",
        f"- p99 latency at half the gateway's max rate: **{p99:.1f} ms** (p50 "
        f"{med('gateway', 'half', 'p50_ms'):.1f} ms; goal <= 50 ms: {goal(p99 <= 50)}).",
        f"- NDJSON bulk, 100 readings a request: {med('gateway', 'bulk100', 'readings_s'):,.0f} "
        f"readings/s against {med('gateway', 'max', 'readings_s'):,.0f} with single POSTs "
        f"(**{bulk:.1f}x**).",
        f"- CPU per request (subject / Redis): gateway {med('gateway', 'max', 'cpu_us_subject'):.0f}"
        f" / {med('gateway', 'max', 'cpu_us_redis'):.0f} us, naive "
        f"{med('naive', 'max', 'cpu_us_subject'):.0f} / {med('naive', 'max', 'cpu_us_redis'):.0f}"
        " us.",
        f"- Group commit: {med('gateway', 'max', 'batch_mean'):.1f} messages per Redis write at the"
        f" max rate, {med('gateway', 'half', 'batch_mean'):.1f} at half of it (the naive one: 1).",
        "",
        "Every 200 was checked against the stream (entries added >= readings answered 200, and "
        "at most two requests a connection more: those wrk cut off at the end). The "
        "gateway does more per request than the naive one (token check, contract, dedup, dead "
        "letters); the naive one has none of them. Latency is wrk's, from each request's send "
        "(coordinated omission: queueing before the send is not counted).",
        "",
        "| round | subject | phase | req/s | readings/s | p50 ms | p99 ms | CPU us/req | "
        "Redis CPU us/req | 200 | other | socket errors | messages/write |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        END,
    ])  # fmt: skip


def write_results(section: str) -> None:
    text = RESULTS.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=10.0, help="Seconds per measurement.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", choices=("write", "skip"), default="write")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (make bench installs it)")
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    version = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, check=False).stdout.strip() or "unknown"  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        db = services.redis_service(workdir / "redis")
        if db is None:
            sys.exit("redis-server is not installed")
        db.start()
        try:
            rounds = [run_round(workdir, db.port, db.pid, args.duration)
                      for _ in range(args.rounds)]  # fmt: skip
        finally:
            db.stop()
    section = render(rounds, started, version, args.duration)
    print(section)
    if args.results == "write":
        write_results(section)


if __name__ == "__main__":
    main()
