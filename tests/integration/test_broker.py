"""The brokers iotbridge ships: `iotbridge broker` (embedded amqtt) and `broker/mosquitto.conf`.

Both run as real processes on free loopback ports and are stopped (or killed) by PID.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from broker.embedded import EmbeddedBroker
from config.settings import Settings
from tests.services import (
    Service,
    free_port,
    http_get,
    mosquitto_binary,
    port_open,
    require,
    set_directive,
    wait_until,
)

pytestmark = pytest.mark.integration

MOSQUITTO_CONF = Path(__file__).parents[2] / "broker" / "mosquitto.conf"


class Client:
    """A paho client on its own network thread that records what it receives."""

    def __init__(
        self,
        port: int,
        client_id: str = "",
        *,
        clean_session: bool = True,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        if auth is not None:
            self.mqtt.username_pw_set(*auth)
        self.mqtt.max_inflight_messages_set(100)
        self.port = port
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: tuple[bool, str] | None = None  # (session present, reason)
        self.subscribed = threading.Event()
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = lambda *_: self.subscribed.set()
        self.mqtt.on_message = lambda _client, _userdata, message: self.messages.append(message)

    def _on_connect(
        self,
        _client: mqtt.Client,
        _userdata: object,
        flags: mqtt.ConnectFlags,
        reason: mqtt.ReasonCode,
        _properties: object,
    ) -> None:
        self.connack = (flags.session_present, str(reason))

    def connect(self) -> Client:
        self.mqtt.connect("127.0.0.1", self.port, keepalive=30)
        self.mqtt.loop_start()
        wait_until(lambda: self.connack is not None, 10, f"CONNACK from port {self.port}")
        return self

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.mqtt.subscribe(topic, qos=1)
        assert self.subscribed.wait(10), "no SUBACK"

    def publish_all(self, topic: str, payloads: list[bytes]) -> None:
        """Publish at QoS 1 and return once the broker has acknowledged every message."""
        infos = [self.mqtt.publish(topic, payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published()

    def received(self) -> list[bytes]:
        return [message.payload for message in list(self.messages)]

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def payloads(count: int) -> list[bytes]:
    return [f"message-{index:04d}".encode() for index in range(count)]


# --- iotbridge broker (embedded amqtt) -------------------------------------------------------


def embedded_broker(workdir: Path) -> tuple[Service, int]:
    port, metrics_port = free_port(), free_port()
    env = {"IOTBRIDGE_BROKER__PORT": str(port), "IOTBRIDGE_BROKER__METRICS_PORT": str(metrics_port)}
    service = Service("broker", [sys.executable, "-m", "bridge.cli", "broker"], port, workdir, env)
    return service, metrics_port


@pytest.fixture
def broker_process(tmp_path: Path) -> Iterator[tuple[Service, int]]:
    service, metrics_port = embedded_broker(tmp_path)
    service.start()
    wait_until(lambda: port_open(metrics_port), 10, "the broker's metrics port")
    yield service, metrics_port
    service.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_embedded_broker_delivers_qos1_and_stops_cleanly(
    broker_process: tuple[Service, int], unique: str, signum: int
) -> None:
    service, metrics_port = broker_process
    subscriber = Client(service.port, f"{unique}-sub").connect()
    subscriber.subscribe(f"{unique}/#")
    publisher = Client(service.port, f"{unique}-pub").connect()
    sent = payloads(100)

    publisher.publish_all(f"{unique}/line/asset/telemetry", sent)

    wait_until(lambda: len(subscriber.messages) >= 100, 10, "100 messages at the subscriber")
    assert sorted(subscriber.received()) == sent
    assert {message.qos for message in subscriber.messages} == {1}
    assert http_get(metrics_port, "/readyz", 5) == (200, "ready\n")
    status, metrics = http_get(metrics_port, "/metrics", 5)
    assert status == 200
    assert "iotbridge_broker_listening 1.0" in metrics
    assert "iotbridge_broker_clients_connected 2.0" in metrics

    # Both clients stay connected: the broker must close live sessions on its way out.
    service.signal(signum)
    assert service.proc is not None
    assert service.proc.wait(timeout=10) == 0
    subscriber.close()
    publisher.close()
    log = service.log_path.read_text()
    assert "Traceback" not in log
    assert "broker listening" in log
    assert "broker stopped" in log


def test_embedded_broker_keeps_persistent_session(
    broker_process: tuple[Service, int], unique: str
) -> None:
    """Clean session off: QoS 1 messages published while the subscriber is away are delivered
    when it comes back with the same client id, and the CONNACK says the session was present."""
    service, metrics_port = broker_process
    subscriber = Client(service.port, f"{unique}-bridge", clean_session=False).connect()
    subscriber.subscribe(f"{unique}/#")
    subscriber.close()
    publisher = Client(service.port, f"{unique}-pub").connect()
    sent = payloads(30)

    publisher.publish_all(f"{unique}/telemetry", sent)
    publisher.close()
    # amqtt acknowledges a publish before it queues the message for subscribers, so wait.
    wait_until(
        lambda: "iotbridge_broker_queued_messages 30.0" in http_get(metrics_port, "/metrics", 5)[1],
        10,
        "30 messages queued for the offline session",
    )
    back = Client(service.port, f"{unique}-bridge", clean_session=False).connect()

    wait_until(lambda: len(back.messages) >= 30, 10, "30 queued messages after reconnecting")
    back.close()
    assert back.connack == (True, "Success")
    assert sorted(back.received()) == sent


async def test_embedded_broker_runs_in_process(unique: str) -> None:
    """The demo can run the broker on its own event loop; stop() returns promptly."""
    port = free_port()
    registry = CollectorRegistry()
    component = EmbeddedBroker(Settings(broker={"port": port, "metrics_port": 0}), registry)
    stop = asyncio.Event()
    assert component.readiness()[0] is False

    async with asyncio.TaskGroup() as group:
        task = group.create_task(component.run(stop), name="broker")
        async with asyncio.timeout(10):
            await component.listening.wait()
        assert component.readiness() == (True, "")
        assert registry.get_sample_value("iotbridge_broker_listening") == 1.0
        v311 = aiomqtt.ProtocolVersion.V311
        async with aiomqtt.Client(
            "127.0.0.1", port, identifier=f"{unique}-sub", protocol=v311
        ) as sub:
            await sub.subscribe(f"{unique}/#", qos=1)
            async with aiomqtt.Client("127.0.0.1", port, protocol=v311) as pub:
                await pub.publish(f"{unique}/telemetry", b"one", qos=1)
            async with asyncio.timeout(10):
                message = await anext(sub.messages)
        assert (message.payload, message.qos) == (b"one", 1)
        stop.set()
        async with asyncio.timeout(10):
            await task

    assert component.readiness()[0] is False
    assert registry.get_sample_value("iotbridge_broker_listening") == 0.0


def test_embedded_broker_fails_on_a_busy_port(tmp_path: Path) -> None:
    """A port in use is a non-zero exit that names the address, not a broker that never listens."""
    holder, _ = embedded_broker(tmp_path)
    holder.start()
    env = {
        **os.environ,
        "IOTBRIDGE_BROKER__PORT": str(holder.port),
        "IOTBRIDGE_BROKER__METRICS_PORT": str(free_port()),
    }
    try:
        proc = subprocess.run(
            holder.argv, env=env, capture_output=True, timeout=30, check=False, text=True
        )
    finally:
        holder.stop()
    assert proc.returncode != 0
    assert f"embedded broker cannot listen on mqtt://127.0.0.1:{holder.port}" in proc.stderr


# --- broker/mosquitto.conf in a real mosquitto -----------------------------------------------


def shipped_conf_for_test(tmp_path: Path, port: int, credentials: tuple[str, str]) -> Path:
    """broker/mosquitto.conf with only what a test must change: port, paths, user; ACL off."""
    binary = require(mosquitto_binary(), "mosquitto")
    passwd_tool = require(
        shutil.which("mosquitto_passwd")
        or shutil.which("mosquitto_passwd", path=str(Path(binary).parent)),
        "mosquitto_passwd",
    )
    data = tmp_path / "data"
    data.mkdir()
    passwd = tmp_path / "passwd"
    subprocess.run([passwd_tool, "-b", "-c", str(passwd), *credentials], check=True, timeout=30)
    conf = MOSQUITTO_CONF.read_text()
    conf = set_directive(conf, "listener", f"{port} 127.0.0.1")
    conf = set_directive(conf, "persistence_location", f"{data}/")
    conf = set_directive(conf, "password_file", str(passwd))
    conf = re.sub(r"^acl_file ", "#acl_file ", conf, flags=re.MULTILINE)
    if os.geteuid() == 0:
        # As root, mosquitto drops to the `mosquitto` user, which cannot enter pytest's 0700 tmp.
        conf = set_directive(conf, "user", "root")
    path = tmp_path / "mosquitto.conf"
    path.write_text(conf)
    return path


def autosave_interval_s() -> int:
    """The shipped broker's save interval (seconds)."""
    match = re.search(r"^autosave_interval (\d+)$", MOSQUITTO_CONF.read_text(), re.MULTILINE)
    assert match, "broker/mosquitto.conf sets autosave_interval"
    return int(match.group(1))


