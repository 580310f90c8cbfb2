"""A fleet of bridges over session partitions, as real processes, against mosquitto on the shipped
broker/mosquitto.conf and a real Redis: bridges killed, paused past their lease, joining and
leaving, and the broker killed, while devices publish; the audit finds nothing lost or doubled.

4 partitions (one per site) of 20 assets each. Leases of 3 s, so a failover takes a few seconds.
The broker's log is the witness that no partition's session was held by two bridges: a second
connection with a client id that is connected makes mosquitto log "Client <id> already connected,
closing old connection" (a takeover); a graceful hand-over or a killed bridge never causes one.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_py
import redis.asyncio as aioredis

from config.keys import Keys
from simulators.audit import AuditReport, Pair, SeqSet, audit_redis
from tests.compose_config import PASSWORDS, redis_with_compose_acl
from tests.faults import ASSET_LEVEL, Bridge, PacedRun, TrackedPublisher, cont_and_stop, redis
from tests.integration.test_broker import shipped_conf_for_test, wait_for_save
from tests.services import Service, free_port, mosquitto_binary, require, wait_until
from workers.leases import Leases

pytestmark = pytest.mark.integration

SITES = 4
ASSETS_PER_SITE = 20
TTL_S = 3.0
CREDENTIALS = ("iotbridge", "partitionsSecret1")
PARTITIONS = json.dumps([{"name": f"s{k}", "filters": [f"plant/s{k}/#"]} for k in range(SITES)])
OWNED = "iotbridge_bridge_partitions_owned"
CHANGES = "iotbridge_bridge_partition_lease_changes_total"


def _topic(asset: str) -> str:
    return f"plant/{asset.split('a', maxsplit=1)[0]}/l1/{asset}/telemetry"


def _plan(per_asset: int) -> list[Pair]:
    """Round-robin over the 80 assets (`s<site>a<n>`), each numbering its messages from 0."""
    assets = [f"s{k}a{n}" for k in range(SITES) for n in range(ASSETS_PER_SITE)]
    return [(asset, seq) for seq in range(per_asset) for asset in assets]


class Fleet:
    """One test's broker (shipped config), Redis, bridges and publisher."""

    def __init__(self, tmp_path: Path, name: str) -> None:
        self.tmp_path = tmp_path
        self.name = name
        port = free_port()
        (tmp_path / "mosquitto").mkdir()
        conf = shipped_conf_for_test(tmp_path / "mosquitto", port, CREDENTIALS)
        # The witness: mosquitto flushes its log file per line (its stdout is block-buffered,
        # and a kill -9 would lose the end of it).
        self.broker_log = tmp_path / "mosquitto" / "broker.log"
        conf.write_text(conf.read_text() + f"log_dest file {self.broker_log}\n")
        self.data = tmp_path / "mosquitto" / "data"
        binary = require(mosquitto_binary(), "mosquitto")
        self.broker = Service("mosquitto", [binary, "-c", str(conf)], port, tmp_path / "mosquitto")
        self.broker.start()
        self.db = redis(tmp_path / "redis").start()
        self.bridges: list[Bridge] = []
        self.publishers: list[TrackedPublisher] = []

    def bridge(self) -> Bridge:
        bridge = Bridge(
            self.tmp_path / f"bridge-{len(self.bridges) + 1}",
            mqtt_url=f"mqtt://127.0.0.1:{self.broker.port}",
            redis_url=f"redis://127.0.0.1:{self.db.port}/0",
            name=self.name,  # one mqtt.client_id for the fleet: the partitions' sessions
            env={
                "IOTBRIDGE_MQTT__USERNAME": CREDENTIALS[0],
                "IOTBRIDGE_MQTT__PASSWORD": CREDENTIALS[1],
                "IOTBRIDGE_BRIDGE__PARTITIONS": PARTITIONS,
                "IOTBRIDGE_BRIDGE__PARTITION_COVERAGE": "declared",
                "IOTBRIDGE_BRIDGE__PARTITION_LEASE_TTL_S": str(TTL_S),
                # Devices (reconnecting after 1 s) come back before the bridges after a broker
                # restart: the case a shared subscription loses.
                "IOTBRIDGE_BACKOFF__INITIAL_S": "2",
                "IOTBRIDGE_BACKOFF__MAX_S": "3",
            },
        )
        self.bridges.append(bridge)
        return bridge

    def publisher(self) -> TrackedPublisher:
        publisher = TrackedPublisher(
            f"mqtt://127.0.0.1:{self.broker.port}", f"{self.name}-pub", credentials=CREDENTIALS
        )
        self.publishers.append(publisher)
        return publisher

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(port=self.db.port, socket_timeout=10)

    def audit(self, acked: SeqSet) -> AuditReport:
        keys = Keys(self.name)
        client = self.client()
        try:
            return audit_redis(client, keys.telemetry("telemetry"), acked,
                               dead_letters=keys.dead_letters, asset_level=ASSET_LEVEL)  # fmt: skip
        finally:
            client.close()

    def settled_audit(self, acked: SeqSet, timeout_s: float) -> AuditReport:
        """Audit until nothing acknowledged is missing (or the timeout): bridges may still be
        draining the sessions' queues."""
        report = self.audit(acked)
        deadline = time.monotonic() + timeout_s
        while report.lost and time.monotonic() < deadline:
            time.sleep(0.25)
            report = self.audit(acked)
        return report

    def owned(self, bridge: Bridge) -> int:
        return int(bridge.total(OWNED))

    def balanced(self, *bridges: Bridge, shares: list[int]) -> bool:
        """Each bridge owns its share (sorted shares), every one ready: all sessions connected."""
        try:
            owned = sorted(self.owned(b) for b in bridges)
            return owned == sorted(shares) and all(b.ready() for b in bridges)
        except (OSError, AssertionError):
            return False

    def takeovers(self) -> list[str]:
        """The broker's log lines where a partition's session was taken from a live connection."""
        text = self.broker_log.read_text(errors="replace")
        pattern = re.compile(rf"Client {re.escape(self.name)}-bridge-s\d+ already connected")
        return [line for line in text.splitlines() if pattern.search(line)]

    def report(self) -> str:
        parts = [f"--- {b.log_path} (alive {b.alive})\n{b.tail(40)}" for b in self.bridges]
        parts.append(f"--- mosquitto\n{self.broker.tail(40)}")
        return "\n".join(parts)

    def close(self) -> None:
        for publisher in self.publishers:
            publisher.close()
        for bridge in self.bridges:
            bridge.close()
        cont_and_stop(self.broker)
        cont_and_stop(self.db)


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, unique: str) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, unique)
    failed_before = request.session.testsfailed
    try:
        yield fleet
    finally:
        if request.session.testsfailed > failed_before:
            sys.stdout.write(fleet.report() + "\n")
        fleet.close()


