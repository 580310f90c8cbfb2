"""`iotbridge demo`: one command brings the pipeline up, anomalies flow, Ctrl-C takes it all down."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services import port_open

pytestmark = pytest.mark.integration

SUMMARY = re.compile(
    r"received\s+(\d+)\s+written\s+(\d+)\s+dead-lettered\s+(\d+)\s+anomalies\s+(\d+)"
)


def test_demo_reaches_the_anomaly_stream_within_15_s_and_stops_everything_on_ctrl_c(
    tmp_path: Path, redis_url: str
) -> None:
    # redis_url: the demo needs a redis-server binary (or the embedded one), like the fixtures.
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "demo", "--assets", "1000", "--workdir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    first_anomaly_s = None
    try:
        for line in proc.stdout:
            lines.append(line)
            match = SUMMARY.search(line)
            if match and int(match.group(4)) > 0:
                first_anomaly_s = time.monotonic() - started
                break
            if time.monotonic() - started > 60:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    output = "".join(lines) + rest
    assert first_anomaly_s is not None, output
    assert first_anomaly_s < 15, output
    assert proc.returncode == 0, output
    assert "stopped." in output
    ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", "".join(lines))]
    assert len(ports) == 6
    assert not [p for p in ports if port_open(p)], "a demo process is still listening"
    logs = "".join(f.read_text() for f in (tmp_path / "logs").glob("*.log"))
    assert "Traceback" not in logs
