"""The 3-minute soak (`tests/soak.py`; `make soak` runs the 30-minute one): 500 msg/s through two
bridges and a worker, a fault every 30 s so each of the five kinds comes once, then every claim
checked with its numbers in the message."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.services import mosquitto_binary, redis_binary, require
from tests.soak import FAULT_KINDS, SoakReport, run_soak

pytestmark = pytest.mark.integration

DURATION_S = 180.0
INTERVAL_S = 30.0  # faults at 30, 60, 90, 120 and 150 s: five, one of each kind
RATE = 500.0


# Set-up, 3 minutes of load, the drain and the audit: about 4 minutes on the 2-core machine.
@pytest.mark.timeout(480)
def test_three_minutes_of_faults_lose_nothing_leak_nothing_and_the_counters_add_up(
    tmp_path: Path,
) -> None:
    binary = require(mosquitto_binary(), "mosquitto")
    passwd_tool = shutil.which("mosquitto_passwd") or shutil.which(
        "mosquitto_passwd", path=str(Path(binary).parent)
    )
    require(passwd_tool, "mosquitto_passwd")
    require(redis_binary(), "redis-server")
    report = run_soak(tmp_path, DURATION_S, INTERVAL_S, RATE, seed=7)
    sys.stdout.write("\n" + report.text() + "\n")
    _check(report)


def _check(report: SoakReport) -> None:
    assert sorted(f.kind for f in report.faults) == sorted(FAULT_KINDS), report.claim("faults")
    for name in ("lost", "duplicated", "unexpected", "load", "caught up"):
        claim = report.claim(name)
        assert claim.ok, f"{name}: {claim.detail}"
    for process in ("bridge-2", "worker"):
        for kind in ("rss drift", "fds"):
            claim = report.claim(f"{kind} {process}")
            assert claim.ok, f"{claim.name}: {claim.detail}"
    for bridge in ("bridge-1", "bridge-2"):
        claim = report.claim(f"counters {bridge}")
        assert claim.ok, f"{claim.name}: {claim.detail}"
    assert report.ok, report.text()
