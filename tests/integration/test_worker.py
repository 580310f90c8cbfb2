"""The worker against a real redis-server: anomalies, own pending first, dead letters, outages,
and the `worker` command's readiness and clean SIGTERM exit. Helpers here serve the other
`test_worker_*` modules too."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT, FieldT

from bridge.record import value_field
from config.keys import Keys
from config.settings import Settings
from tests.clients import wait_for
from tests.faults import redis as own_redis
from tests.services import free_port, http_get, wait_until
from workers import streams
from workers.app import WorkerApp

pytestmark = pytest.mark.integration

ROUTE = "telemetry"
GROUP = "workers"
REPO = Path(__file__).resolve().parents[2]
# Worker settings with the threshold detector alone (its shipped rules).
THRESHOLDS_ONLY: dict[str, Any] = {
    "detectors": {"deviation": [], "rate": [], "flatline": [], "staleness": [], "sequence_gap": []}
}


@pytest.fixture
async def redis(redis_url: str, unique: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    keys = [key async for key in client.scan_iter(match=f"{unique}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def telemetry(unique: str, asset: str, seq: int, **values: float) -> dict[FieldT, EncodableT]:
    """An entry laid out as the bridge writes it (bridge.record)."""
    fields: dict[FieldT, EncodableT] = {
        "asset": asset,
        "seq": str(seq),
        "ts": str(1_700_000_000 + seq),
        "topic": f"{unique}/plant/s1/l1/{asset}/telemetry",
        "route": ROUTE,
        "rx": str(time.time()),
        "site": "s1",
        "line": "l1",
    }
    fields.update({value_field(name): str(value) for name, value in values.items()})
    return fields


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout_s: float = 10
) -> None:
    """Poll a condition (plain or awaitable) until it holds, failing with `what` after the timeout."""

    async def holds() -> bool:
        result = check()
        return await result if inspect.isawaitable(result) else result

    try:
        async with asyncio.timeout(timeout_s):
            # Redis and the metrics have no event to wait on, so poll.
            while not await holds():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


async def group_info(redis: Redis, stream: str) -> dict[str, Any]:
    with contextlib.suppress(Exception):
        for group in await redis.xinfo_groups(stream):
            if group["name"] == GROUP:
                return dict(group)
    return {}


def all_acked(redis: Redis, stream: str, total: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        info = await group_info(redis, stream)
        return info.get("entries-read") == total and info.get("pending") == 0

    return check


@contextlib.asynccontextmanager
async def running(app: WorkerApp, settings: Settings) -> AsyncIterator[None]:
    """Run the app as a task; on exit set stop and require `run` to return within the grace."""
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop), name="worker")
    try:
        yield
    finally:
        stop.set()
        stopped_at = time.monotonic()
        async with asyncio.timeout(settings.worker.shutdown_grace_s):
            await task
        assert time.monotonic() - stopped_at < settings.worker.shutdown_grace_s


async def entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """XRANGE of a whole stream (this client decodes responses: str ids and fields)."""
    return cast("list[tuple[str, dict[str, str]]]", await redis.xrange(key))


async def anomalies(redis: Redis, keys: Keys) -> list[dict[str, str]]:
    return [fields for _, fields in await entries(redis, keys.anomalies)]


async def test_flags_out_of_range_values_once_and_acks_every_entry(
    make_settings: Callable[..., Settings], redis: Redis, unique: str
) -> None:
    settings = make_settings(worker={"batch_size": 4, **THRESHOLDS_ONLY})
    keys = Keys(unique)
    stream = keys.telemetry(ROUTE)
    temperatures = [20.0, 95.0, 96.0, 97.0, 95.5, 30.0, 31.0, -25.0, -26.0, 10.0]
    ids = [
        str(
            await redis.xadd(stream, telemetry(unique, "pump-1", seq, temperature=t, vibration=1.0))
        )
        for seq, t in enumerate(temperatures)
    ]
    ids.append(str(await redis.xadd(stream, telemetry(unique, "fan-2", 0, vibration=9.5))))
    registry = CollectorRegistry()
    app = WorkerApp(settings, registry)

    async with running(app, settings):
        await eventually(all_acked(redis, stream, len(ids)), "every entry read and acked")

    def flag(
        event: str, i: int, asset: str, name: str, value: float, bound: float
    ) -> dict[str, str]:
        severity = "critical" if name == "temperature" else "warning"
        ts = str(1_700_000_000 + (0 if asset == "fan-2" else i))
        return {"event": event, "asset": asset, "route": ROUTE, "detector": "threshold",
                "value_name": name, "value": repr(value), "bound": repr(bound),
                "score": repr(value), "ts": ts, "stream": stream, "source_id": ids[i],
                "severity": severity}  # fmt: skip

    assert await anomalies(redis, keys) == [
        flag("start", 1, "pump-1", "temperature", 95.0, 90.0),
        flag("ended", 5, "pump-1", "temperature", 30.0, 90.0),
        flag("start", 7, "pump-1", "temperature", -25.0, -20.0),
        flag("ended", 9, "pump-1", "temperature", 10.0, -20.0),
        flag("start", 10, "fan-2", "vibration", 9.5, 8.0),
    ]
    info = await group_info(redis, stream)
    assert (info["pending"], info["entries-read"]) == (0, len(ids))
    labels = {"route": ROUTE}
    assert registry.get_sample_value("iotbridge_worker_entries_processed_total", labels) == 11
    assert registry.get_sample_value("iotbridge_worker_entries_acked_total", labels) == 11
    critical = {"route": ROUTE, "detector": "threshold", "severity": "critical"}
    assert registry.get_sample_value("iotbridge_worker_anomalies_total", critical) == 4
    assert not app.readiness()[0], "not ready once stopped"


async def test_own_pending_entries_are_processed_first_on_start(
    make_settings: Callable[..., Settings], redis: Redis, unique: str
) -> None:
    consumer = f"{unique}-c1"
    settings = make_settings(worker={"consumer": consumer, **THRESHOLDS_ONLY})
    stream = Keys(unique).telemetry(ROUTE)
    await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    pending_id = await redis.xadd(stream, telemetry(unique, "pump-1", 0, temperature=99.0))
    # A previous life of this consumer read the entry and died before acking it.
    delivered = cast("list[Any]", await redis.xreadgroup(GROUP, consumer, {stream: ">"}, count=1))
    assert delivered[0][1][0][0] == pending_id
    new_id = await redis.xadd(stream, telemetry(unique, "pump-2", 0, temperature=-50.0))

    async with running(WorkerApp(settings, CollectorRegistry()), settings):
        await eventually(all_acked(redis, stream, 2), "the pending and the new entry acked")

    flags = await anomalies(redis, Keys(unique))
    assert [(f["source_id"], f["event"]) for f in flags] == [
        (pending_id, "start"),
        (new_id, "start"),
    ]


async def test_a_malformed_entry_is_dead_lettered_and_acked(
    make_settings: Callable[..., Settings],
    redis: Redis,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="workers")
    settings = make_settings(worker=THRESHOLDS_ONLY)
    keys = Keys(unique)
    stream = keys.telemetry(ROUTE)
    no_asset = telemetry(unique, "pump-1", 0, temperature=20.0)
    del no_asset["asset"]
    not_a_number = {**telemetry(unique, "pump-1", 1), value_field("temperature"): "hot"}
    bad_ids = [await redis.xadd(stream, no_asset), await redis.xadd(stream, not_a_number)]
    good_id = await redis.xadd(stream, telemetry(unique, "pump-1", 2, temperature=120.0))

    async with running(WorkerApp(settings, CollectorRegistry()), settings):
        await eventually(all_acked(redis, stream, 3), "all three entries acked")

    letters = [fields for _, fields in await entries(redis, keys.worker_dead_letters)]
    assert [(f["source_id"], f["stream"], f["reason"]) for f in letters] == [
        (i, stream, "malformed") for i in bad_ids
    ]
    assert letters[0]["error"] == "missing field 'asset'"
    assert letters[1]["error"].startswith("a value is not a number")
    assert [f["source_id"] for f in await anomalies(redis, keys)] == [good_id]
    warnings = [r for r in caplog.records if r.name.startswith("workers")]
    assert [r.source_id for r in warnings] == bad_ids  # type: ignore[attr-defined]


async def test_survives_a_redis_outage_with_one_warning_and_resumes(
    make_settings: Callable[..., Settings], unique: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.INFO, logger="workers")
    service = own_redis(tmp_path / "redis")
    service.start()
    url = f"redis://127.0.0.1:{service.port}/0"
    settings = make_settings(redis={"url": url, "key_prefix": unique}, worker=THRESHOLDS_ONLY)
    stream = Keys(unique).telemetry(ROUTE)
    registry = CollectorRegistry()
    app = WorkerApp(settings, registry)
    redis = Redis.from_url(url, decode_responses=True)
    connected = {"target": "redis"}

    def reconnects() -> float:
        return registry.get_sample_value("iotbridge_worker_reconnects_total", connected) or 0

    try:
        async with running(app, settings):
            await eventually(lambda: app.readiness()[0], "the worker ready")
            service.stop()
            await eventually(lambda: not app.readiness()[0], "the outage noticed")
            assert registry.get_sample_value("iotbridge_worker_connected", connected) == 0
            await eventually(lambda: reconnects() >= 3, "a few reconnect attempts")
            service.start()
            # Redis came back empty (no persistence): the worker must create the group again.
            await eventually(lambda: app.readiness()[0], "the worker ready again")
            await redis.xadd(stream, telemetry(unique, "pump-1", 0, temperature=100.0))
            await eventually(all_acked(redis, stream, 1), "an entry written after the outage")
    finally:
        await redis.aclose()
        service.stop()

    ours = [r for r in caplog.records if r.name.startswith("workers")]
    messages = [r.getMessage() for r in ours if r.levelno >= logging.WARNING]
    assert len(messages) == 1
    assert messages[0].startswith("redis unavailable, retrying in ")
    assert any(r.getMessage() == "redis reconnected" for r in ours)
    assert registry.get_sample_value("iotbridge_worker_anomalies_total",
                                     {"route": ROUTE, "detector": "threshold",
                                      "severity": "critical"}) == 1  # fmt: skip


def test_the_worker_command_gets_ready_and_exits_zero_on_sigterm(
    redis_url: str, unique: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "IOTBRIDGE_REDIS__URL": redis_url,
        "IOTBRIDGE_REDIS__KEY_PREFIX": unique,
        "IOTBRIDGE_WORKER__METRICS_PORT": str(port),
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "worker"],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(
            lambda: http_get(port, "/readyz", 1)[0] == 200 or proc.poll() is not None,
            20, "/readyz to answer 200",
        )  # fmt: skip
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_the_lag_is_zero_once_the_group_has_the_last_entry_whatever_redis_counts(
    redis_url: str, unique: str
) -> None:
    """Redis 7.0 computes XINFO GROUPS' lag from a read counter that a restart from the
    append-only file can leave behind; `XGROUP SETID ... ENTRIESREAD 0` makes the same state."""
    client = Redis.from_url(redis_url, decode_responses=True)  # as the worker's
    stream = f"{unique}:s"
    try:
        for n in range(5):
            await client.xadd(stream, {"n": n})
        await client.xgroup_create(stream, "g", id="$")
        await client.execute_command("XGROUP", "SETID", stream, "g", "$", "ENTRIESREAD", 0)
        [raw] = await client.xinfo_groups(stream)
        assert raw["lag"] == 5  # what Redis reports: not a single entry is waiting
        assert (await streams.group_info(client, [stream], "g"))[stream]["lag"] == 0
        await client.xadd(stream, {"n": 5})  # now one is: Redis's count stands
        assert (await streams.group_info(client, [stream], "g"))[stream]["lag"] == 6
    finally:
        await client.delete(stream)
        await client.aclose()


# The reads of new entries (`workers.streams.Reading`): sent before a batch is processed, their
# replies read after it. A read given up must not stay open with its reply unread.

_READ = ("XREADGROUP", "GROUP", "g", "c", "COUNT", "10", "BLOCK", "5000", "STREAMS")


async def _open_reads(admin: Redis, name: str) -> int:
    """Connections named `name` that the server still has open."""
    return sum(1 for client in await admin.client_list() if client.get("name") == name)


def _reads_clients(redis_url: str, name: str) -> tuple[Redis, Redis]:
    """A client to look with, and one whose connections (the reads') are named `name`."""
    return (Redis.from_url(redis_url, decode_responses=True),
            Redis.from_url(redis_url, decode_responses=True, client_name=name))  # fmt: skip


async def test_reads_sent_before_one_that_cannot_be_sent_are_given_up(
    redis_url: str, unique: str
) -> None:
    name = f"{unique}-reads"
    admin, reads = _reads_clients(redis_url, name)
    # Nothing listens there: the second read cannot be sent (as a master refusing connections).
    gone = Redis(host="127.0.0.1", port=free_port(), client_name=name, socket_connect_timeout=1)
    stream = f"{unique}:s"
    await admin.xgroup_create(stream, "g", id="$", mkstream=True)
    reading = streams.Reading([stream])
    try:
        await reading.send(reads, (*_READ, stream, ">"))
        assert await _open_reads(admin, name) == 1  # blocked on the server, waiting for entries
        with pytest.raises(RedisConnectionError):
            await reading.send(gone, (*_READ, stream, ">"))
        await wait_for(lambda: _is(0, _open_reads(admin, name)), 5, "the first read closed")
        assert await reading.entries() == {}  # nothing left to read
    finally:
        await admin.delete(stream)
        for client in (admin, reads, gone):
            await client.aclose()


async def test_replies_not_read_when_the_reading_is_cancelled_are_given_up(
    redis_url: str, unique: str
) -> None:
    name = f"{unique}-reads"
    admin, reads = _reads_clients(redis_url, name)
    keys = [f"{unique}:a", f"{unique}:b"]
    for key in keys:
        await admin.xgroup_create(key, "g", id="$", mkstream=True)
    reading = streams.Reading(keys)
    try:
        for key in keys:  # two reads on two connections, as to two masters of a cluster
            await reading.send(reads, (*_READ, key, ">"))
        assert await _open_reads(admin, name) == 2
        # Cancelled while it waits for the first reply (no entry comes), as a stop past the
        # shutdown grace cancels the worker.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await reading.entries()
        await wait_for(lambda: _is(0, _open_reads(admin, name)), 5, "both reads closed")
    finally:
        await admin.delete(*keys)
        for client in (admin, reads):
            await client.aclose()


async def _is(expected: int, count: Awaitable[int]) -> bool:
    return await count == expected
