"""The admin API against a real redis-server, with the gateway serving HTTP in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from config.keys import Keys
from config.settings import Settings
from gateway.admin import close_live_streams
from gateway.admin_anomalies import BUFFER_EVENTS
from gateway.server import GatewayApp
from tests.clients import Publisher, running_bridge, wait_for
from tests.services import redis_service, require
from workers.anomaly import AnomalyEvent, Event

pytestmark = pytest.mark.integration

TOKEN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[GatewayApp]:
    """A gateway serving on a free loopback port in this event loop, ready when yielded."""
    app = GatewayApp(settings, CollectorRegistry())
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop), name="gateway-under-test")
    try:
        await wait_for(lambda: app.readiness()[0] or task.done(), 15, "the gateway to be ready")
        if task.done():
            task.result()
        yield app
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


def gateway_settings(make_settings: Callable[..., Settings], unique: str, **extra: Any) -> Settings:
    gateway = {"port": 0, "admin_token": TOKEN, **extra.pop("gateway", {})}
    return make_settings(gateway=gateway, **extra)


def client(app: GatewayApp, auth: dict[str, str] | None = AUTH) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", headers=auth, timeout=30)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def pump_settings(make_settings: Callable[..., Settings], unique: str, flow_max: float) -> Settings:
    return gateway_settings(
        make_settings, unique,
        bridge={
            "routes": [{"name": "pumps", "topic": f"{unique}/plant/{{site}}/{{line}}/{{asset}}/pump",
                        "contract": "pump"}],
            "contracts": {"pump": {"values": {"flow": {"type": "number", "min": 0, "max": flow_max}}}},
            "metrics_port": 0, "shutdown_grace_s": 5,
        },
    )  # fmt: skip


def pump(seq: int, flow: float) -> bytes:
    return json.dumps({"ts": time.time(), "seq": seq, "values": {"flow": flow}}).encode()


async def test_admin_token_is_required(make_settings, unique) -> None:
    async with running_gateway(gateway_settings(make_settings, unique)) as app:
        async with client(app, auth=None) as http:
            paths = ["/api/v1/dead-letters", "/api/v1/streams", "/api/v1/anomalies",
                     "/api/v1/routes", "/api/v1/contracts", "/api/v1/anomalies/stream/clients"]  # fmt: skip
            for path in paths:
                missing = await http.get(path)
                assert missing.status_code == 401, path
                assert missing.headers["www-authenticate"].startswith("Bearer")
                wrong = await http.get(path, headers={"Authorization": "Bearer " + "x" * 32})
                assert wrong.status_code == 401, path
                assert "invalid_token" in wrong.headers["www-authenticate"]
                assert (await http.get(path, headers=AUTH)).status_code == 200, path
            # Mutations are guarded the same way.
            assert (await http.post("/api/v1/dead-letters/replay", json={})).status_code == 401
            assert (await http.delete("/api/v1/dead-letters/1-0")).status_code == 401
            assert (await http.get("/api/v1/anomalies/stream")).status_code == 401
            spec = (await http.get("/openapi.json")).json()
        scheme = spec["components"]["securitySchemes"]["adminToken"]
        assert scheme == {**scheme, "type": "http", "scheme": "bearer"}
        admin_ops = [(path, op) for path, ops in spec["paths"].items() for op in ops.values()
                     if not path.startswith("/api/v1/topics")]  # fmt: skip
        assert len(admin_ops) == 12
        for path, op in admin_ops:
            assert {"adminToken": []} in op["security"], path
            assert "401" in op["responses"], path
            # A typed answer with an example (the SSE stream's is its text/event-stream example).
            ok = op["responses"].get("200") or op["responses"]["204"]
            examples = []
            for media in ok.get("content", {}).values():
                schema = media.get("schema", {})
                ref = schema.get("items", schema).get("$ref", "")
                component = spec["components"]["schemas"].get(ref.split("/")[-1], {})
                examples += [*component.get("examples", []), *media.get("example", [])]
            assert examples or "content" not in ok, path  # 204: no content

    no_token = gateway_settings(make_settings, unique, gateway={"admin_token": None})
    async with running_gateway(no_token) as app, client(app) as http:
        refused = await http.get("/api/v1/dead-letters")
        assert refused.status_code == 403
        assert "IOTBRIDGE_GATEWAY__ADMIN_TOKEN" in refused.json()["detail"]


async def test_replay_after_a_contract_fix_stores_once(make_settings, unique, redis) -> None:
    keys = Keys(unique)
    topic = f"{unique}/plant/s1/l1/p1/pump"
    # The contract was too strict (flow <= 10): 100 readings of 50 were dead-lettered.
    async with running_gateway(pump_settings(make_settings, unique, flow_max=10)) as app:
        outcomes = await asyncio.gather(
            *(app.ingestor.ingest(topic, pump(i, 50)) for i in range(100))
        )
        assert {o.status for o in outcomes} == {"rejected"}
        for i in range(5):  # and 5 that no contract will take
            await app.ingestor.ingest(topic, b'{"ts": 1, "seq": ' + str(i).encode())
    assert await redis.xlen(keys.dead_letters) == 105
    originals = await redis.xrange(keys.dead_letters, "-", "+", count=10)

    settings = pump_settings(make_settings, unique, flow_max=500)
    async with running_gateway(settings) as app, client(app) as http:
        # List: filters and cursor.
        pages, cursor = [], None
        while True:
            params: dict[str, str | int] = {"reason": "schema", "route": "pumps", "count": 30}
            if cursor is not None:
                params["cursor"] = cursor
            page = (await http.get("/api/v1/dead-letters", params=params)).json()
            pages.append(len(page["items"]))
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [30, 30, 30, 10]
        broken = (await http.get("/api/v1/dead-letters", params={"reason": "json"})).json()
        assert len(broken["items"]) == 5
        assert broken["items"][0]["topic"] == topic
        assert broken["items"][0]["payload"] == '{"ts": 1, "seq": 0'
        assert (await http.get("/api/v1/dead-letters", params={"route": "other"})).json()[
            "items"
        ] == []
        one = (await http.get(f"/api/v1/dead-letters/{originals[0][0].decode()}")).json()
        assert one["reason"] == "schema"
        assert "flow" in one["error"]
        assert not one["truncated"]
        assert json.loads(one["payload"])["values"] == {"flow": 50}

        # Replay after the fix: 100 stored, the 5 broken ones dead-lettered again.
        replay = await http.post("/api/v1/dead-letters/replay", json={"reason": "schema"})
        assert replay.json() == {"matched": 100, "stored": 100, "duplicate": 0, "rejected": 0,
                                 "not_replayable": 0, "complete": True}  # fmt: skip
        stream = keys.telemetry("pumps")
        assert await redis.xlen(stream) == 100
        assert await redis.xlen(keys.dead_letters) == 5

        # Replayed again: 0 more.
        again = (await http.post("/api/v1/dead-letters/replay", json={})).json()
        assert again == {"matched": 5, "stored": 0, "duplicate": 0, "rejected": 5,
                         "not_replayable": 0, "complete": True}  # fmt: skip
        assert await redis.xlen(stream) == 100
        remaining = (await http.get("/api/v1/dead-letters")).json()["items"]
        assert [r["reason"] for r in remaining] == ["json"] * 5
        assert remaining[0]["id"] != broken["items"][0]["id"]  # written again, the old removed

        # A replay whose removal was lost (copies of replayed ones): the dedup stores nothing.
        for _, fields in originals:
            await redis.xadd(keys.dead_letters, fields)
        copies = (await http.post("/api/v1/dead-letters/replay", json={"reason": "schema"})).json()
        assert (copies["matched"], copies["duplicate"], copies["stored"]) == (10, 10, 0)
        assert await redis.xlen(stream) == 100

        # One by id, then delete.
        victim = remaining[0]["id"]
        single = (await http.post(f"/api/v1/dead-letters/{victim}/replay")).json()
        assert (single["status"], single["reason"]) == ("rejected", "json")
        assert (await http.get(f"/api/v1/dead-letters/{victim}")).status_code == 404
        target = (await http.get("/api/v1/dead-letters", params={"count": 1})).json()["items"][0][
            "id"
        ]
        assert (await http.delete(f"/api/v1/dead-letters/{target}")).status_code == 204
        assert (await http.get(f"/api/v1/dead-letters/{target}")).status_code == 404
        assert (await http.delete(f"/api/v1/dead-letters/{target}")).status_code == 404
        assert (await http.post(f"/api/v1/dead-letters/{target}/replay")).status_code == 404
        assert await redis.xlen(keys.dead_letters) == 4
        assert (await http.get("/api/v1/dead-letters/not-an-id")).status_code == 422


async def test_mqtt_dead_letters_replayed_over_the_gateway(
    make_settings, unique, mqtt_url, redis
) -> None:
    """Dead letters the bridge wrote for MQTT messages, replayed by the gateway after the fix."""
    keys = Keys(unique)
    strict = pump_settings(make_settings, unique, flow_max=10)
    publisher = Publisher(mqtt_url, f"{unique}-pub", strict.mqtt.protocol)
    try:
        async with running_bridge(strict):
            for seq in range(100):
                publisher.publish(f"{unique}/plant/s1/l1/p{seq % 4}/pump", pump(seq, 50))
            assert publisher.wait_acked() == 100

            async def dead_lettered() -> bool:
                return int(await redis.xlen(keys.dead_letters)) == 100

            await wait_for(dead_lettered, 20, "100 dead letters from the bridge")
    finally:
        publisher.close()
    assert await redis.xlen(keys.dead_letters) == 100
    fixed = pump_settings(make_settings, unique, flow_max=500)
    async with running_gateway(fixed) as app, client(app) as http:
        first = (await http.post("/api/v1/dead-letters/replay", json={"route": "pumps"})).json()
        again = (await http.post("/api/v1/dead-letters/replay", json={"route": "pumps"})).json()
    assert (first["matched"], first["stored"]) == (100, 100)
    assert (again["matched"], again["stored"]) == (0, 0)
    assert await redis.xlen(keys.telemetry("pumps")) == 100
    assert await redis.xlen(keys.dead_letters) == 0


async def test_truncated_dead_letter_is_not_replayed(make_settings, unique, redis) -> None:
    settings = gateway_settings(make_settings, unique, bridge={"dlq_payload_bytes": 16})
    topic = f"{unique}/plant/s1/l1/a1/telemetry"
    async with running_gateway(settings) as app, client(app) as http:
        await app.ingestor.ingest(topic, json.dumps({"ts": time.time(), "seq": "x" * 40}).encode())
        letter = (await http.get("/api/v1/dead-letters")).json()["items"][0]
        assert letter["truncated"]
        assert len(letter["payload"]) == 16
        result = (await http.post(f"/api/v1/dead-letters/{letter['id']}/replay")).json()
        assert (result["status"], result["reason"]) == ("not_replayable", "truncated")
        assert await redis.xlen(Keys(unique).dead_letters) == 1


async def test_streams_match_xinfo(make_settings, unique, redis) -> None:
    settings = gateway_settings(
        make_settings, unique, redis={"stream_shards": 2},
        bridge={"retention": {"max_entries": 40}},
    )  # fmt: skip
    keys = Keys(unique, 2)
    async with running_gateway(settings) as app, client(app) as http:
        for asset in ("a1", "a2", "a3", "a4", "a5"):
            topic = f"{unique}/plant/s1/l1/{asset}/telemetry"
            await asyncio.gather(*(app.ingestor.ingest(topic, pump(i, 1)) for i in range(12)))
        shard0 = keys.telemetry("telemetry", 0)
        await redis.xgroup_create(shard0, "readers", id="0")
        await redis.xreadgroup("readers", "r1", {shard0: ">"}, count=7)
        streams = (await http.get("/api/v1/streams")).json()
    assert [(s["route"], s["shard"]) for s in streams] == [("telemetry", 0), ("telemetry", 1)]
    assert sum(s["length"] for s in streams) == 60
    for stream in streams:
        info = await redis.xinfo_stream(stream["key"])
        groups = await redis.xinfo_groups(stream["key"])
        assert stream["exists"]
        assert stream["length"] == info["length"] > 0
        assert stream["first_id"] == info["first-entry"][0].decode()
        assert stream["last_id"] == info["last-entry"][0].decode()
        assert stream["max_entries"] == 40
        assert stream["fill_ratio"] == pytest.approx(info["length"] / 40)
        assert [(g["name"], g["consumers"], g["pending"], g["lag"], g["last_delivered_id"])
                for g in stream["groups"]] == [
            (g["name"].decode(), g["consumers"], g["pending"], g["lag"],
             g["last-delivered-id"].decode()) for g in groups
        ]  # fmt: skip
    first = streams[0]["groups"][0]
    assert (first["pending"], first["lag"]) == (7, streams[0]["length"] - 7)


def anomaly(asset: str, detector: str, value: float) -> dict[str, str]:
    event = AnomalyEvent(Event.START, asset, "telemetry", detector, "temperature", value, 110.0,
                         value, repr(time.time()), "1-0", "critical")  # fmt: skip
    return event.to_fields("iotbridge:tel:telemetry")


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """Server-sent events as dicts of their fields."""
    event: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")


async def test_anomaly_query_and_live_stream(make_settings, unique, redis) -> None:
    key = Keys(unique).anomalies
    before = [await redis.xadd(key, anomaly(a, d, 120.0)) for a in ("a1", "a2")
              for d in ("threshold", "rate")]  # fmt: skip
    async with running_gateway(gateway_settings(make_settings, unique)) as app, client(app) as http:
        page = (await http.get("/api/v1/anomalies", params={"asset": "a1"})).json()
        assert [(a["asset"], a["detector"]) for a in page["items"]] == [
            ("a1", "threshold"),
            ("a1", "rate"),
        ]
        assert page["items"][0]["value"] == 120.0
        assert page["items"][0]["id"] == before[0].decode()
        rate = (await http.get("/api/v1/anomalies", params={"detector": "rate", "count": 1})).json()
        assert [a["asset"] for a in rate["items"]] == ["a1"]
        assert rate["next_cursor"] is not None
        rest = (
            await http.get(
                "/api/v1/anomalies", params={"detector": "rate", "cursor": rate["next_cursor"]}
            )
        ).json()
        assert [a["asset"] for a in rest["items"]] == ["a2"]
        assert rest["next_cursor"] is None
        # The window: from the third entry's time on (ids are Redis ms).
        third_ms = int(before[2].split(b"-")[0])
        since = (await http.get("/api/v1/anomalies", params={"since": third_ms / 1000})).json()
        assert {a["id"] for a in since["items"]} >= {b.decode() for b in before[2:]}
        until = (await http.get("/api/v1/anomalies", params={"until": 1.0})).json()
        assert until["items"] == []

        # Live: a client filtered on a2 receives the a2 event written while it listens.
        async with http.stream("GET", "/api/v1/anomalies/stream", params={"asset": "a2"}) as live:
            assert live.status_code == 200
            assert live.headers["content-type"].startswith("text/event-stream")
            events = sse_events(live)
            assert (await anext(events))["event"] == "ready"
            await redis.xadd(key, anomaly("a1", "threshold", 130.0))
            written = await redis.xadd(key, anomaly("a2", "threshold", 131.0))
            async with asyncio.timeout(10):
                got = await anext(events)
            assert (got["event"], got["id"]) == ("anomaly", written.decode())
            assert json.loads(got["data"])["asset"] == "a2"
            assert json.loads(got["data"])["value"] == 131.0
            clients = (await http.get("/api/v1/anomalies/stream/clients")).json()
            assert clients["connected"] == 1
        # Resume: Last-Event-ID gets what came after it from Redis first.
        headers = {"Last-Event-ID": before[0].decode()}
        async with http.stream("GET", "/api/v1/anomalies/stream", params={"asset": "a1"},
                               headers=headers) as resumed:  # fmt: skip
            events = sse_events(resumed)
            assert (await anext(events))["event"] == "ready"
            async with asyncio.timeout(10):
                missed = [await anext(events) for _ in range(2)]
        assert [json.loads(e["data"])["detector"] for e in missed] == ["rate", "threshold"]
        assert missed[1]["id"] != written.decode()
        await wait_for(lambda: app_clients(http), 10, "the clients to be gone")

        # Stopping: a live stream is told and ends, so it does not hold the server's stop.
        async with http.stream("GET", "/api/v1/anomalies/stream") as last:
            events = sse_events(last)
            assert (await anext(events))["event"] == "ready"
            close_live_streams(app.context)
            async with asyncio.timeout(10):
                rest = [event async for event in events]
        assert [e["event"] for e in rest] == ["closing"]
        assert json.loads(rest[0]["data"])["last_event_id"] == written.decode()
        assert (await http.get("/api/v1/anomalies/stream")).status_code == 503


async def test_stop_ends_live_streams(make_settings, unique, caplog) -> None:
    gateway = running_gateway(gateway_settings(make_settings, unique))
    app = await gateway.__aenter__()
    stopping: asyncio.Task[bool | None] | None = None
    try:
        async with client(app) as http, http.stream("GET", "/api/v1/anomalies/stream") as live:
            events = sse_events(live)
            assert (await anext(events))["event"] == "ready"
            stopping = asyncio.create_task(gateway.__aexit__(None, None, None))
            async with asyncio.timeout(15):
                rest = [event async for event in events]
                await stopping
    finally:
        if stopping is None:
            await gateway.__aexit__(None, None, None)
    assert [e["event"] for e in rest] == ["closing"]
    # The server stopped without waiting out its graceful-shutdown timeout on the stream.
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_redis_away_is_503_with_retry_after(make_settings, unique, tmp_path) -> None:
    own = require(redis_service(tmp_path), "redis-server").start()
    settings = gateway_settings(make_settings, unique, redis={"url": f"redis://127.0.0.1:{own.port}/0",
                                                              "key_prefix": unique})  # fmt: skip
    try:
        async with running_gateway(settings) as app, client(app) as http:
            topic = f"{unique}/plant/s1/l1/a1/telemetry"
            await app.ingestor.ingest(topic, b"not json")
            letter = (await http.get("/api/v1/dead-letters")).json()["items"][0]["id"]
            own.kill()
            for method, path in [("GET", "/api/v1/dead-letters"), ("GET", "/api/v1/streams"),
                                 ("GET", "/api/v1/anomalies"), ("GET", "/api/v1/anomalies/stream"),
                                 ("POST", f"/api/v1/dead-letters/{letter}/replay"),
                                 ("DELETE", f"/api/v1/dead-letters/{letter}")]:  # fmt: skip
                answer = await http.request(method, path)
                assert answer.status_code == 503, (method, path, answer.text)
                assert int(answer.headers["retry-after"]) >= 1
            replay = await http.post("/api/v1/dead-letters/replay", json={})
            assert replay.status_code == 503
            # Back (empty: this Redis keeps nothing on disk): the same requests work again.
            own.start()
            await wait_for(lambda: dead_letters_answer(http), 15, "the admin API to answer again")
            assert (await http.get("/api/v1/streams")).status_code == 200
    finally:
        own.stop()


async def dead_letters_answer(http: httpx.AsyncClient) -> bool:
    return (await http.get("/api/v1/dead-letters")).status_code == 200


async def app_clients(http: httpx.AsyncClient) -> bool:
    clients: dict[str, int] = (await http.get("/api/v1/anomalies/stream/clients")).json()
    return clients["connected"] == 0


async def test_slow_live_client_is_cut_off_and_resumes(make_settings, unique, redis) -> None:
    key = Keys(unique).anomalies
    async with running_gateway(gateway_settings(make_settings, unique)) as app, client(app) as http:
        # A client that stops reading: a small receive buffer, so the server's writes block soon.
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", app.port))
        slow.sendall(f"GET /api/v1/anomalies/stream HTTP/1.1\r\nHost: t\r\n"
                     f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())  # fmt: skip
        received = b""
        while b"event: ready" not in received:
            received += await asyncio.to_thread(slow.recv, 4096)
        written = 0
        fields = anomaly("a1", "threshold", 120.0)
        # Write until the gateway cuts it off; bounded in count.
        while (await http.get("/api/v1/anomalies/stream/clients")).json()["cut_off_total"] == 0:
            assert written < 200_000, "the slow client was never cut off"
            async with redis.pipeline(transaction=False) as pipe:
                for _ in range(1000):
                    pipe.xadd(key, fields)
                await pipe.execute()
            written += 1000
        assert written > BUFFER_EVENTS
        assert (await http.get("/api/v1/anomalies/stream/clients")).json()["connected"] == 0
        # Now read what it got: the events up to the cut, `overflow`, and the end of the response.
        slow.settimeout(10)
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked body
            chunk = await asyncio.to_thread(slow.recv, 65536)
            assert chunk, "the connection closed before the end of the response"
            received += chunk
        slow.close()
        text = received.decode()
        got = text.count("event: anomaly")
        assert "event: overflow" in text
        assert 0 < got < written
        overflow = re.search(r"event: overflow\r\ndata: ([^\r]*)\r\n", text)
        assert overflow is not None
        resume = json.loads(overflow.group(1))
        resume_id = resume["last_event_id"]
        # Reconnecting from there gets exactly the rest, from Redis.
        async with http.stream("GET", "/api/v1/anomalies/stream",
                               headers={"Last-Event-ID": resume_id}) as again:  # fmt: skip
            events = sse_events(again)
            assert (await anext(events))["event"] == "ready"
            rest = 0
            async with asyncio.timeout(60):
                while rest < written - got:
                    event = await anext(events)
                    assert event["event"] == "anomaly"
                    rest += 1
        assert got + rest == written