def _show(label: str, report: AuditReport, **extra: object) -> None:
    sys.stdout.write(f"\n[{label}] {json.dumps({**report.as_dict(), **extra}, default=str)}\n")


def _two_bridges(fleet: Fleet) -> tuple[Bridge, Bridge]:
    one, two = fleet.bridge().start(), fleet.bridge().start()
    wait_until(lambda: fleet.balanced(one, two, shares=[2, 2]), 30, "2 partitions each")
    return one, two


# 1. Kill -9 a bridge 3 times and the broker twice -----------------------------------------------


def test_1_bridges_killed_3_times_and_the_broker_twice_lose_and_double_nothing(
    fleet: Fleet,
) -> None:
    bridges = list(_two_bridges(fleet))
    publisher = fleet.publisher()
    messages = _plan(1200)  # 96,000 messages at 2,000/s: 48 s
    run = PacedRun(publisher, messages, rate_hz=2000, max_s=90, topic_of=_topic)
    run.start()
    # Every session and its subscriptions in the broker's persistence file before its first kill.
    wait_for_save(fleet.data)
    failovers: list[float] = []
    broker_kills: list[int] = []
    for step in range(5):
        if step % 2 == 0:
            victim, survivor = bridges[step // 2 % 2], bridges[1 - step // 2 % 2]
            victim.kill()
            killed = time.monotonic()
            wait_until(lambda s=survivor: fleet.balanced(s, shares=[4]), TTL_S + 10, "failover")  # type: ignore[misc]
            failovers.append(round(time.monotonic() - killed, 2))
            victim.start()
        else:
            broker_kills.append(run.published)
            fleet.broker.kill()
            fleet.broker.start()
        wait_until(lambda: fleet.balanced(*bridges, shares=[2, 2]), 30, "2 partitions each")
    assert run.finish(90) == len(messages)
    assert publisher.wait_acked(60) == len(messages)
    report = fleet.settled_audit(publisher.acked_set(), 60)
    takeovers = fleet.takeovers()
    _show("kill -9 bridge x3, mosquitto x2", report, failover_s=failovers,
          published_at_broker_kills=broker_kills, takeovers=len(takeovers))  # fmt: skip
    assert all(n < len(messages) for n in broker_kills)  # each broker kill was mid-stream
    assert (report.acked, report.lost, report.duplicated, report.unexpected) == (
        len(messages), 0, 0, 0,
    )  # fmt: skip
    assert takeovers == []  # no session was ever connected from two bridges at once
    assert max(failovers) <= TTL_S + 2, failovers


# 2. A bridge paused past its lease ---------------------------------------------------------------


def test_2_a_bridge_paused_past_its_lease_acknowledges_nothing_after_losing_it(
    fleet: Fleet,
) -> None:
    stale, other = _two_bridges(fleet)
    publisher = fleet.publisher()
    messages = _plan(300)  # 24,000 messages at 1,000/s
    run = PacedRun(publisher, messages, rate_hz=1000, max_s=60, topic_of=_topic)
    run.start()
    wait_until(lambda: publisher.acked >= 3000, 30, "3,000 acknowledged by the broker")
    stale.service.signal(signal.SIGSTOP)
    paused = time.monotonic()
    try:
        # The other bridge takes the paused one's partitions once their leases lapse, and the
        # broker hands it their sessions (closing the paused bridge's connections).
        wait_until(lambda: fleet.balanced(other, shares=[4]), TTL_S + 10, "takeover")
        taken_over_s = time.monotonic() - paused
    finally:
        stale.service.signal(signal.SIGCONT)
    wait_until(lambda: stale.total(CHANGES + '{change="lost"}') == 2, 10, "the stale bridge sees")
    wait_until(lambda: fleet.balanced(stale, other, shares=[2, 2]), 30, "2 partitions each")
    assert run.finish(60) == len(messages)
    assert publisher.wait_acked(60) == len(messages)
    report = fleet.settled_audit(publisher.acked_set(), 60)
    takeovers = fleet.takeovers()
    metrics = stale.metrics()
    _show("SIGSTOP past the lease, SIGCONT", report, taken_over_s=round(taken_over_s, 2),
          takeovers=len(takeovers), fenced=metrics.get("iotbridge_bridge_acks_fenced_total"),
          lease_changes={k: v for k, v in metrics.items() if k.startswith(CHANGES)})  # fmt: skip
    assert (report.acked, report.lost, report.duplicated, report.unexpected) == (
        len(messages), 0, 0, 0,
    )  # fmt: skip
    # Exactly the paused bridge's two sessions were taken from it by the broker, and it never
    # connected one again while another bridge held it (that would be a third takeover).
    assert len(takeovers) == 2, takeovers


# 3. A third bridge joins, then leaves ------------------------------------------------------------


def test_3_a_third_bridge_joins_and_leaves_while_messages_flow(fleet: Fleet) -> None:
    one, two = _two_bridges(fleet)
    publisher = fleet.publisher()
    messages = _plan(300)  # 24,000 messages at 1,000/s
    run = PacedRun(publisher, messages, rate_hz=1000, max_s=60, topic_of=_topic)
    run.start()
    wait_until(lambda: publisher.acked >= 2000, 30, "2,000 acknowledged by the broker")
    three = fleet.bridge().start()
    wait_until(lambda: fleet.balanced(one, two, three, shares=[2, 1, 1]), 30, "2, 1 and 1")
    joined_at = run.published
    taken = fleet.owned(three)
    assert three.terminate() == 0  # leaves: hands its partition over and releases the lease
    wait_until(lambda: fleet.balanced(one, two, shares=[2, 2]), 30, "2 partitions each again")
    left_at = run.published
    assert run.finish(60) == len(messages)
    assert publisher.wait_acked(60) == len(messages)
    report = fleet.settled_audit(publisher.acked_set(), 60)
    takeovers = fleet.takeovers()
    _show("a third bridge joins and leaves", report, joined_at=joined_at, left_at=left_at,
          taken_by_the_third=taken, takeovers=len(takeovers))  # fmt: skip
    assert joined_at < left_at < len(messages)  # both moves happened while messages flowed
    assert taken == 1
    assert (report.acked, report.lost, report.duplicated, report.unexpected) == (
        len(messages), 0, 0, 0,
    )  # fmt: skip
    assert takeovers == []  # every hand-over disconnected before the next owner connected


# 4. compose's Redis user may hold leases ---------------------------------------------------------


async def test_4_the_bridge_user_of_compose_holds_renews_and_releases_partition_leases(
    tmp_path: Path, unique: str
) -> None:
    server = redis_with_compose_acl(tmp_path, unique).start()
    keys = Keys(unique)
    client = aioredis.Redis(port=server.port, username="bridge",
                            password=PASSWORDS["REDIS_BRIDGE_PASSWORD"], decode_responses=True)  # fmt: skip
    parts = [_Lease(keys.bridge_lease("iotbridge-bridge", f"l{k}")) for k in range(4)]
    leases = Leases(keys.bridge_members("iotbridge-bridge"), "b1", parts, 3000)
    try:
        _now, members = await leases.heartbeat(client)
        assert members == ["b1"]
        taken = await leases.acquire(client, parts, 2)
        assert len(taken) == 2
        assert await leases.renew(client, taken) == taken
        await leases.release(client, taken)
        assert await leases.renew(client, taken) == []
        await leases.leave(client)
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            await client.set(f"{unique}:worker:g:lease:x", "b1")  # only under bridge:*
    finally:
        await client.aclose()
        server.stop()


@dataclass(frozen=True)
class _Lease:
    lease: str
