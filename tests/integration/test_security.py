"""Who may do what, end to end, with the shipped configuration, as processes.

mosquitto runs broker/mosquitto.conf adapted as compose.yaml adapts it (a password file made with
`mosquitto_passwd -b`, broker/acl) plus a TLS listener that requires a client certificate, with
the throwaway material of broker/make-dev-certs.sh. redis-server runs compose.yaml's ACL users.
A bridge process connects with mutual TLS as MQTT user `iotbridge` and writes to Redis as user
`bridge`; a worker process reads as user `worker`. Each device logs in with a certificate and its
asset id as user name. A refused publish is only visible as a PUBACK reason code (MQTT 5), so
"nothing was delivered" is proven by a message sent after it on the same connection arriving.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from config.keys import Keys, shard_of
from tests.compose_config import (
    PASSWORDS,
    REDIS_PASSWORDS,
    ROOT,
    mosquitto_as_compose_runs_it,
    redis_with_compose_acl,
)
from tests.faults import Bridge, rows
from tests.services import Service, free_port, http_get, port_open, wait_until

pytestmark = pytest.mark.integration

# Two devices, named by asset id as the ACL's `pattern write plant/+/+/%u/#` expects.
DEVICES = {"press-1": "pressSecret6", "pump-2": "pumpSecret7"}
PRESS, PUMP = DEVICES
# As compose.yaml: telemetry streams split by asset.
SHARDS = 4
ROUTE = "telemetry"
NOT_AUTHORIZED = 135  # MQTT 5 reason code, in CONNACK and PUBACK
TIMEOUT_S = 20


def topic(site: str, asset: str) -> str:
    """The shipped default route: plant/{site}/{line}/{asset}/telemetry."""
    return f"plant/{site}/l1/{asset}/telemetry"


def payload(seq: int, temperature: float = 50.0) -> bytes:
    return json.dumps(
        {"ts": time.time(), "seq": seq, "values": {"temperature": temperature}}
    ).encode()


# --- the plant ------------------------------------------------------------------------------------


@dataclass
class Plant:
    prefix: str
    mqtt_port: int
    tls_port: int
    redis_port: int
    certs: Path
    rogue_certs: Path
    bridge: Bridge
    worker: Service

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix, SHARDS)

    def redis_as(self, user: str) -> redis.Redis:
        """A Redis client logged in as one of compose's users (`default`: no login)."""
        secret = REDIS_PASSWORDS.get(user)
        return redis.Redis(port=self.redis_port, username=user if secret else None,
                           password=PASSWORDS[secret] if secret else None, socket_timeout=5)  # fmt: skip

    def entries(self, site: str) -> list[tuple[str, int]]:
        """(asset, seq) of this site's telemetry entries, over every shard stream, in stream order
        per shard."""
        admin = self.redis_as("admin")
        try:
            return [(fields["asset"].decode(), int(fields["seq"]))
                    for key in self.keys.telemetry_streams(ROUTE)
                    for _, fields in rows(admin, key) if fields["site"].decode() == site]  # fmt: skip
        finally:
            admin.close()

    def dead_letters(self, site: str) -> list[dict[str, bytes]]:
        admin = self.redis_as("admin")
        try:
            return [fields for _, fields in rows(admin, self.keys.dead_letters)
                    if f"/{site}/".encode() in fields["topic"]]  # fmt: skip
        finally:
            admin.close()

    def logs(self) -> str:
        return f"--- bridge\n{self.bridge.tail()}\n--- worker\n{self.worker.tail()}"