def _db_inode(data: Path) -> int | None:
    try:
        return (data / "mosquitto.db").stat().st_ino
    except FileNotFoundError:
        return None


def wait_for_save(data: Path) -> float:
    """Wait for the broker's next completed save of its persistence file; seconds waited.

    Call it right after the last PUBACK that matters. Mosquitto is single-threaded and stores a
    message before it acknowledges it, so a save that completes after that PUBACK was received
    holds the message. Each save writes `mosquitto.db.new` and renames it over the old file: a
    new inode is a completed save.
    """
    before, started = _db_inode(data), time.monotonic()
    # Mosquitto saves when more than autosave_interval whole seconds have passed: the interval plus
    # one second, plus the save (a few kilobytes here) and a margin for a busy machine.
    bound_s = autosave_interval_s() + 1 + 10
    wait_until(lambda: _db_inode(data) not in (None, before), bound_s, "the broker's next save")
    return time.monotonic() - started


def test_mosquitto_conf_keeps_queued_messages_across_kill_9(tmp_path: Path, unique: str) -> None:
    port = free_port()
    credentials = ("iotbridge", "test-password")
    conf = shipped_conf_for_test(tmp_path, port, credentials)
    binary = require(mosquitto_binary(), "mosquitto")
    service = Service("mosquitto", [binary, "-c", str(conf)], port, tmp_path)
    service.start()
    try:
        anonymous = Client(port, f"{unique}-anon").connect()
        anonymous.mqtt.loop_stop()
        assert anonymous.connack == (False, "Not authorized")  # allow_anonymous false

        bridge_id = f"{unique}-bridge"
        subscriber = Client(port, bridge_id, clean_session=False, auth=credentials).connect()
        subscriber.subscribe(f"{unique}/#")
        subscriber.close()
        publisher = Client(port, f"{unique}-pub", auth=credentials).connect()
        sent = payloads(50)
        publisher.publish_all(f"{unique}/telemetry", sent)
        publisher.close()
        # The loss window: what was acknowledged before the broker's next save survives a kill -9;
        # that save comes within autosave_interval (+1 s: mosquitto counts whole seconds).
        waited_s = wait_for_save(tmp_path / "data")
        assert waited_s <= autosave_interval_s() + 1 + 10

        service.kill()
        service.start()
        back = Client(port, bridge_id, clean_session=False, auth=credentials).connect()
        wait_until(lambda: len(back.messages) >= 50, 15, "50 queued messages after kill -9")
        back.close()
    finally:
        service.stop()

    assert back.connack == (True, "Success")
    assert sorted(back.received()) == sent
    assert "Error" not in service.log_path.read_text()  # e.g. "Error saving in-memory database"
