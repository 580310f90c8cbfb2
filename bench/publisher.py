"""One benchmark publisher process: QoS 1 telemetry for a slice of the assets, then a JSON report.

Asset k publishes on `plant/s1/l1/a<k>/telemetry`; this process owns the assets with
`k % of == index`, goes round-robin over them, and numbers each asset's messages from `--start-seq`.
So message i of this process is asset `mine[i % len(mine)]`, seq `start_seq + i // len(mine)`, and
the harness rebuilds exactly what was published from the count alone.

Two modes: `--count N` publishes N messages as fast as the broker takes them (a backlog for a
stopped subscriber); `--rate R --duration S` publishes R msg/s for S seconds on an even schedule,
starting at wall time `--start-at` so several publishers start together. `ts` is the wall time just
before the message is written to the socket: publish-to-XADD latency is measured from it. The
process exits once the broker has acknowledged (PUBACK) every message, or after `--ack-timeout`.
The harness starts these processes with `publish()` and rebuilds what they sent with
`expected_pairs()`, both below.

Two clients: `raw` (default) writes pre-encoded MQTT 3.1.1 QoS 1 PUBLISH packets on a plain socket,
a batch per wake-up, and counts PUBACKs; `paho` calls paho-mqtt's `publish()` per message. Measured
on the 2-core bench machine, paho costs 100-150 CPU microseconds per message, as much as the whole
naive baseline bridge; publishers share the machine with the subject, so the raw client (a few
microseconds) keeps the load generator from eating the CPU whose use is being measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bench.results import Plan

# Unacknowledged QoS 1 messages: the broker's receive maximum (mosquitto max_inflight_messages).
WINDOW = 1000
# Paced mode wakes this often (not on each PUBACK); a wake publishes everything that has become
# due in one write.
TICK_S = 0.001
PUBACK = 0x40
_U16 = struct.Struct("!H")


# Sites the assets are spread over (`--sites`): site k takes the assets with asset % SITES == k-1.
SITES = 1


def topic(asset: int) -> str:
    return f"plant/s{1 + asset % SITES}/l1/a{asset}/telemetry"


# The readings cycle with the seq: their text is made once, not per message.
_TEMPERATURE = [repr(50.0 + k / 10).encode() for k in range(200)]
_VIBRATION = [repr(2.0 + k / 100).encode() for k in range(50)]


def payload(ts: float, seq: int) -> bytes:
    return _payload(repr(ts).encode(), seq)


def _payload(ts: bytes, seq: int) -> bytes:
    return b'{"ts": %b, "seq": %d, "values": {"temperature": %b, "vibration": %b}}' % (
        ts, seq, _TEMPERATURE[seq % 200], _VIBRATION[seq % 50])  # fmt: skip


class Client(Protocol):
    sent: int
    acked: int

    def send(self, messages: list[tuple[int, int]]) -> None: ...

    def poll(self, timeout_s: float) -> None: ...

    def close(self) -> None: ...


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class RawClient:
    """MQTT 3.1.1, QoS 1 publishes only: CONNECT, PUBLISH x N, count PUBACKs, DISCONNECT."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sent = 0
        self.acked = 0
        self._partial = b""
        self._topics: dict[int, bytes] = {}
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ident = client_id.encode()
        # protocol "MQTT", level 4, flags: clean session; keepalive 0: no pings to answer
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + _U16.pack(len(ident)) + ident
        self.sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = self.sock.recv(4)
        if connack[:1] != b"\x20" or connack[3:4] != b"\x00":
            raise SystemExit(f"publisher {client_id}: refused by {host}:{port}: {connack!r}")
        self.sock.setblocking(False)

    def _packet(self, asset: int, seq: int, ts: bytes) -> bytes:
        name = self._topics.get(asset)
        if name is None:
            raw = topic(asset).encode()
            name = self._topics[asset] = _U16.pack(len(raw)) + raw
        self.sent += 1
        body = _payload(ts, seq)
        packet_id = _U16.pack(self.sent % 65535 + 1)
        return b"\x32%b%b%b%b" % (_varint(len(name) + 2 + len(body)), name, packet_id, body)

    def send(self, messages: list[tuple[int, int]]) -> None:
        ts = repr(time.time()).encode()  # one wake-up's messages leave together
        data = memoryview(b"".join([self._packet(asset, seq, ts) for asset, seq in messages]))
        while data:
            try:
                data = data[self.sock.send(data) :]
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)
                self.poll(0)

    def poll(self, timeout_s: float) -> None:
        readable, _, _ = select.select([self.sock], [], [], timeout_s)
        if not readable:
            return
        try:
            data = self._partial + self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        whole = len(data) - len(data) % 4
        # Only PUBACKs come back to a publisher that subscribes to nothing: 0x40 0x02 id id.
        if data[:whole:4].count(PUBACK) != whole // 4:
            raise SystemExit(f"unexpected packet from the broker: {data[:16]!r}")
        self.acked += whole // 4
        self._partial = data[whole:]

    def close(self) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(b"\xe0\x00")
        self.sock.close()