def make_certs(directory: Path, *clients: str) -> Path:
    subprocess.run(["sh", str(ROOT / "broker" / "make-dev-certs.sh"), str(directory), *clients],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return directory


def _wait_ready(port: int, alive: Callable[[], bool], what: str) -> None:
    wait_until(lambda: http_get(port, "/readyz", 1)[0] == 200 or not alive(), TIMEOUT_S, what)


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plant]:
    workdir = tmp_path_factory.mktemp("security")
    certs = make_certs(workdir / "certs", "bridge", *DEVICES)
    # The same names under a CA the broker does not trust.
    rogue_certs = make_certs(workdir / "rogue-certs", "bridge", *DEVICES)
    prefix = "s" + uuid.uuid4().hex[:8]
    services: list[Service] = []
    bridge: Bridge | None = None
    try:
        redis_server = redis_with_compose_acl(workdir, prefix)
        services.append(redis_server.start())

        mqtt_port, tls_port = free_port(), free_port()
        tls_listener = (
            f"listener {tls_port} 127.0.0.1\n"
            f"cafile {certs / 'ca.crt'}\ncertfile {certs / 'server.crt'}\n"
            f"keyfile {certs / 'server.key'}\nrequire_certificate true\n"
        )
        broker = mosquitto_as_compose_runs_it(
            workdir / "mosquitto", mqtt_port, users=DEVICES, extra_conf=tls_listener
        )
        services.append(broker.start())
        wait_until(lambda: port_open(tls_port), TIMEOUT_S, "mosquitto's TLS listener")

        common = {
            "IOTBRIDGE_REDIS__STREAM_SHARDS": str(SHARDS),
            "IOTBRIDGE_BACKOFF__MAX_S": "1",
        }
        bridge = Bridge(
            workdir / "bridge",
            mqtt_url=f"mqtts://localhost:{tls_port}",
            redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
            name=prefix,
            env={
                **common,
                "IOTBRIDGE_MQTT__USERNAME": "iotbridge",
                "IOTBRIDGE_MQTT__PASSWORD": PASSWORDS["MQTT_PASSWORD"],
                "IOTBRIDGE_MQTT__TLS__CA_FILE": str(certs / "ca.crt"),
                "IOTBRIDGE_MQTT__TLS__CERT_FILE": str(certs / "bridge.crt"),
                "IOTBRIDGE_MQTT__TLS__KEY_FILE": str(certs / "bridge.key"),
                "IOTBRIDGE_REDIS__USERNAME": "bridge",
                "IOTBRIDGE_REDIS__PASSWORD": PASSWORDS["REDIS_BRIDGE_PASSWORD"],
            },
        )
        bridge.start(ready_timeout_s=TIMEOUT_S)

        worker_port = free_port()
        worker = Service("worker", [sys.executable, "-m", "bridge.cli", "worker"], worker_port,
                         workdir / "worker", {
            **common,
            "IOTBRIDGE_REDIS__URL": f"redis://127.0.0.1:{redis_server.port}/0",
            "IOTBRIDGE_REDIS__KEY_PREFIX": prefix,
            "IOTBRIDGE_REDIS__USERNAME": "worker",
            "IOTBRIDGE_REDIS__PASSWORD": PASSWORDS["REDIS_WORKER_PASSWORD"],
            "IOTBRIDGE_WORKER__METRICS_PORT": str(worker_port),
            "IOTBRIDGE_WORKER__BLOCK_MS": "200",
        })  # fmt: skip
        services.append(worker.start())
        proc = worker.proc
        assert proc is not None
        _wait_ready(worker_port, lambda: proc.poll() is None, "the worker's /readyz")
        assert proc.poll() is None, worker.tail()

        yield Plant(prefix, mqtt_port, tls_port, redis_server.port, certs, rogue_certs, bridge,
                    worker)  # fmt: skip
    finally:
        if bridge is not None:
            bridge.close()
        for service in reversed(services):
            service.stop(timeout_s=15)


# --- MQTT clients ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a connection attempt ended: the CONNACK reason code, or none and why."""

    connack: int | None
    error: str | None = None


