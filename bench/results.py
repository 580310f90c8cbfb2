"""What a benchmark run records and how it is reported: the plan, one result per subject and
round, summaries, the goals with their ratios to the limit and the baseline, and the generated
section of bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
# Mosquitto for a backlog: a queue that never drops what we publish (2.0 drops silently beyond
# max_queued_messages), QoS 1 in flight at the bridge's receive maximum, no persistence.
MOSQUITTO_CONF = "max_queued_messages 2000000\nmax_queued_bytes 0\nmax_inflight_messages 1000\n"
TARGET_RATIO = 8.0  # one bridge's drain rate over the naive baseline's
TARGET_P99_MS = 25.0  # one bridge's publish-to-XADD p99 at half its drain rate
TARGET_P99_ROUNDS = 0.9  # ... in at least this share of the rounds (9 of 10 bench runs)
# A live phase whose publishers achieved less than this share of the rate they were asked for
# did not measure the latency at that rate: its round does not count as met.
LIVE_RATE_KEPT = 0.97
TARGET_BRIDGE_LIMIT = 0.7  # one bridge's drain rate over the C subscriber's, same queue and broker
TARGET_PIPELINE_LIMIT = 0.5  # bridge + worker, stored and acked by the worker, over the same
# The worker alone (bench/worker_bench.py, every detector) against the worker of WORKER_BASE, the
# commit its entries/s were first measured at, in the same run.
TARGET_WORKER_BASE = 3.0
WORKER_BASE = "9a2c130"


@dataclass
class Plan:
    assets: int
    drain_n: dict[str, int]
    live_s: float
    live_fraction: float
    max_live_rate: float
    publishers: int
    publisher: str  # raw or paho: see bench/publisher.py
    rounds: int  # every subject once per round; ratios are taken within a round
    drain_timeout_s: float
    stagger_s: float = 0.0  # bridge2: the second bridge starts this much after the first
    cpu_hog: float = 0.0  # a CPU hog busy this fraction of one core beside every subject
    bridge_env: dict[str, str] = field(default_factory=dict)  # settings beyond the defaults
    worker_entries: int = 0  # bench/worker_bench.py after the rounds (0: not run)


@dataclass
class WorkerRun:
    """One run of bench/worker_bench.py: its `full` line (one worker, every detector, on entries
    stored before)."""

    rate: float = math.nan
    cpu_us: float = math.nan
    redis_cpu_us: float = math.nan
    error: str | None = None


@dataclass
class WorkerBench:
    """bench/worker_bench.py after the rounds: the working tree's worker, and the worker of the
    commit `base` (none: "") run just before it, `runs` times each."""

    entries: int
    base: str = ""
    runs: list[WorkerRun] = field(default_factory=list)
    base_runs: list[WorkerRun] = field(default_factory=list)
    base_error: str | None = None  # the base's tree could not be made

    @property
    def error(self) -> str | None:
        failed = next((r.error for r in self.runs if r.error), None)
        return failed if failed or self.runs else "not run"

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    @property
    def ratios(self) -> list[float]:
        """Each run's entries/s over the base's run before it."""
        return [r.rate / b.rate for r, b in zip(self.runs, self.base_runs, strict=False)
                if not r.error and not b.error]  # fmt: skip

    def note(self) -> str:
        if self.error:
            return f"worker alone (bench/worker_bench.py): not measured: {self.error}"
        cpu = statistics.median(r.cpu_us for r in self.runs)
        redis_cpu = statistics.median(r.redis_cpu_us for r in self.runs)
        note = (f"worker alone, every detector (bench/worker_bench.py after the rounds, from the "
                f"working tree, {self.entries:,} stored entries): {self.rate:,.0f} entries/s "
                f"(median of {len(self.runs)}), {cpu:.1f} CPU µs/entry (+ Redis {redis_cpu:.1f})")  # fmt: skip
        if not self.base:
            return note
        ratios = self.ratios
        if not ratios:
            failed = self.base_error or next((b.error for b in self.base_runs if b.error), None)
            return f"{note}; the worker of {self.base}: not measured: {failed}"
        base_rate = statistics.median(b.rate for b in self.base_runs if not b.error)
        median = statistics.median(ratios)
        verdict = "met" if median >= TARGET_WORKER_BASE else "NOT met"
        each = ", ".join(f"{x:.2f}" for x in ratios)
        return (f"{note}; {median:.2f}x the worker of {self.base} ({base_rate:,.0f} entries/s, "
                f"run before each; per run {each}; goal >= {TARGET_WORKER_BASE:g}x: {verdict})")  # fmt: skip


@dataclass
class Result:
    subject: str
    processes: int
    round_no: int = 0  # -1: a summary over the rounds
    drain_n: int = 0
    drain_msgs: int = 0  # messages inside the measured window
    drain_s: float = 0.0
    rate: float = 0.0
    cpu_us: float = 0.0  # every process of the subject (the pipeline: bridge + worker)
    worker_cpu_us: float = math.nan  # the pipeline's worker: its part of cpu_us
    redis_cpu_us: float = 0.0
    broker_cpu_us: float = 0.0
    startup_cpu_s: float = 0.0
    live_target_rate: float = 0.0
    live_rate: float = 0.0
    live_msgs: int = 0
    live_cpu_us: float = 0.0
    live_redis_cpu_us: float = 0.0  # Redis's and Mosquitto's CPU per message in the live phase
    live_broker_cpu_us: float = 0.0
    publisher_max_lag_ms: float = 0.0
    publisher_cpu_us: float = 0.0  # the live publishers' own CPU per message (startup included)
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    published: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    dead_letters: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    counters: list[dict[str, int]] = field(default_factory=list)  # per bridge, from /metrics
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.lost == 0
            and self.duplicated == 0
            and self.unexpected == 0
            and self.dead_letters == 0
            and all(code == 0 for code in self.exit_codes)
        )


# --- report --------------------------------------------------------------------------------------

# A result and its drain rate over the limit's and over the baseline's, in its own round.
Row = tuple[Result, float | None, float | None]


def ratio_to(results: list[Result], r: Result, reference: str) -> float | None:
    """r's drain rate over the reference subject's in the same round (a summary: the median of
    the rounds' ratios)."""
    if r.round_no < 0:
        mine = [x for x in results if x.subject == r.subject and x.round_no >= 0]
        ratios = [y for x in mine if (y := ratio_to(results, x, reference)) is not None]
        return statistics.median(ratios) if ratios else None
    ref = next((b for b in results if b.subject == reference and b.round_no == r.round_no), None)
    return r.rate / ref.rate if ref is not None and ref.rate and r.rate else None


def summarize(results: list[Result]) -> list[Row]:
    """Per subject: medians over the rounds that completed, the worst max, counts summed over all
    rounds, the median ratios."""
    rows: list[Row] = []
    for subject in dict.fromkeys(r.subject for r in results):
        mine = [r for r in results if r.subject == subject]
        good = [r for r in mine if r.error is None] or mine
        row = Result(subject, mine[0].processes, round_no=-1, drain_n=mine[0].drain_n)
        for name in ("rate", "cpu_us", "worker_cpu_us", "redis_cpu_us", "broker_cpu_us",
                     "live_target_rate", "live_rate", "live_cpu_us", "live_redis_cpu_us",
                     "live_broker_cpu_us", "publisher_cpu_us", "p50_ms", "p99_ms"):  # fmt: skip
            setattr(row, name, statistics.median(getattr(r, name) for r in good))
        row.max_ms = max((r.max_ms for r in good if not math.isnan(r.max_ms)), default=math.nan)
        row.publisher_max_lag_ms = max(r.publisher_max_lag_ms for r in good)
        for name in ("published", "stored", "lost", "duplicated", "unexpected", "dead_letters"):
            setattr(row, name, sum(getattr(r, name) for r in mine))
        row.exit_codes = [code for r in mine for code in r.exit_codes]
        row.error = "; ".join(r.error for r in mine if r.error) or None
        rows.append((row, ratio_to(results, row, "limit"), ratio_to(results, row, "baseline")))
    return rows


def _x(ratio: float | None, digits: int) -> str:
    return f"{ratio:.{digits}f}x" if ratio is not None else "n/a"


def _cpu(r: Result) -> str:
    worker = f" (worker {r.worker_cpu_us:.0f})" if not math.isnan(r.worker_cpu_us) else ""
    return f"{r.cpu_us:.1f}{worker}"


def _live(r: Result) -> str:
    if not r.live_rate:  # the limit and the pipeline have no live phase
        return "| - | - | - | - | - "
    return (f"| {r.live_rate:,.0f} ({r.live_target_rate:,.0f}) | {r.live_cpu_us:.1f} "
            f"({r.live_redis_cpu_us:.0f}, {r.live_broker_cpu_us:.0f}) "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} ")  # fmt: skip


def table(rows: list[Row]) -> str:
    head = ("| subject | procs | drain msg/s | x limit | x baseline | CPU µs/msg "
            "| Redis, Mosquitto µs/msg | live msg/s (target) | live CPU µs/msg (Redis, Mosquitto) "
            "| p50 ms | p99 ms "
            "| max ms | published | lost | dup | dead letters | ok |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r, to_limit, to_base in rows:
        name = r.subject if r.round_no < 0 else f"{r.subject} #{r.round_no + 1}"
        redis_cpu = "-" if r.subject == "limit" else f"{r.redis_cpu_us:.0f}"
        lines.append(
            f"| {name} | {r.processes} | {r.rate:,.0f} | {_x(to_limit, 2)} | {_x(to_base, 1)} "
            f"| {_cpu(r)} | {redis_cpu}, {r.broker_cpu_us:.0f} {_live(r)}"
            f"| {r.published:,} | {r.lost} | {r.duplicated} | {r.dead_letters} "
            f"| {'yes' if r.ok else 'NO: ' + (r.error or 'see counts and exit codes')} |"
        )
    return "\n".join(lines)


def per_round(results: list[Result]) -> list[Row]:
    return [(r, ratio_to(results, r, "limit"), ratio_to(results, r, "baseline")) for r in results]


@dataclass
class Goal:
    """One goal of the issue, judged on the median over the rounds; each round's figure beside."""

    name: str
    target: str
    rounds: list[float | None]
    median: float | None
    met: bool | None  # None: not measured in this run
    unit: str  # "x": a ratio; "ms"
    detail: str = ""  # after the verdict, e.g. how many rounds met it
    round_notes: list[str] = field(default_factory=list)  # after each round's figure

    def show(self, value: float | None) -> str:
        if value is None or math.isnan(value):
            return "n/a"
        return f"{value:.2f}x" if self.unit == "x" else f"{value:.1f} ms"

    @property
    def verdict(self) -> str:
        said = "not measured" if self.met is None else "met" if self.met else "NOT met"
        return f"{said} ({self.detail})" if self.detail else said


def latency_kept(r: Result) -> bool:
    """The live phase ran at the rate asked for (its p99 says something about that rate)."""
    return bool(r.live_target_rate) and r.live_rate >= LIVE_RATE_KEPT * r.live_target_rate


def latency_met(r: Result) -> bool:
    return latency_kept(r) and not math.isnan(r.p99_ms) and r.p99_ms <= TARGET_P99_MS


def _p99_goal(results: list[Result], rounds: list[int]) -> Goal:
    """Met in at least TARGET_P99_ROUNDS of the rounds, each at the rate it was asked for."""
    by = {r.round_no: r for r in results if r.subject == "bridge"}
    mine = [by[n] for n in rounds if n in by]
    p99 = [by[n].p99_ms if n in by else None for n in rounds]
    found = [x for x in p99 if x is not None and not math.isnan(x)]
    median = statistics.median(found) if found else None
    notes = [
        "" if n not in by or latency_kept(by[n]) or not by[n].live_target_rate
        else f" (at {by[n].live_rate / by[n].live_target_rate:.0%} of the rate)"
        for n in rounds
    ]  # fmt: skip
    met_in = sum(latency_met(r) for r in mine)
    met = None if median is None else met_in >= TARGET_P99_ROUNDS * len(mine)
    return Goal("one bridge's p99 publish-to-XADD at half its drain rate",
                f"<= {TARGET_P99_MS:g} ms in {TARGET_P99_ROUNDS:.0%} of rounds", p99, median, met,
                "ms", f"{met_in} of {len(mine)} rounds", notes)  # fmt: skip


def goals(results: list[Result]) -> list[Goal]:
    rounds = sorted({r.round_no for r in results})
    by = {(r.subject, r.round_no): r for r in results}

    def ratio_goal(name: str, subject: str, reference: str, target: float) -> Goal:
        each = [ratio_to(results, by[subject, n], reference) if (subject, n) in by else None
                for n in rounds]  # fmt: skip
        found = [x for x in each if x is not None]
        median = statistics.median(found) if found else None
        met = None if median is None else median >= target
        return Goal(name, f">= {target:g}x", each, median, met, "x")

    return [
        ratio_goal("one bridge's drain / the limit's", "bridge", "limit", TARGET_BRIDGE_LIMIT),
        ratio_goal(
            "the pipeline's drain / the limit's", "pipeline", "limit", TARGET_PIPELINE_LIMIT
        ),
        ratio_goal("one bridge's drain / the baseline's", "bridge", "baseline", TARGET_RATIO),
        _p99_goal(results, rounds),
    ]


def goals_table(results: list[Result]) -> str:
    rounds = sorted({r.round_no for r in results})
    head = ("| goal | target | median | "
            + "".join(f"round {n + 1} | " for n in rounds) + "verdict |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for goal in goals(results):
        notes = goal.round_notes or [""] * len(goal.rounds)
        each = "".join(
            f"{goal.show(x)}{note} | " for x, note in zip(goal.rounds, notes, strict=True)
        )
        lines.append(f"| {goal.name} | {goal.target} | {goal.show(goal.median)} | {each}"
                     f"{goal.verdict} |")  # fmt: skip
    return "\n".join(lines)


def targets(results: list[Result]) -> list[str]:
    """What the goals table does not say: two bridges against one, losses, failures."""
    summary = {row.subject: row for row, _, _ in summarize(results)}
    notes = []
    if "bridge" in summary and "bridge2" in summary and summary["bridge"].rate:
        one, two = summary["bridge"], summary["bridge2"]
        notes.append(
            f"two bridges in a shared group vs one: {two.rate / one.rate:.2f}x, combined rate "
            f"{'rises' if two.rate > one.rate else 'does NOT rise'}"
        )
    if "bridge" in summary and not math.isnan(summary["bridge"].p99_ms):
        notes.append(f"one bridge's live phase ran at {summary['bridge'].live_rate:,.0f} msg/s "
                     "(median)")  # fmt: skip
    for row in summary.values():
        if row.published:
            what = "received" if row.subject == "limit" else "stored"
            notes.append(f"{row.subject}: lost {row.lost}, duplicated {row.duplicated}, "
                         f"unexpected {row.unexpected} of {row.published:,} published "
                         f"({what} {row.stored:,})")  # fmt: skip
    for r in results:
        if r.error or r.lost or r.duplicated:
            said = "; ".join(", ".join(f"{k} {v:,}" for k, v in c.items()) for c in r.counters)
            notes.append(f"{r.subject} round {r.round_no + 1}: {r.error or 'counts differ'}; "
                         f"lost {r.lost}, duplicated {r.duplicated}"
                         + (f"; the bridges' own counters: {said}" if said else ""))  # fmt: skip
    return notes


def machine_note() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = Path("/proc/loadavg").read_text().split()[:3]
    return (f"{os.cpu_count()} cores ({model}), shared and noisy; load average at start "
            f"{' '.join(load)}; Linux {platform.release()}, Python {platform.python_version()}")  # fmt: skip


@dataclass
class About:
    """What a reader needs to judge the numbers: when, where, what code, which servers."""

    started: dt.datetime
    command: str
    machine: str
    code: str
    servers: str


def code_version(snapshot_hash: str) -> str:
    """The commit, whether the working tree differed from it (read-only git), and the hash of the
    copy the bridges ran from."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "bridge", "config",
                                "observability", "workers"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10, check=True)  # fmt: skip
        changed = " plus uncommitted changes in bridge/, config/, observability/ or workers/"
        commit = head.stdout.strip() + (changed if dirty.stdout.strip() else "")
        copy = "the bridges and the worker ran from a copy taken at the start"
        return f"{commit}; {copy}, sha256 {snapshot_hash}"
    return f"unknown commit; the bridges and the worker ran from a copy, sha256 {snapshot_hash}"


def versions(mosquitto: str, redis_server: str) -> str:
    def first_line(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, timeout=10, check=False)
            return (out.stdout or out.stderr).decode().splitlines()[0].strip()
        return "?"

    from importlib.metadata import version

    mosq = first_line([mosquitto, "-h"])
    rds = first_line([redis_server, "--version"])
    return f"{mosq}; {rds}; paho-mqtt {version('paho-mqtt')}, redis-py {version('redis')}"


def markdown(
    results: list[Result], plan: Plan, about: About, worker: WorkerBench | None = None
) -> str:
    drain = ", ".join(f"{k} {v:,}" for k, v in plan.drain_n.items())
    conf = MOSQUITTO_CONF.strip().replace("\n", "`, `")
    lines = [
        BEGIN,
        f"## Latest run: {about.started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{about.command}`",
        f"- machine: {about.machine}",
        f"- code: {about.code}",
        "- bridge settings: the defaults of `config/settings.yaml`"
        + "".join(f", `{k}={v}`" for k, v in plan.bridge_env.items())
        + (f"; bridge2's second process started {plan.stagger_s} s late" if plan.stagger_s else ""),
        f"- servers: {about.servers}; mosquitto `persistence false`, `{conf}`; redis-server "
        "without persistence; everything on 127.0.0.1",
        f"- {plan.rounds} round(s), each running every subject in turn; a ratio compares a subject "
        "with the limit or the baseline of its own round; the summary shows medians over the "
        "rounds (max: the worst), and counts summed",
        f"- drain: N = {drain} QoS 1 messages queued at the broker for the stopped subject, over "
        f"{plan.assets:,} assets; msg/s and CPU from the first entry seen in the stream to the "
        "N-th; CPU = the subject's processes (user + system); Redis's and Mosquitto's beside it",
        "- limit: `mosquitto_sub -V mqttv5 -q 1 -c -x 7200 -D connect receive-maximum 1000 "
        "-F . -C N` on the route's filter, output to /dev/null (the bridge's session and flow "
        "control; nothing done with the payload); its session created with `-E` before the "
        "backlog; from its start to its exit after the N-th message (start and connect "
        "included: a few ms); it must exit 0, having counted N; CPU = mosquitto_sub's",
        "- pipeline: one bridge and one `iotbridge worker` (shipped settings, every detector), "
        "the worker started and ready first; from the first entry stored until the worker's "
        "group has read every entry and has none pending (XINFO GROUPS); CPU = bridge + worker, "
        "the worker's part beside it; no live phase",
        f"- live: {plan.publishers} `{plan.publisher}` publisher processes at "
        f"{plan.live_fraction:.0%} of the subject's drain rate in the same round"
        + (f" (capped at {plan.max_live_rate:,.0f} msg/s)" if plan.max_live_rate else "")
        + f" for {plan.live_s:.0f} s, each writing what fell due every 1 ms in one write; a "
        f"round below {LIVE_RATE_KEPT:.0%} of that rate does not count as meeting the latency "
        "goal; latency = entry id ms "
        "(Redis clock, +0.5 ms for the floored id) - payload `ts` (publisher clock just before "
        "the socket write), same host",
        *(
            [
                f"- beside a CPU hog: a process busy {plan.cpu_hog:.0%} of one core (10 ms cycles) "
                "while each subject runs, a noisy neighbour on the same two cores"
            ]
            if plan.cpu_hog
            else []
        ),
        "",
        "Goals (a ratio compares two subjects of the same round):",
        "",
        goals_table(results),
        "",
        "Summary:",
        "",
        table(summarize(results)),
        "",
        *[f"- {note}" for note in targets(results)],
        *([f"- {worker.note()}"] if worker is not None else []),
    ]
    if plan.rounds > 1:
        lines += ["", "Each round:", "", table(per_round(results))]
    return "\n".join([*lines, END])


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = (text or "# Benchmark results\n\n") + "\n" + section + "\n"
    RESULTS.write_text(text)