class PahoClient:
    """paho-mqtt 2.x, MQTT 5, its network thread; one `publish()` per message."""

    def __init__(self, host: str, port: int, client_id: str) -> None:
        import paho.mqtt.client as mqtt  # here: the raw client's process need not pay for it
        from paho.mqtt.enums import CallbackAPIVersion

        self.sent = 0
        self.acked = 0
        connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(WINDOW)
        self.client.on_connect = lambda *_: connected.set()
        self.client.on_publish = self._on_publish
        self.client.connect(host, port, keepalive=60, clean_start=True)
        self.client.loop_start()
        if not connected.wait(10):
            raise SystemExit(f"publisher {client_id}: no CONNACK from {host}:{port}")

    def _on_publish(self, *_: Any) -> None:
        self.acked += 1  # paho's network thread; only the main thread reads it

    def send(self, messages: list[tuple[int, int]]) -> None:
        for asset, seq in messages:
            self.client.publish(topic(asset), payload(time.time(), seq), qos=1)
            self.sent += 1

    def poll(self, timeout_s: float) -> None:
        time.sleep(timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drive(
    client: Client, mine: list[int], start_seq: int, total: int, rate: float | None, ack_s: float
) -> dict[str, Any]:
    """Publish `total` messages (at `rate`, or as fast as the window allows), wait for the acks."""
    started = time.monotonic()
    max_lag_s = 0.0
    i = 0
    tick = started
    while i < total:
        now = time.monotonic()
        due = total if rate is None else min(total, int((now - started) * rate) + 1)
        upto = min(due, client.acked + WINDOW)
        if rate is not None and upto > i:
            # How late the oldest due message leaves: the publisher's own limit, reported.
            max_lag_s = max(max_lag_s, now - (started + i / rate))
        if upto > i:
            client.send([(mine[j % len(mine)], start_seq + j // len(mine)) for j in range(i, upto)])
            i = upto
        if rate is None:
            client.poll(0.05 if upto < due else 0)
            continue
        # Paced: wake on the tick, not on each PUBACK. Woken by the acks of its last write, the
        # loop sent the two or three messages due since, one small write after another (a
        # write, a select and a read per few messages, in the broker too): the publishers
        # used up to 8 CPU us/msg and held the live phase near 25,000 msg/s on a busy machine.
        if upto < due:
            client.poll(TICK_S)  # the window is full: wait for acks, not for the tick
            continue
        tick = max(tick + TICK_S, now)
        time.sleep(max(0.0, tick - time.monotonic()))
        client.poll(0)
    publish_s = time.monotonic() - started
    deadline = time.monotonic() + ack_s
    while client.acked < client.sent and time.monotonic() < deadline:
        client.poll(0.05)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "published": client.sent,
        "acked": client.acked,
        "all_acked": client.acked >= client.sent,
        "publish_s": round(publish_s, 4),
        "elapsed_s": round(time.monotonic() - started, 4),
        "rate": round(client.sent / publish_s, 1) if publish_s > 0 else 0.0,
        "max_lag_s": round(max_lag_s, 4),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
    }


# --- the harness's side: the publisher processes of one phase, and what they sent -------------


def publish(
    mqtt_url: str, plan: Plan, tag: str, workdir: Path, *, start_seq: int, count: int = 0,
    rate: float = 0.0, duration_s: float = 0.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run the publisher processes (backlog: `count` in all; paced: `rate` in all) to the end."""
    n = plan.publishers
    start_at = time.time() + 1.5  # time to start and connect, so all begin together
    runs = []
    for index in range(n):
        argv = [sys.executable, str(Path(__file__).resolve()), "--mqtt-url", mqtt_url,
                "--client-id", f"{tag}-pub-{index}", "--client", plan.publisher,
                "--assets", str(plan.assets),
                "--index", str(index), "--of", str(n), "--start-seq", str(start_seq)]  # fmt: skip
        if count:
            argv += ["--count", str(count // n + (1 if index < count % n else 0))]
        else:
            argv += ["--rate", str(rate / n), "--duration", str(duration_s)]
            argv += ["--start-at", str(start_at)]
        log = (workdir / f"{tag}-pub-{index}.err").open("wb")
        runs.append(
            (
                subprocess.Popen(
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    cwd=Path(__file__).resolve().parents[1],
                ),
                log,
            )
        )
    reports = []
    limit_s = 120 + duration_s + count / 2000
    for popen, log in runs:
        try:
            out, _ = popen.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            out, _ = popen.communicate()
        log.close()
        if popen.returncode != 0 or not out.strip():
            raise RuntimeError(f"publisher exited with {popen.returncode}; see {log.name}")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    return reports


def expected_pairs(
    plan: Plan, reports: list[dict[str, Any]], start_seq: int
) -> set[tuple[str, int]]:
    """What the publishers sent, rebuilt from their counts (see bench/publisher.py)."""
    pairs = set()
    for index, report in enumerate(reports):
        mine = [k for k in range(plan.assets) if k % len(reports) == index]
        for i in range(report["published"]):
            pairs.add((f"a{mine[i % len(mine)]}", start_seq + i // len(mine)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mqtt-url", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--client", choices=["raw", "paho"], default="raw")
    parser.add_argument("--assets", type=int, default=1000)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--start-seq", type=int, default=0)
    parser.add_argument("--count", type=int, help="backlog mode: messages to publish")
    parser.add_argument("--rate", type=float, help="paced mode: messages per second")
    parser.add_argument("--duration", type=float, default=10.0, help="paced mode: seconds")
    parser.add_argument("--start-at", type=float, default=0.0, help="paced mode: wall time")
    parser.add_argument("--ack-timeout", type=float, default=60.0)
    parser.add_argument("--sites", type=int, default=1, help="sites the assets are spread over")
    args = parser.parse_args()
    global SITES  # noqa: PLW0603 -- set once, before the first topic is built
    SITES = args.sites

    host, port = args.mqtt_url.removeprefix("mqtt://").rsplit(":", 1)
    mine = [k for k in range(args.assets) if k % args.of == args.index]
    kind = RawClient if args.client == "raw" else PahoClient
    client: Client = kind(host, int(port), args.client_id)
    if args.count is not None:
        report = drive(client, mine, args.start_seq, args.count, None, args.ack_timeout)
    else:
        time.sleep(max(0.0, args.start_at - time.time()))
        total = int(args.rate * args.duration)
        report = drive(client, mine, args.start_seq, total, args.rate, args.ack_timeout)
    client.close()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