def _client(
    plant: Plant, *, user: str | None, password: str | None, cert: str | None, rogue: bool = False
) -> mqtt.Client:
    """An MQTT 5 client; with `cert` (a name made by make-dev-certs.sh) it talks TLS, trusting the
    test CA and presenting that certificate, from the rogue CA when `rogue`."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"sec-{uuid.uuid4().hex[:10]}")  # fmt: skip
    if user is not None:
        client.username_pw_set(user, password)
    if cert is not None:
        directory = plant.rogue_certs if rogue else plant.certs
        certfile = str(directory / f"{cert}.crt") if cert else None
        keyfile = str(directory / f"{cert}.key") if cert else None
        client.tls_set(ca_certs=str(plant.certs / "ca.crt"), certfile=certfile, keyfile=keyfile)
    return client


def attempt(
    plant: Plant,
    port: int,
    *,
    user: str | None = None,
    password: str | None = None,
    cert: str | None = None,
    rogue: bool = False,
) -> Outcome:
    """Connect once and report the CONNACK, or why the connection ended without one.
    `cert=""` talks TLS without presenting a certificate."""
    client = _client(plant, user=user, password=password, cert=cert, rogue=rogue)
    done = threading.Event()
    seen: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        seen["connack"] = rc.value
        done.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        seen.setdefault("error", f"disconnected: {rc}")
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:  # the TLS handshake failed within connect()
        return Outcome(None, f"connect failed: {exc!r}")
    # Driven from this thread: paho's own loop thread would try to reconnect after a refusal.
    deadline = time.monotonic() + TIMEOUT_S
    while not done.is_set() and time.monotonic() < deadline:
        client.loop(timeout=0.05)
    assert done.is_set(), "neither a CONNACK nor a disconnect came"
    outcome = Outcome(seen.get("connack"), seen.get("error"))
    client.disconnect()
    return outcome


class Session:
    """A connected MQTT 5 client over TLS with certificate and password; publishes at QoS 1 and
    returns each PUBACK's reason code; records what it receives."""

    def __init__(self, plant: Plant, user: str, password: str, cert: str) -> None:
        self.client = _client(plant, user=user, password=password, cert=cert)
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.received: list[tuple[str, bytes]] = []
        self.connack: int | None = None
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", plant.tls_port, keepalive=30)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, TIMEOUT_S, f"CONNACK for {user}")
        assert self.connack == 0, f"{user} refused: {self.connack}"

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack = rc.value

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        self.pubacks[mid] = rc.value

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any
    ) -> None:
        self.subacks[mid] = [rc.value for rc in rcs]

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload)))

    def publish(self, topic_: str, body: bytes) -> int:
        """Publish at QoS 1; the PUBACK's reason code (MQTT 5: 135 when the ACL refused it)."""
        mid = self.client.publish(topic_, body, qos=1).mid
        wait_until(lambda: mid in self.pubacks, TIMEOUT_S, f"PUBACK of {topic_}")
        return self.pubacks[mid]

    def subscribe(self, filter_: str) -> list[int]:
        _, mid = self.client.subscribe(filter_, qos=1)
        assert mid is not None
        wait_until(lambda: mid in self.subacks, TIMEOUT_S, f"SUBACK of {filter_}")
        return self.subacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def sessions(plant: Plant) -> Iterator[Callable[[str, str, str], Session]]:
    opened: list[Session] = []

    def open_(user: str, password: str, cert: str) -> Session:
        opened.append(Session(plant, user, password, cert))
        return opened[-1]

    yield open_
    for session in opened:
        session.close()


def device(sessions: Callable[[str, str, str], Session], asset: str) -> Session:
    return sessions(asset, DEVICES[asset], asset)


def accepted(reason_code: int) -> bool:
    """A PUBACK reason code below 128 is a success (0, or 16: no subscriber matched)."""
    return reason_code < 128


# --- MQTT: authentication -------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["plaintext", "tls"])
@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), (PRESS, "wrong"), (PRESS, DEVICES[PUMP]), ("nobody", "nothing")],
    ids=["anonymous", "wrong-password", "another-devices-password", "unknown-user"],
)
def test_a_client_without_valid_credentials_is_not_authorised(
    plant: Plant, listener: str, user: str | None, password: str | None
) -> None:
    if listener == "tls":  # a valid certificate does not replace the password
        outcome = attempt(plant, plant.tls_port, user=user, password=password, cert=PRESS)
    else:
        outcome = attempt(plant, plant.mqtt_port, user=user, password=password)
    assert outcome.connack == NOT_AUTHORIZED, outcome


@pytest.mark.parametrize("case", ["plaintext", "no-certificate", "certificate-of-another-ca"])
def test_the_tls_port_refuses_plaintext_and_untrusted_clients(plant: Plant, case: str) -> None:
    credentials: dict[str, Any] = {"user": PRESS, "password": DEVICES[PRESS]}
    if case == "no-certificate":
        credentials["cert"] = ""
    elif case == "certificate-of-another-ca":
        credentials.update(cert=PRESS, rogue=True)
    outcome = attempt(plant, plant.tls_port, **credentials)
    # No CONNACK at all: the connection ends before MQTT, whatever the password.
    assert outcome.connack is None, outcome
    assert outcome.error is not None


@pytest.mark.parametrize(("user", "cert"), [(PRESS, PRESS), (PUMP, PUMP), ("iotbridge", "bridge")])
def test_tls_with_a_trusted_certificate_and_the_password_is_accepted(
    plant: Plant, user: str, cert: str
) -> None:
    password = DEVICES.get(user) or PASSWORDS["MQTT_PASSWORD"]
    assert attempt(plant, plant.tls_port, user=user, password=password, cert=cert) == Outcome(0)


def test_the_bridge_process_is_connected_with_mutual_tls(plant: Plant) -> None:
    metrics = plant.bridge.metrics()
    assert metrics['iotbridge_bridge_connected{target="mqtt"}'] == 1
    assert metrics['iotbridge_bridge_connected{target="redis"}'] == 1


# --- MQTT: topic rights ---------------------------------------------------------------------------


