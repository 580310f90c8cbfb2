"""What bench/cluster_bench.py records and reports: its subjects, one run per subject and round,
the medians over the rounds with each subject's ratios to its reference (in the same round), and
its section of bench/RESULTS.md.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.results import RESULTS, About

BEGIN, END = "<!-- cluster-bench: begin -->", "<!-- cluster-bench: end -->"


@dataclass(frozen=True)
class Subject:
    name: str
    topology: str  # "one" or "cluster"
    replicas: int  # redis.durability.replicas
    workers: int  # 0: the bridge alone
    reference: str | None  # the subject of the same round its ratios are taken against


SUBJECTS = {
    s.name: s
    for s in (
        Subject("one", "one", 0, 0, None),
        Subject("cluster", "cluster", 0, 0, "one"),
        Subject("one-wait1", "one", 1, 0, "one"),
        Subject("cluster-wait1", "cluster", 1, 0, "cluster"),
        Subject("pipeline-one", "one", 0, 2, None),
        Subject("pipeline-cluster", "cluster", 0, 2, "pipeline-one"),
    )
}


@dataclass
class Run:
    """One subject in one round (round_no -1: the medians over the rounds)."""

    subject: str
    round_no: int
    n: int = 0
    secs: float = 0.0
    rate: float = 0.0
    bridge_cpu_us: float = math.nan
    worker_cpu_us: float = math.nan  # every worker of the pipeline
    master_cpu_us: float = math.nan  # every master of the set-up
    replica_cpu_us: float = math.nan
    busiest_master: float = math.nan  # the busiest master's CPU over the window, share of a core
    broker_cpu_us: float = math.nan
    live_target: float = 0.0
    live_rate: float = 0.0
    live_bridge_cpu_us: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    write_ms: float = math.nan  # the bridge's mean batch write (its /metrics), live phase
    ack_ms: float = math.nan  # the bridge's mean receive-to-ack, live phase
    published: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    dead_letters: int = 0
    exit_codes: list[int | None] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)  # what the processes logged (WARNING+)
    error: str | None = None

    @property
    def redis_cpu_us(self) -> float:
        return self.master_cpu_us + self.replica_cpu_us

    @property
    def ok(self) -> bool:
        counts = (self.lost, self.duplicated, self.unexpected, self.dead_letters)
        return self.error is None and not any(counts) and all(c == 0 for c in self.exit_codes)

    def drain_note(self) -> str:
        workers = (
            f", workers {self.worker_cpu_us:.1f}" if not math.isnan(self.worker_cpu_us) else ""
        )
        return (f"{self.rate:,.0f} msg/s; CPU us/msg: bridge {self.bridge_cpu_us:.1f}{workers}, "
                f"Redis {self.redis_cpu_us:.1f} (masters {self.master_cpu_us:.1f}, replicas "
                f"{self.replica_cpu_us:.1f}), Mosquitto {self.broker_cpu_us:.1f}; busiest master "
                f"{self.busiest_master:.0%} of a core")  # fmt: skip

    def live_note(self) -> str:
        return (f"{self.live_rate:,.0f} msg/s (target {self.live_target:,.0f}), publish-to-XADD "
                f"p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, max {self.max_ms:.1f} ms; "
                f"the bridge's mean write {self.write_ms:.2f} ms, receive-to-ack "
                f"{self.ack_ms:.2f} ms, {self.live_bridge_cpu_us:.1f} CPU us/msg")  # fmt: skip

    def check_note(self) -> str:
        return (f"published {self.published:,}, stored {self.stored:,}, lost {self.lost}, "
                f"duplicated {self.duplicated}, unexpected {self.unexpected}, dead letters "
                f"{self.dead_letters}, exit codes {self.exit_codes}")  # fmt: skip


# --- report ---------------------------------------------------------------------------------------

MEDIANS = ("secs", "rate", "bridge_cpu_us", "worker_cpu_us", "master_cpu_us", "replica_cpu_us",
           "busiest_master", "broker_cpu_us", "live_target", "live_rate", "live_bridge_cpu_us",
           "p50_ms", "p99_ms", "write_ms", "ack_ms")  # fmt: skip
COUNTS = ("published", "stored", "lost", "duplicated", "unexpected", "dead_letters")


def summarize(runs: list[Run]) -> list[Run]:
    """Per subject: medians over the rounds that completed, the worst max, counts summed."""
    rows = []
    for name in dict.fromkeys(r.subject for r in runs):
        mine = [r for r in runs if r.subject == name]
        good = [r for r in mine if r.error is None] or mine
        row = Run(name, -1, n=mine[0].n)
        for attr in MEDIANS:
            setattr(row, attr, statistics.median(getattr(r, attr) for r in good))
        row.max_ms = max((r.max_ms for r in good if not math.isnan(r.max_ms)), default=math.nan)
        for attr in COUNTS:
            setattr(row, attr, sum(getattr(r, attr) for r in mine))
        row.exit_codes = [code for r in mine for code in r.exit_codes]
        row.log_lines = [line for r in mine for line in r.log_lines][:20]
        row.error = "; ".join(r.error for r in mine if r.error) or None
        rows.append(row)
    return rows


def ratio(runs: list[Run], row: Run, attr: str) -> float | None:
    """`attr` of a subject over its reference's, in the same round (a summary row: the median of
    the rounds' ratios)."""
    reference = SUBJECTS[row.subject].reference
    if reference is None:
        return None
    if row.round_no < 0:
        mine = [r for r in runs if r.subject == row.subject]
        found = [x for r in mine if (x := ratio(runs, r, attr)) is not None]
        return statistics.median(found) if found else None
    ref = next((r for r in runs if r.subject == reference and r.round_no == row.round_no), None)
    if ref is None or ref.error or row.error or not getattr(ref, attr):
        return None
    return float(getattr(row, attr) / getattr(ref, attr))


