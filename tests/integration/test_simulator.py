"""The simulator against a real broker: every message scheduled is published, acknowledged and
delivered to a subscriber; the report and the command line say so; several processes; a
1,000-asset scenario through the bridge into Redis, audited (lost 0, then exactly what a test
deletes); and a broker that stops acknowledging: bounded memory, every skipped message counted,
publishes given up without a PUBACK accounted for by the audit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client import CollectorRegistry

from config.keys import Keys
from config.settings import Settings
from simulators.app import SimulatorApp
from simulators.scenario import Scenario
from tests.clients import running_bridge
from tests.faults import rss_bytes
from tests.services import Service, free_port, http_get, mosquitto_service, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REPORT_KEYS = {
    "assets",
    "connections",
    "qos",
    "target_rate",
    "duration_s",
    "sent",
    "acked",
    "failed",
    "achieved_rate_msgs_per_s",
    "publish_ack_latency_s",
}


class Subscriber:
    """A plain paho client on its own network thread, recording every message it receives."""

    def __init__(self, url_and_protocol: tuple[str, str], topic_filter: str, client_id: str):
        settings = Settings(mqtt={"url": url_and_protocol[0]})
        protocol = (
            MQTTProtocolVersion.MQTTv5
            if url_and_protocol[1] == "5"
            else MQTTProtocolVersion.MQTTv311
        )
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes]] = []
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol
        )
        self._client.on_connect = lambda client, *_: client.subscribe(topic_filter, qos=1)
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(settings.mqtt.host, settings.mqtt.port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"no SUBACK for {topic_filter}")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append((message.topic, bytes(message.payload)))

    @property
    def messages(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self._messages)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def subscriber(mqtt_broker: tuple[str, str], unique: str) -> Iterator[Subscriber]:
    client = Subscriber(mqtt_broker, f"{unique}/plant/#", f"{unique}-sub")
    yield client
    client.close()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    await asyncio.to_thread(wait_until, condition, timeout_s, what)


async def run_app(settings: Settings, **options: Any) -> tuple[SimulatorApp, CollectorRegistry]:
    registry = CollectorRegistry()
    app = SimulatorApp(settings, registry, **options)
    async with asyncio.timeout(settings.simulator.duration_s + 30):
        await app.run(asyncio.Event())
    return app, registry


async def test_every_message_is_acked_and_delivered(
    make_settings: Callable[..., Settings], subscriber: Subscriber, unique: str
) -> None:
    settings = make_settings(simulator={"assets": 200, "rate_hz": 5, "duration_s": 2, "qos": 1})
    expected = 200 * 5 * 2

    app, registry = await run_app(settings)

    report = app.report()
    assert report["sent"] == report["acked"] == expected
    assert report["failed"] == 0
    assert report["unsent"] == 0
    assert report["connections"] == 1
    assert report["publish_ack_latency_s"]["p50"] is not None
    assert report["achieved_rate_msgs_per_s"] == pytest.approx(1000, rel=0.1)
    await eventually(lambda: len(subscriber.messages) >= expected, f"{expected} messages")
    received = subscriber.messages
    assert len(received) == report["acked"]
    per_asset: dict[str, set[int]] = {}
    for topic, payload in received:
        assert topic.startswith(f"{unique}/plant/s")
        assert topic.endswith("/telemetry")
        per_asset.setdefault(topic.split("/")[4], set()).add(json.loads(payload)["seq"])
    assert len(per_asset) == 200
    assert all(seqs == set(range(10)) for seqs in per_asset.values())

    def metric(name: str) -> float | None:
        return registry.get_sample_value(f"iotbridge_simulator_{name}")

    assert metric("messages_sent_total") == metric("messages_acked_total") == expected
    assert metric("publish_ack_seconds_count") == expected
    assert metric("assets") == 200
    assert metric("connections") == 0  # all closed after the run


async def test_report_has_the_documented_keys(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        simulator={
            "assets": 30,
            "rate_hz": 2,
            "duration_s": 1,
            "qos": 0,
            "assets_per_connection": 10,
        }
    )
    app, _ = await run_app(settings)

    report = json.loads(json.dumps(app.report()))
    assert set(report) >= REPORT_KEYS
    assert set(report["publish_ack_latency_s"]) == {"p50", "p90", "p99", "max"}
    assert report["connections"] == 3
    assert report["qos"] == 0
    assert report["sent"] == report["acked"] == 60  # QoS 0: acked means written to the socket
    assert set(report["publish_ack_latency_s"].values()) == {None}
    assert report["target_rate"] == 60
    assert report["duration_s"] == 1


async def test_stop_ends_the_run_early(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(simulator={"assets": 10, "rate_hz": 2, "duration_s": 60, "qos": 1})
    app = SimulatorApp(settings, CollectorRegistry())
    stop = asyncio.Event()
    assert app.readiness()[0] is False
    run = asyncio.create_task(app.run(stop))
    await eventually(lambda: app.readiness()[0] and app.report()["acked"] >= 10, "first acks")

    stop.set()
    async with asyncio.timeout(10):
        await run

    report = app.report()
    assert report["sent"] == report["acked"] > 0
    assert report["failed"] == 0
    assert report["unsent"] > 0
    assert report["elapsed_s"] < 30
    assert app.readiness() == (False, "finished")


async def test_unreachable_broker_fails_publishes_as_not_connected(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(
        mqtt={"url": f"mqtt://127.0.0.1:{free_port()}", "connect_timeout_s": 0.3},
        simulator={"assets": 5, "rate_hz": 2, "duration_s": 0.5},
    )
    app, _ = await run_app(settings)

    report = app.report()
    assert report["sent"] == report["acked"] == 0
    assert report["failed_by_kind"] == {"not_connected": 5}


def test_command_line_prints_one_json_report(mqtt_broker: tuple[str, str], unique: str) -> None:
    url, protocol = mqtt_broker
    env = {
        **os.environ,
        "IOTBRIDGE_MQTT__URL": url,
        "IOTBRIDGE_MQTT__PROTOCOL": protocol,
        "IOTBRIDGE_SIMULATOR__METRICS_PORT": "0",
        "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": unique,
    }
    args = ["simulate", "--assets", "50", "--rate", "2", "--duration", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    report = json.loads(lines[0])
    assert report["sent"] == report["acked"] == 100
    assert report["failed"] == 0
    assert "simulator finished" in done.stderr


def payloads_without_ts(received: list[tuple[str, bytes]]) -> Counter[tuple[str, str]]:
    out: Counter[tuple[str, str]] = Counter()
    for topic, payload in received:
        try:
            body = json.loads(payload)
            body.pop("ts", None)
            out[(topic, json.dumps(body, sort_keys=True))] += 1
        except ValueError:
            out[(topic, payload.hex())] += 1
    return out


async def test_two_processes_deliver_exactly_what_they_report(
    make_settings: Callable[..., Settings], subscriber: Subscriber
) -> None:
    settings = make_settings(simulator={"assets": 300, "rate_hz": 4, "duration_s": 2, "qos": 1,
                                        "assets_per_connection": 50, "processes": 2})  # fmt: skip

    app, registry = await run_app(settings)

    report = app.report()
    assert report["processes"] == 2
    assert report["sent"] == report["acked"] == 300 * 4 * 2
    await eventually(lambda: len(subscriber.messages) >= report["sent"], "every message")
    assert len(subscriber.messages) == report["sent"]
    assert registry.get_sample_value("iotbridge_simulator_messages_acked_total") == report["acked"]
    assert registry.get_sample_value("iotbridge_simulator_processes") == 2


async def test_same_seed_same_messages(
    make_settings: Callable[..., Settings], mqtt_broker: tuple[str, str], unique: str
) -> None:
    runs = []
    for attempt in range(2):
        client = Subscriber(mqtt_broker, f"{unique}/plant/#", f"{unique}-sub{attempt}")
        try:
            settings = make_settings(
                simulator={"assets": 40, "rate_hz": 5, "duration_s": 1, "seed": 11,
                           "anomaly_rate": 0.05, "client_id_prefix": f"{unique}-r{attempt}"}
            )  # fmt: skip
            await run_app(settings)
            await eventually(lambda: len(client.messages) >= 200, "200 messages")  # noqa: B023
            runs.append(payloads_without_ts(client.messages))
        finally:
            client.close()
    assert runs[0] == runs[1]
    assert sum(runs[0].values()) == 200


SCENARIO = {
    "name": "pipeline",
    "seed": 5,
    "duration_s": 4,
    "warmup_s": 1,
    "fleet": {"assets": 1000, "assets_per_connection": 250},
    "rates": {"rate_hz": 1.0, "qos": 1, "anomaly_rate": 0.0},
    "injections": [
        {"kind": "spike", "count": 3, "duration_s": 1},
        {"kind": "drift", "count": 2, "duration_s": 2},
        {"kind": "stuck", "count": 2, "duration_s": 2},
        {"kind": "dropout", "count": 2, "duration_s": 2},
        {"kind": "out_of_range", "count": 2, "duration_s": 1},
    ],
    "faults": [
        {"kind": "malformed", "count": 3},
        {"kind": "wrong_type", "count": 3},
        {"kind": "oversized", "count": 2},
        {"kind": "duplicate", "count": 5},
        {"kind": "out_of_order", "count": 5},
        {"kind": "restart", "count": 3},
        {"kind": "clock_skew", "count": 2, "duration_s": 2, "skew_s": 3600},
    ],
}


def audit_cli(acked: Path, settings: Settings) -> tuple[int, dict[str, Any]]:
    env = {
        **os.environ,
        "IOTBRIDGE_REDIS__URL": settings.redis.url,
        "IOTBRIDGE_REDIS__KEY_PREFIX": settings.redis.key_prefix,
        "IOTBRIDGE_REDIS__STREAM_SHARDS": str(settings.redis.stream_shards),
    }
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "audit", "--acked", str(acked)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


async def test_scenario_through_the_bridge_audits_clean_then_counts_what_is_deleted(
    make_settings: Callable[..., Settings], subscriber: Subscriber, tmp_path: Path
) -> None:
    import redis

    scenario = Scenario.model_validate(SCENARIO)
    base = make_settings(redis={"stream_shards": 2})
    settings = base.model_copy(update={"simulator": scenario.apply(base.simulator)})
    truth, acked = tmp_path / "truth.jsonl", tmp_path / "acked.jsonl"

    async with running_bridge(settings) as bridge:
        app, _ = await run_app(settings, scenario=scenario, ground_truth=truth, acked=acked)
        report = app.report()
        keys = Keys(settings.redis.key_prefix, 2)
        db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
        streams = keys.telemetry_streams("telemetry")

        def settled() -> bool:
            metric = bridge.registry.get_sample_value
            received = sum(metric("iotbridge_bridge_messages_received_total", {"route": r}) or 0
                           for r in ("telemetry",))  # fmt: skip
            return received >= report["sent"] and bridge.readiness()[0]

        await eventually(lambda: len(subscriber.messages) >= report["sent"], "every message")
        await eventually(settled, "the bridge to take every message")
        # Every message is written, dead-lettered or a duplicate dropped by the bridge.
        expected = report["sent"] - 5
        await eventually(lambda: sum(db.xlen(k) for k in streams) + db.xlen(keys.dead_letters)
                         >= expected, "the writes")  # fmt: skip

    # What the simulator reports is what the broker delivered.
    assert report["failed"] == 0
    assert len(subscriber.messages) == report["sent"] == report["acked"]
    assert report["scheduled"] == 4000
    assert report["faults"] == {"clock_skew": 4, "duplicate": 5, "malformed": 3, "oversized": 2,
                                "out_of_order": 5, "restart": 3, "wrong_type": 3}  # fmt: skip
    assert report["anomalies"] == {"drift": 2, "dropout": 2, "out_of_range": 2, "spike": 3,
                                   "stuck": 2}  # fmt: skip
    regular = report["scheduled"] - report["silenced"]
    assert report["sent"] == regular + 5 + 3 + 3 + 2  # duplicates and the three bad kinds extra

    # The ground truth lists every planned injection, once.
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    assert sorted((r["kind"], r["asset"]) for r in records) == sorted(
        (e.kind, f"a{e.index + 1:06d}") for e in app.events
    )
    assert all(r["start"] is not None and r["start"] <= r["end"] for r in records)

    # A clean pipeline: nothing lost, nothing twice, nothing unexpected; bad messages dead-lettered.
    code, audit = audit_cli(acked, settings)
    assert code == 0, audit
    assert (audit["lost"], audit["duplicated"], audit["unexpected"]) == (0, 0, 0), audit
    assert audit["acked"] == audit["found"] == regular - 4  # the skewed messages are not audited
    assert audit["dead_letters"] == 3 + 3 + 2 + 4
    assert audit["streams"] == streams

    # The negative control: exactly what is deleted is reported lost.
    doomed = [str(entry_id) for entry_id, _ in db.xrange(streams[0], count=7) or []]
    assert db.xdel(streams[0], *doomed) == 7
    code, audit = audit_cli(acked, settings)
    assert code == 1
    assert audit["lost"] == 7
    assert audit["found"] == regular - 4 - 7


# --- a broker that stops acknowledging ----------------------------------------------------------


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Service]:
    """A mosquitto of this test's own, which it may stop (SIGSTOP) without harming the others."""
    service = mosquitto_service(tmp_path / "mosquitto")
    if service is None:
        pytest.skip("needs mosquitto")
    service.start()
    yield service
    service.signal(signal.SIGCONT)
    service.stop()


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a /metrics page (0 when the series is not there yet)."""
    for line in text.splitlines():
        if line.startswith(name + labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_stopped_broker_costs_bounded_memory_and_every_skipped_message_is_counted(
    own_broker: Service, unique: str, tmp_path: Path
) -> None:
    """The broker stops reading (SIGSTOP) while 4,000 assets publish 4,000 msg/s: the simulator
    holds at most max_outstanding unacknowledged, its memory stays flat, and what it could not
    send is skipped, logged, counted in /metrics and in the report (sent + skipped = scheduled)."""
    port = free_port()
    env = {
        **os.environ,
        "IOTBRIDGE_MQTT__URL": f"mqtt://127.0.0.1:{own_broker.port}",
        "IOTBRIDGE_MQTT__PROTOCOL": "5",
        "IOTBRIDGE_SIMULATOR__METRICS_PORT": str(port),
        "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": unique,
        "IOTBRIDGE_SIMULATOR__ASSETS_PER_CONNECTION": "200",
        "IOTBRIDGE_SIMULATOR__MAX_OUTSTANDING": "300",
        "IOTBRIDGE_SIMULATOR__MAX_LAG_S": "0.5",
        "IOTBRIDGE_SIMULATOR__ACK_TIMEOUT_S": "5",
    }
    args = ["simulate", "--assets", "4000", "--rate", "1", "--duration", "8", "--no-progress"]
    log = (tmp_path / "simulator.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
    try:
        page = {"text": ""}

        def scraped(predicate: Callable[[str], bool]) -> bool:
            assert proc.poll() is None, "the simulator ended early"
            status, page["text"] = http_get(port, "/metrics", 1)
            return status == 200 and predicate(page["text"])

        sent = "iotbridge_simulator_messages_sent_total"
        wait_until(lambda: scraped(lambda t: metric(t, sent) >= 2000), 30, "publishing")
        own_broker.signal(signal.SIGSTOP)
        sent_at_stop = metric(page["text"], sent)
        rss_stopped, outstanding, rss = rss_bytes(proc.pid), [], []
        behind = 'iotbridge_simulator_messages_failed_total{kind="behind_schedule"}'

        def skipped_enough(text: str) -> bool:
            outstanding.append(metric(text, "iotbridge_simulator_outstanding_messages"))
            rss.append(rss_bytes(proc.pid))
            return metric(text, behind) >= 6000  # 1.5 s of the schedule

        wait_until(lambda: scraped(skipped_enough), 30, "skipped messages", poll_s=0.1)
        sent_stopped = metric(page["text"], sent)
        own_broker.signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=60)
    finally:
        own_broker.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    assert max(outstanding) <= 300
    assert max(rss) - rss_stopped < 20e6, (rss_stopped, max(rss))
    # Sent once stopped: at most max_outstanding, and what the last progress report (every
    # 0.5 s) had not counted yet.
    assert sent_stopped - sent_at_stop <= 300 + 4000
    report = json.loads(out.splitlines()[-1])
    assert proc.returncode == 1  # a run that could not keep its schedule says so
    assert report["skipped_by_reason"]["behind_schedule"] >= 6000
    assert report["sent"] - report["extras_sent"] + report["skipped"] == report["scheduled"]
    assert report["scheduled"] == 4000 * 8
    assert report["acked"] + report["unconfirmed"] == report["sent"]
    assert report["failed_by_kind"]["behind_schedule"] == report["skipped_by_reason"][
        "behind_schedule"]  # fmt: skip
    assert "fell behind the schedule" in (tmp_path / "simulator.log").read_text()


class AckSwallower:
    """A TCP proxy to the broker that forwards everything, except that once `swallowing` nothing
    goes back to the client: the broker takes the publishes, their PUBACKs are lost."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.swallowing = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> AckSwallower:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        for src, dst, down in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pipe(src, dst, down))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, down: bool) -> None:
        try:
            while chunk := await src.read(65536):
                if not (down and self.swallowing):
                    dst.write(chunk)
                    await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()