def test_a_device_publishes_under_its_own_asset_and_nowhere_else(
    plant: Plant, sessions: Callable[[str, str, str], Session], unique: str
) -> None:
    press, site = device(sessions, PRESS), unique
    assert accepted(press.publish(topic(site, PRESS), payload(1)))
    assert press.publish(topic(site, PUMP), payload(999)) == NOT_AUTHORIZED
    assert accepted(press.publish(topic(site, PRESS), payload(2)))

    # The broker passes one connection's messages on in order and the bridge writes in arrival
    # order: once seq 2 is stored, anything the forged publish had delivered would be too.
    wait_until(lambda: (PRESS, 2) in plant.entries(site), TIMEOUT_S, "press-1's seq 2 stored")
    assert sorted(plant.entries(site)) == [(PRESS, 1), (PRESS, 2)], plant.logs()
    assert plant.dead_letters(site) == []

    # The pump's own topic does reach the stream: what was refused was the press's right.
    pump = device(sessions, PUMP)
    assert accepted(pump.publish(topic(site, PUMP), payload(1)))
    wait_until(lambda: (PUMP, 1) in plant.entries(site), TIMEOUT_S, "pump-2's seq 1 stored")
    assert sorted(plant.entries(site)) == [(PRESS, 1), (PRESS, 2), (PUMP, 1)]
    assert plant.dead_letters(site) == []


def test_the_bridge_user_may_read_but_not_publish(
    plant: Plant, sessions: Callable[[str, str, str], Session], unique: str
) -> None:
    site = unique
    reader = sessions("iotbridge", PASSWORDS["MQTT_PASSWORD"], "bridge")
    assert reader.subscribe(f"plant/{site}/#") == [1]
    assert reader.publish(topic(site, PRESS), payload(999)) == NOT_AUTHORIZED

    press = device(sessions, PRESS)
    assert accepted(press.publish(topic(site, PRESS), payload(1)))
    # The forged publish was refused (PUBACK) before the device connected: once the device's
    # message is here, the forged one would have been too.
    wait_until(lambda: bool(reader.received), TIMEOUT_S, "the device's message at the subscriber")
    assert [(t, json.loads(body)["seq"]) for t, body in reader.received] == [
        (topic(site, PRESS), 1)
    ]
    wait_until(lambda: bool(plant.entries(site)), TIMEOUT_S, "the device's message stored")
    assert plant.entries(site) == [(PRESS, 1)]


# --- Redis: each component as its own user ---------------------------------------------------------


def test_the_bridge_and_the_worker_work_as_their_redis_users(
    plant: Plant, sessions: Callable[[str, str, str], Session], unique: str
) -> None:
    site = unique
    press = device(sessions, PRESS)
    assert accepted(press.publish(topic(site, PRESS), payload(1)))
    assert accepted(press.publish(topic(site, PRESS), payload(2, temperature=150.0)))
    wait_until(lambda: len(plant.entries(site)) == 2, TIMEOUT_S, "both entries stored")

    admin = plant.redis_as("admin")
    try:
        hot = [(key, entry_id) for key in plant.keys.telemetry_streams(ROUTE)
               for entry_id, fields in rows(admin, key)
               if fields["site"] == site.encode() and fields["seq"] == b"2"]  # fmt: skip
        assert len(hot) == 1
        stream, source_id = hot[0]

        def flagged() -> list[dict[str, bytes]]:
            return [fields for _, fields in rows(admin, plant.keys.anomalies)
                    if fields["source_id"].decode() == source_id]  # fmt: skip

        wait_until(lambda: bool(flagged()), TIMEOUT_S, "the worker's anomaly for the hot entry")
        # The jump from 50 to 150 may flag the rate detector too; the bound is threshold's.
        events = [(e["asset"], e["detector"], e["event"]) for e in flagged()]
        assert (PRESS.encode(), b"threshold", b"start") in events, plant.logs()

        def consumed() -> bool:
            groups = admin.xinfo_groups(stream)
            return len(groups) == 1 and groups[0]["pending"] == 0 and groups[0]["lag"] == 0

        wait_until(consumed, TIMEOUT_S, "the worker's group to have read and acked the stream")
    finally:
        admin.close()


Denied = Callable[[redis.Redis, Keys], Any]


def _tel(keys: Keys) -> str:
    """The telemetry shard stream that holds press-1's entries."""
    return keys.telemetry(ROUTE, shard_of(PRESS, SHARDS))