def total_cpu_us(row: Run) -> float:
    parts = (row.bridge_cpu_us, row.worker_cpu_us, row.redis_cpu_us, row.broker_cpu_us)
    return sum(x for x in parts if not math.isnan(x))


def table(runs: list[Run], rows: list[Run]) -> str:
    head = ("| subject | drain msg/s | vs reference | CPU µs/msg: bridge (workers) | Redis: "
            "masters + replicas | Mosquitto | all | busiest master, share of a core "
            "| live msg/s | live bridge µs/msg | p50 / p99 ms | bridge write / ack ms "
            "| lost / dup / dead | ok |")  # fmt: skip
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for row in rows:
        subject = SUBJECTS[row.subject]
        name = row.subject if row.round_no < 0 else f"{row.subject} #{row.round_no + 1}"
        to_ref = ratio(runs, row, "rate")
        versus = f"{to_ref:.2f}x {subject.reference}" if to_ref is not None else "-"
        workers = f" ({row.worker_cpu_us:.1f})" if not math.isnan(row.worker_cpu_us) else ""
        live_cols = (f"{row.live_rate:,.0f} | {row.live_bridge_cpu_us:.1f} | {row.p50_ms:.1f} / "
                     f"{row.p99_ms:.1f} | {row.write_ms:.2f} / {row.ack_ms:.2f}"
                     if row.live_rate else "- | - | - | -")  # fmt: skip
        lines.append(
            f"| {name} | {row.rate:,.0f} | {versus} | {row.bridge_cpu_us:.1f}{workers} "
            f"| {row.redis_cpu_us:.1f}: {row.master_cpu_us:.1f} + {row.replica_cpu_us:.1f} "
            f"| {row.broker_cpu_us:.1f} | {total_cpu_us(row):.1f} | {row.busiest_master:.0%} "
            f"| {live_cols} | {row.lost} / {row.duplicated} / {row.dead_letters} "
            f"| {'yes' if row.ok else 'NO: ' + (row.error or 'see counts and exit codes')} |"
        )
    return "\n".join(lines)