async def test_publishes_given_up_unacknowledged_reach_the_audit_as_unconfirmed(
    make_settings: Callable[..., Settings],
    mqtt_broker: tuple[str, str],
    unique: str,
    tmp_path: Path,
) -> None:
    """The PUBACKs stop coming back (the broker takes the publishes, the way back is cut); the
    simulator gives up what is in flight at the end of its run. The bridge stored those all the
    same: the audit counts them as unconfirmed, neither acknowledged nor unexpected, and finds
    every acknowledged message."""
    import redis

    broker_port = int(mqtt_broker[0].rsplit(":", 1)[1])
    acked = tmp_path / "acked.jsonl"
    async with AckSwallower(broker_port) as proxy:
        bridge_settings = make_settings()
        settings = make_settings(
            mqtt={"url": f"mqtt://127.0.0.1:{proxy.port}"},
            simulator={"assets": 200, "rate_hz": 5, "duration_s": 3, "qos": 1,
                       "anomaly_rate": 0.0, "assets_per_connection": 100, "ack_timeout_s": 0.5,
                       "max_lag_s": 0.5},
        )  # fmt: skip
        keys = Keys(settings.redis.key_prefix, settings.redis.stream_shards)
        db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
        streams = keys.telemetry_streams("telemetry")
        async with running_bridge(bridge_settings):
            app = SimulatorApp(settings, CollectorRegistry(), acked=acked)
            run = asyncio.create_task(app.run(asyncio.Event()))
            await eventually(lambda: app.report()["acked"] >= 500, "first acks")
            proxy.swallowing = True
            async with asyncio.timeout(30):
                await run
            report = app.report()
            assert report["unconfirmed"] > 0
            await eventually(lambda: sum(db.xlen(k) for k in streams) >= report["sent"],
                             "the bridge to store what the broker took")  # fmt: skip

    code, audit = audit_cli(acked, settings)
    assert code == 0, audit
    assert (audit["lost"], audit["duplicated"], audit["unexpected"]) == (0, 0, 0), audit
    assert audit["acked"] == audit["found"] == report["acked"]
    assert audit["unconfirmed"] == report["unconfirmed"]
    assert report["sent"] == report["acked"] + report["unconfirmed"]
    assert report["sent"] + report["skipped"] == report["scheduled"]