# What each user must be refused (NOPERM), by compose's ACL.
DENIED: list[tuple[str, str, Denied]] = [
    ("bridge", "del-telemetry", lambda r, k: r.delete(_tel(k))),
    ("bridge", "flushall", lambda r, k: r.flushall()),
    ("bridge", "config-set", lambda r, k: r.config_set("maxmemory-policy", "allkeys-lru")),
    ("bridge", "xadd-anomalies", lambda r, k: r.xadd(k.anomalies, {"forged": "1"})),
    ("bridge", "xadd-worker-dead-letters",
     lambda r, k: r.xadd(k.worker_dead_letters, {"forged": "1"})),
    ("bridge", "set-worker-lease",
     lambda r, k: r.set(k.worker_lease("workers", ROUTE, 0), "bridge")),
    ("bridge", "set-outside-its-keys", lambda r, k: r.set("elsewhere", "1")),
    ("bridge", "hset-outside-its-keys", lambda r, k: r.hset("elsewhere:dedup", "a", "1")),
    ("bridge", "xrange-anomalies", lambda r, k: r.xrange(k.anomalies, count=1)),
    ("bridge", "xrange-worker-dead-letters",
     lambda r, k: r.xrange(k.worker_dead_letters, count=1)),
    ("worker", "xadd-telemetry", lambda r, k: r.xadd(_tel(k), {"forged": "1"})),
    ("worker", "xtrim-telemetry", lambda r, k: r.xtrim(_tel(k), maxlen=0)),
    ("worker", "del-telemetry", lambda r, k: r.delete(_tel(k))),
    ("worker", "xadd-dead-letters", lambda r, k: r.xadd(k.dead_letters, {"forged": "1"})),
    ("worker", "hset-dedup",
     lambda r, k: r.hset(k.dedup(ROUTE, shard_of(PRESS, SHARDS)), PRESS, "0")),
    ("worker", "flushall", lambda r, k: r.flushall()),
    ("worker", "config-set", lambda r, k: r.config_set("maxmemory-policy", "allkeys-lru")),
    ("default", "xlen-telemetry", lambda r, k: r.xlen(_tel(k))),
    ("default", "xadd-telemetry", lambda r, k: r.xadd(_tel(k), {"forged": "1"})),
]  # fmt: skip


@pytest.fixture(scope="module")
def stored(plant: Plant) -> None:
    """press-1 has telemetry and dedup state in Redis, so a refused DEL, XTRIM or HSET would show."""
    session = Session(plant, PRESS, DEVICES[PRESS], PRESS)
    try:
        site = "redis-" + uuid.uuid4().hex[:8]
        assert accepted(session.publish(topic(site, PRESS), payload(1)))
        wait_until(lambda: bool(plant.entries(site)), TIMEOUT_S, "press-1's entry stored")
    finally:
        session.close()


def snapshot(plant: Plant) -> dict[str, Any]:
    """What a refused command must leave as it was (the worker may still add anomalies of its
    own, such as staleness, so the other streams are checked for forged entries only)."""
    admin = plant.redis_as("admin")
    keys = plant.keys
    streams = [*keys.telemetry_streams(ROUTE), keys.dead_letters, keys.anomalies,
               keys.worker_dead_letters]  # fmt: skip
    try:
        return {
            "telemetry": admin.xlen(_tel(keys)),
            "dedup": admin.hgetall(keys.dedup(ROUTE, shard_of(PRESS, SHARDS))),
            "forged": [key for key in streams for _, f in rows(admin, key) if "forged" in f],
            "elsewhere": admin.exists("elsewhere", "elsewhere:dedup"),
            "policy": admin.config_get("maxmemory-policy"),
        }
    finally:
        admin.close()


@pytest.mark.parametrize(
    ("user", "denied"), [pytest.param(u, f, id=f"{u}-{name}") for u, name, f in DENIED]
)
def test_a_redis_user_is_refused_what_compose_does_not_grant(
    plant: Plant, stored: None, user: str, denied: Denied
) -> None:
    before = snapshot(plant)
    assert before["telemetry"] > 0
    assert before["dedup"]
    assert before["forged"] == []
    client = plant.redis_as(user)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            denied(client, plant.keys)
    finally:
        client.close()
    assert snapshot(plant) == before


def test_the_redis_rights_the_bridge_needs_are_granted(plant: Plant, stored: None) -> None:
    """Retention finds its cut with XRANGE ... COUNT, and the start-up check reads
    maxmemory-policy: both stay allowed while the writes above are refused."""
    bridge, worker, anonymous = (plant.redis_as(u) for u in ("bridge", "worker", "default"))
    tel = _tel(plant.keys)
    try:
        assert bridge.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert len(bridge.xrange(tel, count=1) or []) == 1
        assert len(worker.xrange(tel, count=1) or []) == 1
        assert anonymous.ping()
    finally:
        for client in (bridge, worker, anonymous):
            client.close()
