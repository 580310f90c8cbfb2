"""What a benchmark run records and how it is reported: the plan, one result per subject and
round, summaries, the targets of the issue, and the generated section of bench/RESULTS.md.
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
TARGET_RATIO = 8.0
TARGET_P99_MS = 25.0


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


@dataclass
class Result:
    subject: str
    processes: int
    round_no: int = 0  # -1: a summary over the rounds
    drain_n: int = 0
    drain_msgs: int = 0  # messages inside the measured window
    drain_s: float = 0.0
    rate: float = 0.0
    cpu_us: float = 0.0
    redis_cpu_us: float = 0.0
    broker_cpu_us: float = 0.0
    startup_cpu_s: float = 0.0
    live_target_rate: float = 0.0
    live_rate: float = 0.0
    live_msgs: int = 0
    live_cpu_us: float = 0.0
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


Row = tuple[Result, float | None]  # a result and its drain rate over the baseline's, same round


def ratio_to_baseline(results: list[Result], r: Result) -> float | None:
    base = next((b for b in results if b.subject == "baseline" and b.round_no == r.round_no), None)
    return r.rate / base.rate if base is not None and base.rate and r.rate else None


def summarize(results: list[Result]) -> list[Row]:
    """Per subject: medians over the rounds that completed, the worst max, counts summed over all
    rounds, the median ratio."""
    rows: list[Row] = []
    for subject in dict.fromkeys(r.subject for r in results):
        mine = [r for r in results if r.subject == subject]
        good = [r for r in mine if r.error is None] or mine
        row = Result(subject, mine[0].processes, round_no=-1, drain_n=mine[0].drain_n)
        for name in ("rate", "cpu_us", "redis_cpu_us", "broker_cpu_us", "live_target_rate", "live_rate",
                     "live_cpu_us", "publisher_cpu_us", "p50_ms", "p99_ms"):  # fmt: skip
            setattr(row, name, statistics.median(getattr(r, name) for r in good))
        row.max_ms = max((r.max_ms for r in good if not math.isnan(r.max_ms)), default=math.nan)
        row.publisher_max_lag_ms = max(r.publisher_max_lag_ms for r in good)
        for name in ("published", "stored", "lost", "duplicated", "unexpected", "dead_letters"):
            setattr(row, name, sum(getattr(r, name) for r in mine))
        row.exit_codes = [code for r in mine for code in r.exit_codes]
        row.error = "; ".join(r.error for r in mine if r.error) or None
        ratios = [x for r in mine if (x := ratio_to_baseline(results, r)) is not None]
        rows.append((row, statistics.median(ratios) if ratios else None))
    return rows


def table(rows: list[Row]) -> str:
    head = ("| subject | procs | drain msg/s | x baseline | CPU µs/msg | Redis, Mosquitto µs/msg "
            "| live msg/s (target) | live CPU µs/msg | p50 ms | p99 ms | max ms "
            "| published | lost | dup | dead letters | ok |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r, ratio in rows:
        name = r.subject if r.round_no < 0 else f"{r.subject} #{r.round_no + 1}"
        lines.append(
            f"| {name} | {r.processes} | {r.rate:,.0f} "
            f"| {f'{ratio:.1f}x' if ratio is not None else 'n/a'} | {r.cpu_us:.0f} "
            f"| {r.redis_cpu_us:.0f}, {r.broker_cpu_us:.0f} | {r.live_rate:,.0f} ({r.live_target_rate:,.0f}) "
            f"| {r.live_cpu_us:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} "
            f"| {r.published:,} | {r.lost} | {r.duplicated} | {r.dead_letters} "
            f"| {'yes' if r.ok else 'NO: ' + (r.error or 'see counts and exit codes')} |"
        )
    return "\n".join(lines)


def per_round(results: list[Result]) -> list[Row]:
    return [(r, ratio_to_baseline(results, r)) for r in results]


def targets(results: list[Result]) -> list[str]:
    """The issue's targets, judged on the medians; each round's own figure beside them."""
    summary = {row.subject: (row, ratio) for row, ratio in summarize(results)}
    rounds = {s: [r for r in results if r.subject == s] for s in summary}
    notes = []
    if "bridge" in summary and summary["bridge"][1] is not None:
        ratio = summary["bridge"][1]
        each = [ratio_to_baseline(results, r) for r in rounds["bridge"]]
        notes.append(
            f"one bridge >= {TARGET_RATIO:.0f}x the baseline: median {ratio:.1f}x "
            f"(rounds: {', '.join(f'{x:.1f}x' for x in each if x is not None)}): "
            f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}"
        )
    if "bridge" in summary and not math.isnan(summary["bridge"][0].p99_ms):
        one = summary["bridge"][0]
        each_p99 = ", ".join(f"{r.p99_ms:.1f}" for r in rounds["bridge"])
        notes.append(
            f"one bridge p99 publish-to-XADD <= {TARGET_P99_MS:.0f} ms at half its drain rate "
            f"({one.live_rate:,.0f} msg/s): median {one.p99_ms:.1f} ms (rounds: {each_p99}): "
            f"{'met' if one.p99_ms <= TARGET_P99_MS else 'NOT met'}"
        )
    if "bridge" in summary and "bridge2" in summary and summary["bridge"][0].rate:
        one, two = summary["bridge"][0], summary["bridge2"][0]
        notes.append(
            f"two bridges in a shared group vs one: {two.rate / one.rate:.2f}x, combined rate "
            f"{'rises' if two.rate > one.rate else 'does NOT rise'}"
        )
    for row, _ in summary.values():
        if row.published:
            notes.append(f"{row.subject}: lost {row.lost}, duplicated {row.duplicated}, "
                         f"unexpected {row.unexpected} of {row.published:,} published")  # fmt: skip
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
                                "observability"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10, check=True)  # fmt: skip
        changed = " plus uncommitted changes in bridge/, config/ or observability/"
        commit = head.stdout.strip() + (changed if dirty.stdout.strip() else "")
        return f"{commit}; the bridges ran from a copy taken at the start, sha256 {snapshot_hash}"
    return f"unknown commit; the bridges ran from a copy, sha256 {snapshot_hash}"


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


def markdown(results: list[Result], plan: Plan, about: About) -> str:
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
        "with the baseline of its own round; the summary shows medians over the rounds (max: the "
        "worst), and counts summed",
        f"- drain: N = {drain} QoS 1 messages queued at the broker for the stopped subject, over "
        f"{plan.assets:,} assets; msg/s and CPU from the first entry seen in the stream to the "
        "N-th; CPU = the subject's processes (user + system); Redis's and Mosquitto's beside it",
        f"- live: {plan.publishers} `{plan.publisher}` publisher processes at "
        f"{plan.live_fraction:.0%} of the subject's drain rate (capped at "
        f"{plan.max_live_rate:,.0f} msg/s) for {plan.live_s:.0f} s; latency = entry id ms "
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
        "Summary:",
        "",
        table(summarize(results)),
        "",
        *[f"- {note}" for note in targets(results)],
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
