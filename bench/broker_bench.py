"""Broker benchmark: the publish rate the shipped Mosquitto carries while a backlog builds for an
absent bridge, against the same broker without persistence, side by side in one run.

    .venv/bin/python bench/broker_bench.py                     # backlog up to 1,000,000
    .venv/bin/python bench/broker_bench.py --backlog 200000 --variants shipped,none
    .venv/bin/python bench/broker_bench.py --variants shipped,none,on-changes --time-limit 60

Each variant is `broker/mosquitto.conf` with only the port, the paths and the user changed
(anonymous clients allowed, no password file); `none` adds `persistence false`, `on-changes` puts
back the save-after-every-change setting (`autosave_on_changes true`, `autosave_interval 1`) for
comparison. For each variant, in its own broker:

1. `drained`: a C subscriber (`mosquitto_sub -q 1`) holds the bridge's session and drains it,
   while one lean publisher (bench/publisher.py's raw QoS 1 client, a window of 1,000 unacked)
   sends as fast as the broker acknowledges: the rate with a backlog of 0.
2. `backlog`: the subscriber goes away (its persistent session stays, as a bridge's does while it
   restarts), and the publisher sends until `--backlog` messages are queued. The rate is taken in
   windows of the queue's length (for example 0-100,000, 100,000-200,000 ... 900,000-1,000,000);
   the broker's saves (their count, duration and file size) are read from its log and the
   persistence file while it runs.
3. `kill -9`: publishes are acknowledged, the broker is killed with -9 after a given wait, and the
   messages found again after a restart are counted (the loss window, measured).

Every phase is bounded in messages and seconds. Only loopback addresses are used. Numbers from a
shared machine mean something only as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: bench/ and tests/ import as packages

from bench.procs import cpu_seconds, free_port, services  # noqa: E402
from bench.publisher import WINDOW, RawClient  # noqa: E402

SHIPPED = ROOT / "broker" / "mosquitto.conf"
FILTER = "plant/+/+/+/telemetry"
ASSETS = 1000
SESSION = "bench-broker-bridge"
VARIANTS = ("shipped", "none", "on-changes")


@dataclass
class Level:
    """One variant at one backlog: the publish rate while `backlog` messages were queued."""

    variant: str
    backlog: int
    rate: float = 0.0  # msg/s acknowledged to the publisher while held at the backlog
    seconds: float = 0.0
    filled: int = 0  # messages queued before the measured window (== backlog when reached)
    saves: int = 0  # saves during the measured window, from the broker's log
    db_bytes: int = 0  # the persistence file at the end
    broker_cpu_us: float = 0.0  # broker CPU per message in the window

    @property
    def reached(self) -> bool:
        return self.filled >= self.backlog


def conf_for(variant: str, workdir: Path, port: int, overrides: dict[str, str]) -> Path:
    set_directive = services.set_directive
    text = SHIPPED.read_text()
    text = set_directive(text, "listener", f"{port} 127.0.0.1")
    text = set_directive(text, "allow_anonymous", "true")
    text = set_directive(text, "persistence_location", f"{workdir}/")
    text = set_directive(text, "log_dest", f"file {workdir}/mosquitto.log")
    if os.geteuid() == 0:
        text = set_directive(text, "user", "root")  # the workdir is root's
    for name, value in overrides.items():
        text = set_directive(text, name, value)
    if variant == "none":
        text = set_directive(text, "persistence", "false")
    elif variant == "on-changes":
        text = set_directive(text, "autosave_on_changes", "true")
        text = set_directive(text, "autosave_interval", "1")
    # Saves are logged at `information`: counted from the log, not guessed.
    text += "\nlog_type information\n"
    path = workdir / "mosquitto.conf"
    path.write_text(text)
    return path


def session_sub(port: int, *extra: str) -> list[str]:
    """`mosquitto_sub` as the bridge's session: MQTT 5, QoS 1, clean start off, a day's expiry."""
    return ["mosquitto_sub", "-p", str(port), "-h", "127.0.0.1", "-V", "mqttv5", "-q", "1",
            "-c", "-x", "86400", "-i", SESSION, "-t", FILTER, *extra]  # fmt: skip


def create_session(port: int) -> None:
    """The bridge's persistent session and subscription, then away (as a stopped bridge)."""
    sub = subprocess.run(session_sub(port, "-W", "1"), capture_output=True, timeout=10, check=False)
    # -W 1: it subscribes, waits a second for nothing, and exits with 27 (timed out): expected.
    if sub.returncode not in (0, 27):
        raise SystemExit(f"could not create the session: {sub.stderr.decode()}")