def ratios(runs: list[Run], rows: list[Run]) -> list[str]:
    """The comparisons the bench is for, each a median of the rounds' ratios."""
    notes = []
    for row in rows:
        reference = SUBJECTS[row.subject].reference
        rate, bridge = ratio(runs, row, "rate"), ratio(runs, row, "bridge_cpu_us")
        if reference is None or rate is None or bridge is None:
            continue
        redis_cpu = ratio(runs, row, "master_cpu_us")
        notes.append(f"{row.subject} / {reference}: drain rate {rate:.2f}x, bridge CPU per "
                     f"message {bridge:.2f}x, the masters' CPU per message "
                     f"{redis_cpu or math.nan:.2f}x")  # fmt: skip
    return notes


def setup_notes(rounds: int, subjects: list[str], messages: int, shards: int, live_rate: float,
                live_s: float) -> list[str]:  # fmt: skip
    """How the run was made, for the section of bench/RESULTS.md."""
    return [
        "every Redis node with `appendonly yes`, `appendfsync everysec` (no automatic rewrite: "
        "every file is emptied and rewritten between subjects); `one` is a redis-server and a "
        "replica of it, `cluster` 3 masters and 3 replicas (tests/cluster.py, cluster-node-timeout "
        "2000), both up for the whole run; mosquitto `persistence false`; all on 127.0.0.1",
        f"{rounds} round(s) of {', '.join(subjects)}; drain N = {messages:,} QoS 1 messages over "
        f"1,000 assets; `redis.stream_shards: {shards}`; live: 2 raw publishers at "
        f"{live_rate:,.0f} msg/s for {live_s:.0f} s",
        "CPU µs/msg over the drain window, from /proc: the bridge (the pipeline's 2 workers in "
        "brackets), Redis (every node of the set-up: masters + replicas), Mosquitto, and all of "
        "them; busiest master: the CPU seconds of the busiest master over the window's; live "
        "bridge µs/msg: the bridge's CPU over the live phase per live message; write / ack: its "
        "mean batch write and receive-to-ack in the live phase (its /metrics)",
    ]


def markdown(runs: list[Run], about: About, setup: list[str]) -> str:
    """The section of bench/RESULTS.md: when, where, what code, `setup` (one line each), the
    medians, the ratios, each round."""
    rows = summarize(runs)
    lines = [
        BEGIN,
        f"### Latest run: {about.started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `{about.command}`",
        f"- machine: {about.machine}",
        f"- code: {about.code}",
        f"- servers: {about.servers}",
        *[f"- {line}" for line in setup],
        "",
        table(runs, rows),
        "",
        *[f"- {note}" for note in ratios(runs, rows)],
    ]
    if len({r.round_no for r in runs}) > 1:
        lines += ["", "Each round:", "", table(runs, runs)]
    return "\n".join([*lines, END])


def report(runs: list[Run]) -> str:
    """What the run prints at its end: each round, the medians, the ratios, what was logged."""
    rows = summarize(runs)
    lines = ["", table(runs, runs)] if len({r.round_no for r in runs}) > 1 else []
    lines += ["", table(runs, rows), "", *[f"- {note}" for note in ratios(runs, rows)]]
    lines += [f"- {row.subject} logged: {line}" for row in rows for line in row.log_lines[:3]]
    return "\n".join(lines)


def as_json(runs: list[Run], about: About) -> dict[str, Any]:
    return {
        "command": about.command, "machine": about.machine, "code": about.code,
        "servers": about.servers, "started": about.started.isoformat(),
        "runs": [asdict(r) | {"redis_cpu_us": r.redis_cpu_us} for r in runs],
        "summary": [asdict(r) | {"redis_cpu_us": r.redis_cpu_us} for r in summarize(runs)],
    }  # fmt: skip


def write_results(section: str) -> None:
    """Replace the last run's section of bench/RESULTS.md, or append a new `Redis Cluster` one."""
    text = RESULTS.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Redis Cluster (`bench/cluster_bench.py`)\n\n"
        text += section + "\n"
    RESULTS.write_text(text)
