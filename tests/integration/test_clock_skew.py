"""Time skew, with faketime (Debian's libfaketime), where the clock matters.

- The bridge judges device time against the gateway's clock (`bridge.clock`): a gateway clock two
  days ahead dead-letters every message with reason `clock` and says by how much, instead of
  storing it silently; ten minutes ahead is inside the window and changes nothing.
- The worker's time-driven parts use the Redis clock, never its own (leases read TIME, staleness
  is measured in entry ids): a worker two hours ahead takes its shards and flags exactly the asset
  that went silent, not every asset at once.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_py

from config.keys import Keys
from tests.faults import Bridge, TrackedPublisher, mosquitto, payload, redis, topic
from tests.integration.test_worker import ROUTE, telemetry
from tests.services import Service, free_port, http_get, require, wait_until

pytestmark = pytest.mark.integration

M = "iotbridge_bridge_messages_"


def faketime(skew: str) -> dict[str, str]:
    """The environment that runs a process on a skewed clock: libfaketime (Debian package
    faketime) preloaded into the process itself, which then is still stopped by its own PID
    (the `faketime` command would fork it as a child)."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    library = require(found[0] if found else None, "libfaketime (Debian package faketime)")
    return {"LD_PRELOAD": library, "FAKETIME": skew}


def test_faketime_moves_the_clock_of_a_python_process() -> None:
    """The premise of the tests below (a control): the process's wall clock is two days ahead."""
    out = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                         env={**os.environ, **faketime("+2d")}, capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    assert float(out) - time.time() == pytest.approx(2 * 86_400, abs=60)


@pytest.mark.parametrize(("skew", "in_window"), [("+2d", False), ("+10m", True)])
def test_device_time_is_judged_by_the_gateway_clock(
    tmp_path: Path, unique: str, skew: str, in_window: bool
) -> None:
    broker = mosquitto(tmp_path / "mosquitto").start()
    db = redis(tmp_path / "redis").start()
    bridge = Bridge(tmp_path / "bridge", mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
                    redis_url=f"redis://127.0.0.1:{db.port}/0", name=unique,
                    env=faketime(skew))  # fmt: skip
    publisher = None
    try:
        bridge.start()
        publisher = TrackedPublisher(f"mqtt://127.0.0.1:{broker.port}", f"{unique}-pub")
        for seq in range(20):
            publisher.publish(topic("a1"), payload(seq))  # device time: the true time
        assert publisher.wait_acked(30) == 20
        wait_until(
            lambda: (
                bridge.total(M + "received_total") == 20
                and bridge.total("iotbridge_bridge_in_flight_messages") == 0
            ),
            30,
            "the bridge to settle all 20",
        )
        keys = Keys(unique)
        with redis_py.Redis(port=db.port, decode_responses=True) as client:
            stored = client.xlen(keys.telemetry(ROUTE))
            letters = [fields for _, fields in client.xrange(keys.dead_letters)]
        clock_rejected = bridge.total(M + "rejected_total")
        if in_window:
            assert (stored, letters, clock_rejected) == (20, [], 0)
        else:
            assert (stored, len(letters), clock_rejected) == (0, 20, 20)
            assert {letter["reason"] for letter in letters} == {"clock"}
            # The answer names the gap: about two days (172,800 s) in the past.
            assert all("s in the past" in letter["error"] for letter in letters)
            gaps = {int(letter["error"].split(" is ")[1].split(" s ")[0]) for letter in letters}
            assert all(abs(gap - 172_800) < 120 for gap in gaps), gaps
    finally:
        if publisher is not None:
            publisher.close()
        bridge.close()
        broker.stop()
        db.stop()


def test_a_worker_two_hours_ahead_takes_its_shards_and_flags_only_the_silent_asset(
    tmp_path: Path, unique: str
) -> None:
    db = redis(tmp_path / "redis").start()
    port = free_port()
    env = {
        "IOTBRIDGE_REDIS__URL": f"redis://127.0.0.1:{db.port}/0",
        "IOTBRIDGE_REDIS__KEY_PREFIX": unique,
        "IOTBRIDGE_WORKER__METRICS_PORT": str(port),
        "IOTBRIDGE_WORKER__BLOCK_MS": "200",
        "IOTBRIDGE_WORKER__DETECTORS__STALENESS": json.dumps([{"silent_s": 2.0}]),
        "IOTBRIDGE_WORKER__DETECTORS__TICK_S": "0.1",
        **faketime("+2h"),
    }
    argv = [sys.executable, "-m", "bridge.cli", "worker"]
    worker = Service("worker", argv, port, tmp_path / "worker", env)
    keys = Keys(unique)
    client = redis_py.Redis(port=db.port, decode_responses=True)
    try:
        worker.start()
        wait_until(lambda: http_get(port, "/readyz", 1)[0] == 200, 60, "the worker ready")
        stream = keys.telemetry(ROUTE)
        quiet_id = client.xadd(stream, telemetry(unique, "quiet", 0, temperature=50.0))
        began = time.monotonic()

        def staleness() -> list[dict[str, str]]:
            return [f for _, f in client.xrange(keys.anomalies) if f["detector"] == "staleness"]

        # The busy asset keeps sending, one entry per 0.2 s (the load's pace), 30 at most.
        for seq in range(1, 31):
            client.xadd(stream, telemetry(unique, "busy", seq, temperature=50.0))
            if staleness():
                break
            time.sleep(0.2)
        wait_until(lambda: bool(staleness()), 10, "a staleness flag")
        flagged_after_s = time.monotonic() - began
        [flag] = staleness()
        assert (flag["event"], flag["asset"], flag["source_id"]) == ("start", "quiet", quiet_id)
        assert 1.9 <= flagged_after_s < 8.0  # by the Redis clock; two hours would flag at once
        # The shards were taken through leases that read Redis's TIME, not this worker's clock.
        assert client.get(keys.worker_lease("workers", ROUTE)) is not None
    finally:
        client.close()
        worker.stop()
        db.stop()