def publish(client: RawClient, count: int, deadline: float) -> None:
    """Publish up to `count` more messages as fast as the broker acknowledges, until `deadline`."""
    target = client.sent + count
    while client.acked < target and time.monotonic() < deadline:
        upto = min(target, client.acked + WINDOW)
        if upto > client.sent:
            first = client.sent
            client.send([(j % ASSETS, j // ASSETS) for j in range(first, upto)])
        client.poll(0.05)


def saves(log: Path) -> int:
    return log.read_text(errors="replace").count("Saving in-memory database")


def measure(variant: str, backlog: int, workdir: Path, args: argparse.Namespace) -> Level:
    """A broker of its own; the session filled to `backlog`, then held there for `--hold-s`
    (max_queued_messages is the backlog: what comes beyond it is dropped, as at a full queue,
    so every save in the window writes a queue of that length)."""
    workdir.mkdir(parents=True)
    port = free_port()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if backlog:
        overrides["max_queued_messages"] = str(backlog)
    conf = conf_for(variant, workdir, port, overrides)
    log = workdir / "mosquitto.log"
    broker = services.Service(
        "mosquitto", [services.mosquitto_binary(), "-c", str(conf)], port, workdir
    )
    broker.start()
    level = Level(variant, backlog)
    try:
        create_session(port)
        sub = drainer(port, log) if backlog == 0 else None
        client = RawClient("127.0.0.1", port, f"bench-broker-pub-{variant}")
        publish(client, backlog, time.monotonic() + args.fill_limit_s)
        level.filled = client.acked
        if level.reached:
            saves0, cpu0, acked0 = saves(log), cpu_seconds(broker.pid), client.acked
            started = time.monotonic()
            publish(client, 10**9, started + args.hold_s)
            level.seconds = time.monotonic() - started
            done = client.acked - acked0
            level.rate = done / level.seconds
            level.saves = saves(log) - saves0
            level.broker_cpu_us = (cpu_seconds(broker.pid) - cpu0) / max(done, 1) * 1e6
        client.close()
        if sub is not None:
            sub.send_signal(signal.SIGTERM)
            sub.wait(10)
        db = workdir / "mosquitto.db"
        level.db_bytes = db.stat().st_size if db.exists() else 0
    finally:
        broker.stop()
    return level


def drainer(port: int, log: Path) -> subprocess.Popen[bytes]:
    """The session's C subscriber, connected and draining: a backlog of 0."""
    connects = _connects(log)
    sub = subprocess.Popen(
        session_sub(port, "-F", "%m"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    services.wait_until(lambda: _connects(log) > connects, 10, "the C subscriber")
    return sub


def _connects(log: Path) -> int:
    """How often the session's client has connected, from the broker's log (connection_messages
    true in the shipped file)."""
    return log.read_text(errors="replace").count(f" as {SESSION} ") if log.exists() else 0


def table(levels: list[Level]) -> str:
    """Rates by backlog, each variant against `none` (no persistence) at the same backlog."""
    none = {lv.backlog: lv.rate for lv in levels if lv.variant == "none"}
    lines = [
        "| variant | backlog | msg/s | of `none` | saves in window | file | broker CPU us/msg |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for lv in levels:
        if not lv.reached:
            lines.append(
                f"| {lv.variant} | {lv.backlog:,} | not reached: {lv.filled:,} queued "
                f"in the fill time limit | - | - | - | - |"
            )
            continue
        base = none.get(lv.backlog)
        ratio = f"{lv.rate / base:.2f}" if base else "-"
        lines.append(
            f"| {lv.variant} | {lv.backlog:,} | {lv.rate:,.0f} | {ratio} | {lv.saves} | "
            f"{lv.db_bytes / 2**20:,.1f} MiB | {lv.broker_cpu_us:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="shipped,none")
    parser.add_argument("--backlogs", default="0,100000,1000000", help="queue lengths to hold")
    parser.add_argument(
        "--hold-s",
        type=float,
        default=35.0,
        help="seconds measured at each backlog (several autosave intervals)",
    )
    parser.add_argument(
        "--fill-limit-s",
        type=float,
        default=120.0,
        help="seconds allowed to queue the backlog first",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="change a directive of every variant (e.g. autosave_interval=30)",
    )
    parser.add_argument("--json", type=Path, help="write every number here too")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if shutil.which("mosquitto_sub") is None or services.mosquitto_binary() is None:
        raise SystemExit(
            "mosquitto and mosquitto_sub are needed (apt-get install mosquitto mosquitto-clients)"
        )
    levels: list[Level] = []
    with tempfile.TemporaryDirectory(prefix="iotbridge-broker-bench-") as tmp:
        # Backlog by backlog, the variants side by side: a noisy minute hits both alike.
        for backlog in (int(b) for b in args.backlogs.split(",")):
            for variant in variants:
                level = measure(variant, backlog, Path(tmp) / f"{variant}-{backlog}", args)
                levels.append(level)
                print(json.dumps(asdict(level)), flush=True)
    print(table(levels))
    if args.json:
        args.json.write_text(json.dumps([asdict(lv) for lv in levels], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
