"""The simulator's Sparkplug mode through the bridge's Sparkplug host: the smoke scenario's
anomalies and faults, as entries, dead letters, rebirths and ground truth."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from config.keys import Keys
from config.settings import Settings
from simulators.app import SimulatorApp
from simulators.scenario import Scenario
from tests.clients import running_bridge, sample, wait_for

pytestmark = pytest.mark.integration

SMOKE = Path(__file__).resolve().parents[2] / "simulators" / "scenarios" / "smoke.yaml"
SP = "iotbridge_sparkplug_"


async def test_a_sparkplug_fleet_lands_with_its_faults_dead_lettered_and_0_gaps(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path
) -> None:
    document = yaml.safe_load(SMOKE.read_text())
    document["fleet"]["protocol"] = "sparkplug"
    scenario = Scenario.model_validate(document)
    base = make_settings(sparkplug={"enabled": True, "host_id": unique, "groups": [unique]})
    simulator = scenario.apply(base.simulator).model_copy(update={"sparkplug_group": unique})
    settings = base.model_copy(update={"simulator": simulator})
    truth = tmp_path / "truth.jsonl"
    db = redis.Redis.from_url(settings.redis.url)  # dead letters hold raw protobuf bytes
    keys = Keys(settings.redis.key_prefix)

    def entries(kind: str) -> list[dict[bytes, bytes]]:
        return [f for _, f in db.xrange(keys.telemetry("sparkplug")) if f[b"sp.type"] == kind]

    def dead(reason: str) -> int:
        return sum(1 for _, f in db.xrange(keys.dead_letters) if f[b"reason"] == reason.encode())

    async with running_bridge(settings) as bridge:
        app = SimulatorApp(settings, CollectorRegistry(), scenario=scenario, ground_truth=truth)
        async with asyncio.timeout(settings.simulator.duration_s + 30):
            await app.run(asyncio.Event())
        report = app.report()
        records = [json.loads(line) for line in truth.read_text().splitlines()]
        skewed = next(r["messages"] for r in records if r["kind"] == "clock_skew")
        # Both edge nodes end with NDEATH: everything written by then.
        await wait_for(lambda: len(entries(b"NDEATH")) >= 50 + 2, 10, "both nodes' deaths")
        assert sample(bridge, SP + "seq_gaps_total") == 0  # out-of-order pairs reordered
        assert sample(bridge, SP + "unplaced_total") == 2  # the two duplicates
        assert sample(bridge, SP + "rebirth_requests_total") >= 1
        assert sample(bridge, SP + "unknown_total") == 0
    assert (dead("schema"), dead("size"), dead("clock")) == (2, 1, skewed)
    # Every scheduled message is an entry (DDATA, or the DBIRTH of a device back from its
    # dropout) or a dead letter of the skewed clock.
    returned = sum(1 for r in records if r["kind"] == "dropout" and not r.get("truncated"))
    assert len(entries(b"DDATA")) + skewed + returned == report["sent"]
    assets = {f[b"asset"].decode() for f in entries(b"DDATA")}
    assert {r["asset"] for r in records} <= assets
    assert all(a.startswith(f"{unique}.node00") for a in assets)
    assert report["faults"] == {"malformed": 1, "wrong_type": 1, "oversized": 1, "duplicate": 2,
                                "out_of_order": 2, "restart": 1, "clock_skew": skewed}  # fmt: skip
