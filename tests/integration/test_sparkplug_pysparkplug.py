"""A Sparkplug edge node this project did not write (pysparkplug, in a virtual environment of its
own: it pins paho-mqtt below 2) against the bridge's host, on real mosquitto and redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bridge.sparkplug import names
from config.keys import Keys
from config.settings import Settings
from tests.clients import running_bridge, sample, wait_for
from tests.services import REQUIRE_SERVICES

pytestmark = pytest.mark.integration

EDGE = Path(__file__).resolve().parents[1] / "edges" / "pysparkplug_edge.py"
PYSPARKPLUG = "pysparkplug>=0.6.1,<0.7"
COUNT = 1_000
KEEPALIVE_S = 5


@pytest.fixture(scope="session")
def pysparkplug_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The interpreter of a virtual environment with pysparkplug, made once per test session."""
    venv = tmp_path_factory.mktemp("pysparkplug") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", PYSPARKPLUG],
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    if done.returncode != 0:
        if REQUIRE_SERVICES:
            pytest.fail(f"cannot install {PYSPARKPLUG}: {done.stderr[-2000:]}")
        pytest.skip(f"cannot install {PYSPARKPLUG}")
    return python


def _expected(i: int) -> dict[str, str]:
    """Message i's fields as the host stores them: the values tests/edges/pysparkplug_edge.py
    sends, computed here again."""
    numbers: dict[str, int | float] = {
        "Int8": i % 256 - 128, "Int16": -31 * i, "Int32": -1_000_003 * i, "Int64": -(2**62) + i,
        "UInt8": i % 256, "UInt16": 65_535 - i, "UInt32": 2**32 - 1 - i, "UInt64": 2**64 - 1 - i,
        "Float": i + 0.5, "Double": i / 8, "Boolean": 1.0 if i % 2 == 0 else 0.0,
        "Motor 1/Speed": i * 0.25, "Motor 1/Running": 1.0 if i % 3 == 0 else 0.0, "Count": i,
        "Temp": -i - 0.25, "Level": -1,
    }  # fmt: skip
    texts = {"String": f"s{i}", "Text": f"line {i}\nnext", "UUID": str(uuid.UUID(int=i)),
             "Mode": "auto" if i % 2 else "manual"}  # fmt: skip
    fields = {f"v.{names.value_name(k)}": repr(v) if isinstance(v, float) else str(v)
              for k, v in numbers.items()}  # fmt: skip
    return fields | {f"s.{names.value_name(k)}": v for k, v in texts.items()}


@pytest.fixture
def edge_process(pysparkplug_python: Path) -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


async def test_a_pysparkplug_edge_node_gives_1000_exact_entries_and_its_kill_marks_it_stale(
    make_settings: Callable[..., Settings], unique: str, pysparkplug_python: Path,
    edge_process: list[subprocess.Popen[str]],
) -> None:  # fmt: skip
    settings = make_settings(sparkplug={"enabled": True, "host_id": unique, "groups": [unique]})
    keys = Keys(settings.redis.key_prefix)
    db = redis.Redis.from_url(settings.redis.url, decode_responses=True)
    stream = keys.telemetry("sparkplug")
    device = names.asset_id(unique, "Edge 7", "Line 1")

    def entries(kind: str) -> list[dict[str, str]]:
        return [f for _, f in db.xrange(stream) if f.get("sp.type") == kind]

    async with running_bridge(settings) as app:
        edge = await asyncio.to_thread(
            subprocess.Popen,
            [str(pysparkplug_python), str(EDGE), settings.mqtt.host, str(settings.mqtt.port),
             unique, "Edge 7", str(COUNT), str(KEEPALIVE_S)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ""},
        )  # fmt: skip
        edge_process.append(edge)
        assert edge.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(edge.stdout.readline), 60)
        assert line.strip() == "published"
        await wait_for(lambda: len(entries("DDATA")) >= COUNT, 30, f"{COUNT} DDATA entries")
        data = entries("DDATA")
        assert len(data) == COUNT
        assert all(e["asset"] == device for e in data)
        mismatched = [i for i, e in enumerate(data, start=1)
                      if {k: e.get(k) for k in _expected(i)} != _expected(i)]  # fmt: skip
        assert mismatched == []
        [birth] = entries("DBIRTH")
        assert {k: birth.get(k) for k in _expected(0)} == _expected(0)
        assert sample(app, "iotbridge_sparkplug_rebirth_requests_total") == 0
        assert sample(app, "iotbridge_sparkplug_seq_gaps_total") == 0

        edge.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await wait_for(lambda: len(entries("NDEATH")) == 2, 1.5 * KEEPALIVE_S + 1, "the Will")
        took_s = time.monotonic() - killed
        assert took_s <= 1.5 * KEEPALIVE_S + 1
        assert sample(app, "iotbridge_sparkplug_online", level="node") == 0
        assert sample(app, "iotbridge_sparkplug_online", level="device") == 0
        # The node's Uptime and bdSeq, the device's 20 metrics.
        assert sample(app, "iotbridge_sparkplug_stale_metrics") == 22
    deaths = {e["asset"]: e for e in entries("NDEATH")}
    assert set(deaths) == {names.asset_id(unique, "Edge 7"), device}
    assert len(deaths[device]["sp.stale"].split(",")) == 20
