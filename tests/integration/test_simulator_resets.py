"""The simulator across connection resets: a broker that restarts (or a firewall that resets its
connections) while messages flow costs the messages of the reconnect gap, counted, never the rest
of the run."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_simulator import REPO, metric
from tests.proxy import FaultProxy
from tests.services import Service, free_port, http_get, mosquitto_service, require

pytestmark = pytest.mark.integration

DURATION_S = 8
ASSETS = 500  # at 1 Hz each: 500 msg/s over two connections


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Service]:
    service = require(mosquitto_service(tmp_path / "mosquitto"), "mosquitto")
    service.start()
    yield service
    service.stop()


async def _sent(port: int) -> float:
    status, text = await asyncio.to_thread(http_get, port, "/metrics", 1)
    return metric(text, "iotbridge_simulator_messages_sent_total") if status == 200 else 0.0


async def _wait_sent(port: int, at_least: float, proc: asyncio.subprocess.Process) -> float:
    async with asyncio.timeout(30):
        while (sent := await _sent(port)) < at_least:
            assert proc.returncode is None, "the simulator ended early"
            await asyncio.sleep(0.05)  # a poll interval: the condition is the metric
    return sent


async def test_reset_connections_are_reopened_and_the_run_goes_on(
    broker: Service, unique: str, tmp_path: Path
) -> None:
    proxy = await FaultProxy("127.0.0.1", broker.port).start()
    port = free_port()
    env = {
        **os.environ,
        "IOTBRIDGE_MQTT__URL": f"mqtt://127.0.0.1:{proxy.port}",
        "IOTBRIDGE_MQTT__PROTOCOL": "5",
        "IOTBRIDGE_SIMULATOR__METRICS_PORT": str(port),
        "IOTBRIDGE_SIMULATOR__CLIENT_ID_PREFIX": unique,
        "IOTBRIDGE_SIMULATOR__ASSETS_PER_CONNECTION": "250",
        "IOTBRIDGE_BACKOFF__MAX_S": "0.5",
    }
    args = ["simulate", "--assets", str(ASSETS), "--rate", "1", "--duration", str(DURATION_S),
            "--no-progress"]  # fmt: skip
    log_path = tmp_path / "simulator.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.cli", *args, env=env, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
        try:
            before = await _wait_sent(port, 1000, proc)
            proxy.reset_all()  # both connections see a TCP reset mid-stream
            after = await _wait_sent(port, before + 1000, proc)
            async with asyncio.timeout(60):
                out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proxy.close()

    report = json.loads(out.decode().splitlines()[-1])
    text = log_path.read_text()
    assert "simulator engine failed" not in text, text[-2000:]
    assert after >= before + 1000  # it went on publishing after the reset
    assert proxy.connections >= 4  # two connections, each opened again
    # Every scheduled message is accounted for: sent, or skipped for a reason.
    assert report["sent"] - report["extras_sent"] + report["skipped"] == report["scheduled"]
    assert report["scheduled"] == ASSETS * DURATION_S
    # What the reset cost is the reconnect gap, not the rest of the run.
    assert report["acked"] >= 0.7 * report["scheduled"], report
