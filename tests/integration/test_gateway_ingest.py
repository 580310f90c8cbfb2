"""The HTTP gateway's ingest against a real redis-server, the gateway a real process.

Over HTTP the same contracts, dedup and dead letters as over MQTT: each hostile input of the MQTT
suite gets the dead letter the bridge's intake gives it and the status the API promises; counters
add up; NDJSON answers every line; tokens, 413, 415, 429 and 503 refuse what they should, and a
client retrying through a Redis outage ends with exactly one entry per reading.
"""

from __future__ import annotations

import gzip
import json
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import redis as redis_py

from bridge.intake import Intake
from bridge.source import Inbound
from config.keys import Keys
from config.settings import BridgeSettings
from tests.faults import payload, redis, topic
from tests.gateway_process import GatewayProcess
from tests.integration.test_bridge_faults import _corpus
from tests.services import Service, wait_until

pytestmark = pytest.mark.integration

JSON = {"Content-Type": "application/json"}
NDJSON = {"Content-Type": "application/x-ndjson"}


class Rig:
    def __init__(self, tmp_path: Path, name: str) -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.db: Service | None = None
        self.gateways: list[GatewayProcess] = []

    def redis(self, *extra: str) -> Service:
        self.db = redis(self.tmp_path / "redis", *extra).start()
        return self.db

    def gateway(self, env: dict[str, str] | None = None) -> GatewayProcess:
        assert self.db is not None
        gw = GatewayProcess(self.tmp_path / "gateway", name=self.name, env=env,
                            redis_url=f"redis://127.0.0.1:{self.db.port}/0")  # fmt: skip
        self.gateways.append(gw)
        return gw.start()

    def client(self) -> redis_py.Redis:
        assert self.db is not None
        return redis_py.Redis(port=self.db.port, socket_timeout=10)

    def close(self) -> None:
        for gw in self.gateways:
            gw.stop()
        if self.db is not None:
            self.db.signal(signal.SIGCONT)
            self.db.stop()


@pytest.fixture
def rig(tmp_path: Path, unique: str) -> Iterator[Rig]:
    rig = Rig(tmp_path, unique)
    try:
        yield rig
    finally:
        for gw in rig.gateways:
            print(f"--- gateway log\n{gw.tail(40)}")
        rig.close()


def url(gw: GatewayProcess, t: str) -> str:
    return f"{gw.url}/api/v1/topics/{quote(t, safe='/')}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def entries(client: redis_py.Redis, key: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in client.xrange(key)]


def telemetry_pairs(client: redis_py.Redis, name: str) -> Counter[tuple[str, int]]:
    rows = entries(client, Keys(name).telemetry("telemetry"))
    return Counter((f[b"asset"].decode(), int(f[b"seq"])) for f in rows)


# --- 1. the MQTT hostile-input suite over HTTP ----------------------------------------------------


@pytest.mark.timeout(300)
def test_every_hostile_input_gets_the_mqtt_dead_letter_and_its_status_and_counters_add_up(
    rig: Rig,
) -> None:
    rig.redis()
    gw = rig.gateway()
    token = gw.token("*")
    corpus = _corpus()
    hostile = [(reason, t, body) for reason, items in corpus.items() for t, body in items]
    # What the bridge's intake (the MQTT path) makes of each, with the same settings.
    intake = Intake(BridgeSettings(), Keys(rig.name))
    valid = [(topic(f"v{i % 10}"), payload(i // 10)) for i in range(100)]
    statuses: Counter[int] = Counter()
    by_reason: Counter[str] = Counter()
    with httpx.Client(timeout=30, headers=auth(token)) as http:
        for reason, t, body in hostile:
            response = http.post(url(gw, t), content=body, headers=JSON)
            statuses[response.status_code] += 1
            got = response.json()
            expected = intake.classify(Inbound(0, 1, t, t.encode(), body, False, 0,
                                               time.monotonic(), time.time()))  # fmt: skip
            assert expected.reason is not None
            if reason == "size":
                assert response.status_code == 413, (t, body[:80], got)
            else:
                assert response.status_code == 422, (t, body[:80], got)
            assert got["reason"] == expected.reason.value, (reason, t, body[:80], got)
            if reason in ("either", "json", "schema", "topic", "identity"):
                error = dict(zip(*[iter(expected.append.fields())] * 2, strict=True))[b"error"]
                assert got["error"] == error.decode(), (t, body[:80])
            by_reason[got["reason"]] += 1
        for t, body in valid:
            response = http.post(url(gw, t), content=body, headers=JSON)
            statuses[response.status_code] += 1
            assert response.status_code == 200
            assert response.json()["status"] == "stored"
        for t, body in valid[:10]:  # sent again: recognised
            response = http.post(url(gw, t), content=body, headers=JSON)
            statuses[response.status_code] += 1
            assert response.json() == {"status": "duplicate", "id": None}
        for t, body in valid[:5]:  # no token, unknown token: refused, nothing stored
            response = http.post(url(gw, t), content=body, headers={**JSON, "Authorization": ""})
            statuses[response.status_code] += 1
            assert response.status_code == 401
        response = http.post(
            url(gw, valid[0][0]), content=b"1", headers={"Content-Type": "text/plain"}
        )
        statuses[response.status_code] += 1
        assert response.status_code == 415

    client = rig.client()
    dead = entries(client, Keys(rig.name).dead_letters)
    dead_reasons = Counter(f[b"reason"].decode() for f in dead)
    assert len(hostile) >= 1000
    assert len(dead) == len(hostile)
    assert dead_reasons == by_reason
    for reason in ("size", "clock", "identity", "topic"):
        assert dead_reasons[reason] == len(corpus[reason]), reason
    assert dead_reasons["json"] + dead_reasons["schema"] == (
        len(corpus["json"]) + len(corpus["schema"]) + len(corpus["either"])
    )
    assert telemetry_pairs(client, rig.name) == Counter(
        {(f"v{i % 10}", i // 10): 1 for i in range(100)}
    )
    # Counters add up: requests = stored + duplicate + rejected + refused (by status).
    m = gw.metrics()
    requests = gw.total("iotbridge_gateway_requests_total", m)
    stored = gw.total("iotbridge_gateway_messages_total", m, outcome="stored")
    duplicate = gw.total("iotbridge_gateway_messages_total", m, outcome="duplicate")
    rejected = gw.total("iotbridge_gateway_messages_total", m, outcome="rejected")
    refused = sum(gw.total("iotbridge_gateway_requests_total", m, status=str(s))
                  for s in (401, 403, 415, 429, 503))  # fmt: skip
    assert requests == sum(statuses.values()) == len(hostile) + 100 + 10 + 5 + 1
    assert (stored, duplicate, rejected, refused) == (100, 10, len(hostile), 6)
    assert requests == stored + duplicate + rejected + refused
    for reason, count in by_reason.items():
        assert gw.total("iotbridge_gateway_messages_rejected_total", m, reason=reason) == count


# --- 2. NDJSON bulk -------------------------------------------------------------------------------


def test_ndjson_of_1000_lines_with_10_bad_stores_990_and_dead_letters_10_one_status_a_line(
    rig: Rig,
) -> None:
    rig.redis()
    gw = rig.gateway()
    token = gw.token("bulk-*")
    bad_at = set(range(7, 1000, 100))
    lines = []
    for i in range(1000):
        if i in bad_at:
            lines.append(b'{"ts": 1, "seq": "x"' if i % 200 == 7 else b'{"seq": 1}')
        else:
            lines.append(payload(i))
    body = b"\n".join(lines) + b"\n"
    with httpx.Client(timeout=30, headers=auth(token)) as http:
        response = http.post(url(gw, topic("bulk-1")), content=body, headers=NDJSON)
        assert response.status_code == 200
        answer = response.json()
        assert (answer["stored"], answer["duplicate"], answer["rejected"]) == (990, 0, 10)
        assert len(answer["results"]) == 1000
        for i, result in enumerate(answer["results"]):
            if i in bad_at:
                assert result["status"] == "rejected"
                assert result["reason"] in ("json", "schema")
            else:
                assert result["status"] == "stored"
                assert re.fullmatch(r"\d+-\d+", result["id"])
        # gzip, and again: every line now a duplicate or the same rejection
        again = http.post(url(gw, topic("bulk-1")), content=gzip.compress(body),
                          headers={**NDJSON, "Content-Encoding": "gzip"})  # fmt: skip
        assert again.status_code == 200
        assert (again.json()["stored"], again.json()["duplicate"], again.json()["rejected"]) == (
            0, 990, 10)  # fmt: skip
    client = rig.client()
    stored = telemetry_pairs(client, rig.name)
    assert stored == Counter({("bulk-1", i): 1 for i in range(1000) if i not in bad_at})
    assert len(entries(client, Keys(rig.name).dead_letters)) == 20
    m = gw.metrics()
    assert gw.total("iotbridge_gateway_messages_total", m, outcome="stored") == 990
    assert gw.total("iotbridge_gateway_messages_total", m, outcome="duplicate") == 990
    assert gw.total("iotbridge_gateway_messages_total", m, outcome="rejected") == 20
    assert gw.total("iotbridge_gateway_requests_total", m, endpoint="bulk", status="200") == 2


# --- 3. device tokens -----------------------------------------------------------------------------


def test_tokens_401_without_or_with_an_unknown_one_403_for_another_asset_revoked_within_refresh(
    rig: Rig,
) -> None:
    rig.redis()
    gw = rig.gateway(env={"IOTBRIDGE_GATEWAY__AUTH_FAILURES": "3",
                          "IOTBRIDGE_GATEWAY__AUTH_PENALTY_MS": "300",
                          "IOTBRIDGE_GATEWAY__TOKEN_REFRESH_S": "1"})  # fmt: skip
    one = gw.token("a1")
    pattern = gw.token("press-*")
    client = rig.client()
    stored = client.hgetall(Keys(rig.name).gateway_tokens)
    assert len(stored) == 2
    assert all(one.split("_")[2].encode() not in v for v in stored.values())  # only hashes
    listing = gw.cli("token", "list")
    assert listing.returncode == 0
    listed = [json.loads(line) for line in listing.stdout.splitlines()]
    assert sorted(r["asset"] for r in listed) == ["a1", "press-*"]
    assert one not in listing.stdout
    with httpx.Client(timeout=30) as http:
        bodies = {seq: payload(seq) for seq in (1, 2, 3)}  # a retry resends the same bytes

        def post(asset: str, token: str | None, seq: int = 1) -> httpx.Response:
            headers = {**JSON, **(auth(token) if token else {})}
            return http.post(url(gw, topic(asset)), content=bodies[seq], headers=headers)

        assert post("a1", one).status_code == 200
        assert post("press-7", pattern).status_code == 200
        missing = post("a1", None)
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert post("a1", "ibt_0123456789abcdef_" + "x" * 43).status_code == 401
        assert post("a1", one[:-1] + ("A" if one[-1] != "A" else "B")).status_code == 401
        assert post("a2", one).status_code == 403
        assert post("pump-1", pattern).status_code == 403
        # Five failures from this client so far, past the 3 allowed: the next ones are slowed.
        started = time.monotonic()
        assert post("a1", "nonsense").status_code == 401
        assert time.monotonic() - started >= 0.3
        assert post("a1", one, seq=2).status_code == 200  # a success clears the penalty
        revoke = gw.cli("token", "revoke", one.split("_")[1])
        assert revoke.returncode == 0, revoke.stderr
        assert gw.cli("token", "revoke", one.split("_")[1]).returncode == 1
        revoked = time.monotonic()
        wait_until(lambda: post("a1", one, seq=3).status_code == 401, 15, "revocation seen")
        assert time.monotonic() - revoked < 2  # gateway.token_refresh_s: 1
    pairs = telemetry_pairs(client, rig.name)
    assert pairs.pop(("a1", 3), 0) <= 1  # stored once if posted before the reload saw the revoke
    assert pairs == Counter({("a1", 1): 1, ("press-7", 1): 1, ("a1", 2): 1})
    m = gw.metrics()
    assert gw.total("iotbridge_gateway_auth_failures_total", m, status="403") == 2


# --- 4. 413, 415, 429 -----------------------------------------------------------------------------


def test_413_measured_while_reading_and_after_gzip_415_and_429_with_retry_after(rig: Rig) -> None:
    rig.redis()
    gw = rig.gateway(env={"IOTBRIDGE_BRIDGE__RATE_LIMIT__PER_ASSET_HZ": "0.5",
                          "IOTBRIDGE_BRIDGE__RATE_LIMIT__BURST": "5",
                          "IOTBRIDGE_GATEWAY__MAX_BULK_LINES": "100",
                          "IOTBRIDGE_GATEWAY__MAX_BULK_BYTES": "50000"})  # fmt: skip
    token = gw.token("*")
    limit = 65_536
    with httpx.Client(timeout=30, headers=auth(token)) as http:
        target = url(gw, topic("s1"))

        def chunks() -> Iterator[bytes]:  # streamed: no Content-Length to trust
            for _ in range(40):
                yield b"x" * 4096

        big = http.post(target, content=chunks(), headers=JSON)
        assert big.status_code == 413
        assert big.json()["reason"] == "size"
        bomb = gzip.compress(b" " * 10_000_000)  # 10 MB of spaces, 10 KB on the wire
        assert len(bomb) < limit
        response = http.post(target, content=bomb, headers={**JSON, "Content-Encoding": "gzip"})
        assert response.status_code == 413
        assert response.json()["reason"] == "size"
        ok = http.post(target, content=gzip.compress(payload(1)),
                       headers={**JSON, "Content-Encoding": "gzip"})  # fmt: skip
        assert ok.status_code == 200, ok.text
        assert http.post(target, content=payload(2), headers={"Content-Type": "text/plain"}
                         ).status_code == 415  # fmt: skip
        assert http.post(target, content=payload(2), headers={**JSON, "Content-Encoding": "br"}
                         ).status_code == 415  # fmt: skip
        assert http.post(target, content=b"not gzip", headers={**JSON, "Content-Encoding": "gzip"}
                         ).status_code == 415  # fmt: skip
        # NDJSON bounds: lines and decoded bytes, refused whole (nothing of it stored).
        lines = b"\n".join(payload(100 + i) for i in range(101))
        assert http.post(url(gw, topic("s2")), content=lines, headers=NDJSON).status_code == 413
        padded = b"\n".join([payload(300)] + [b" " * 1000] * 60)
        assert http.post(url(gw, topic("s2")), content=padded, headers=NDJSON).status_code == 413
        # 429: a burst of 5 then 0.5 msg/s; s1 has used one token (the gzip one).
        answers = [http.post(url(gw, topic("r1")), content=payload(i), headers=JSON)
                   for i in range(8)]  # fmt: skip
        codes = [a.status_code for a in answers]
        assert codes == [200] * 5 + [429] * 3
        assert answers[5].headers["Retry-After"] == "2"
    client = rig.client()
    assert telemetry_pairs(client, rig.name) == Counter(
        {("s1", 1): 1, **{("r1", i): 1 for i in range(5)}})  # fmt: skip
    dead = Counter(f[b"reason"] for f in entries(client, Keys(rig.name).dead_letters))
    assert dead == Counter({b"size": 2})  # 429 stores nothing


# --- 5. 503 and the bounded queue -----------------------------------------------------------------


def test_503_with_retry_after_while_redis_is_away_or_slow_then_one_entry_after_retries(
    rig: Rig,
) -> None:
    db = rig.redis("--appendonly", "yes", "--appendfsync", "always")
    gw = rig.gateway(env={"IOTBRIDGE_GATEWAY__WRITE_TIMEOUT_MS": "300",
                          "IOTBRIDGE_REDIS__SOCKET_TIMEOUT_S": "5",
                          "IOTBRIDGE_GATEWAY__PIPELINE": "1",
                          "IOTBRIDGE_GATEWAY__MAX_PENDING": "1"})  # fmt: skip
    token = gw.token("*")
    bodies = {seq: payload(seq) for seq in range(1, 6)}  # a retry resends the same bytes
    with httpx.Client(timeout=30, headers=auth(token)) as http:
        target = url(gw, topic("o1"))
        assert http.post(target, content=bodies[1], headers=JSON).status_code == 200
        db.signal(signal.SIGSTOP)  # Redis stalls: the write is not confirmed in 300 ms
        try:
            slow = http.post(target, content=bodies[2], headers=JSON)
            assert slow.status_code == 503
            assert int(slow.headers["Retry-After"]) >= 1
            # The queue's bound: one write in flight (stalled), one request waiting, a third is
            # refused at once.
            results: list[httpx.Response] = []
            waiting = threading.Thread(target=lambda: results.append(
                http.post(target, content=bodies[3], headers=JSON)))  # fmt: skip
            waiting.start()
            wait_until(lambda: gw.total("iotbridge_gateway_pending_messages") >= 1, 10,
                       "a request queued behind the stalled write")  # fmt: skip
            full = http.post(target, content=bodies[4], headers=JSON)
            assert full.status_code == 503
            assert "waiting" in full.json()["error"]
            waiting.join(30)
            assert results[0].status_code == 503
        finally:
            db.signal(signal.SIGCONT)
        # Retries until 200: the stalled write of seq 2 may have landed meanwhile; one entry.
        for seq in (2, 3, 4):
            wait_until(lambda s=seq: http.post(target, content=bodies[s], headers=JSON)
                       .status_code == 200, 30, f"seq {seq} stored")  # fmt: skip
        db.kill()
        away = http.post(target, content=bodies[5], headers=JSON)
        assert away.status_code == 503
        assert int(away.headers["Retry-After"]) >= 1
        db.start()
        wait_until(lambda: http.post(target, content=bodies[5], headers=JSON).status_code == 200,
                   30, "seq 5 stored after the restart")  # fmt: skip
    assert telemetry_pairs(rig.client(), rig.name) == Counter({("o1", s): 1 for s in range(1, 6)})


# --- 6. 64 concurrent clients through kill -9 of Redis -------------------------------------------


@pytest.mark.timeout(240)
def test_64_clients_posting_while_redis_is_killed_and_restarted_every_200_is_stored_once(
    rig: Rig,
) -> None:
    import asyncio

    # Every write Redis confirmed is on disk before the reply: what was answered 200 survives -9.
    db = rig.redis("--appendonly", "yes", "--appendfsync", "always")
    gw = rig.gateway(env={"IOTBRIDGE_GATEWAY__WRITE_TIMEOUT_MS": "1000"})
    token = gw.token("c*")
    clients, per_client = 64, 30
    bodies = {(c, s): payload(s) for c in range(clients) for s in range(per_client)}
    answered: dict[tuple[int, int], list[int]] = {key: [] for key in bodies}
    tally: Counter[str] = Counter()
    deadline = time.monotonic() + 150

    async def client(c: int, http: httpx.AsyncClient) -> None:
        target = url(gw, topic(f"c{c}"))
        for s in range(per_client):
            while time.monotonic() < deadline:
                try:
                    response = await http.post(target, content=bodies[c, s], headers=JSON)
                except httpx.TransportError:
                    tally["transport"] += 1
                    continue
                answered[c, s].append(response.status_code)
                tally[str(response.status_code)] += 1
                if response.status_code == 200:
                    tally[response.json()["status"]] += 1
                    break
                assert response.status_code == 503, response.text
                # Retry-After is whole seconds; a client may retry sooner (as this one does,
                # after a tenth of it) and be refused again until Redis is back.
                await asyncio.sleep(int(response.headers["Retry-After"]) / 10)

    async def run_clients() -> None:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(timeout=30, headers=auth(token), limits=limits) as http:
            await asyncio.gather(*(client(c, http) for c in range(clients)))

    runner = threading.Thread(target=lambda: asyncio.run(run_clients()))
    runner.start()
    try:
        wait_until(lambda: tally["200"] >= 400, 60, "400 readings stored")
        db.kill()  # SIGKILL
        wait_until(lambda: tally["503"] >= 64, 60, "64 requests refused while Redis is away")
        db.start()
    finally:
        runner.join(200)
    assert not runner.is_alive()
    pairs = telemetry_pairs(rig.client(), rig.name)
    ok = {key for key, codes in answered.items() if 200 in codes}
    assert len(ok) == clients * per_client  # every reading ended answered 200
    assert {(f"c{c}", s) for c, s in ok} == set(pairs)  # each 200 is stored...
    assert set(pairs.values()) == {1}  # ...exactly once
    assert tally["503"] >= 64
    assert tally["stored"] + tally["duplicate"] == clients * per_client
    m = gw.metrics()
    assert gw.total("iotbridge_gateway_requests_total", m, status="503") == tally["503"]
    assert gw.total("iotbridge_gateway_messages_total", m, outcome="stored") == tally["stored"]
    assert gw.total("iotbridge_gateway_write_errors_total", m) >= 1
    # Every message answered 200 was in a write Redis confirmed (the batch sizes' sum counts
    # them; writes whose reply came after their request's 503 count too).
    assert m["iotbridge_gateway_batch_size_sum"] >= tally["200"]


# --- 7. as compose deploys it: its own Redis ACL user ---------------------------------------------


def test_the_gateway_works_as_its_compose_redis_user_and_is_refused_the_rest(
    tmp_path: Path, unique: str
) -> None:
    from tests.compose_config import PASSWORDS, redis_with_compose_acl

    db = redis_with_compose_acl(tmp_path, unique).start()
    gw = GatewayProcess(tmp_path / "gateway", name=unique,
                        redis_url=f"redis://127.0.0.1:{db.port}/0",
                        env={"IOTBRIDGE_REDIS__USERNAME": "gateway",
                             "IOTBRIDGE_REDIS__PASSWORD": PASSWORDS["REDIS_GATEWAY_PASSWORD"]})  # fmt: skip
    try:
        gw.start()
        token = gw.token("acl-*")  # `token create` as the gateway's user
        with httpx.Client(timeout=30, headers=auth(token)) as http:
            ok = http.post(url(gw, topic("acl-1")), content=payload(1), headers=JSON)
            assert ok.status_code == 200, ok.text
            bad = http.post(url(gw, topic("acl-1")), content=b"{", headers=JSON)
            assert bad.status_code == 422
            again = http.post(url(gw, topic("acl-1")), content=payload(2), headers=NDJSON)
            assert again.json()["stored"] == 1
        assert gw.cli("token", "list").returncode == 0
        admin = redis_py.Redis(port=db.port, username="admin",
                               password=PASSWORDS["REDIS_ADMIN_PASSWORD"])  # fmt: skip
        keys = Keys(unique)
        assert admin.xlen(keys.telemetry("telemetry")) == 2
        assert admin.xlen(keys.dead_letters) == 1
        user = redis_py.Redis(port=db.port, username="gateway",
                              password=PASSWORDS["REDIS_GATEWAY_PASSWORD"])  # fmt: skip
        for refused in (lambda: user.delete(keys.telemetry("telemetry")),
                        lambda: user.xdel(keys.telemetry("telemetry"), "0-1"),
                        user.flushall, lambda: user.keys("*"),
                        lambda: user.xadd(keys.anomalies, {"x": "1"})):  # fmt: skip
            with pytest.raises(redis_py.exceptions.NoPermissionError):
                refused()
        admin.close()
        user.close()
    finally:
        gw.stop()
        db.stop()


# --- 8. the command's exit codes ------------------------------------------------------------------


def test_the_gateway_stops_on_sigterm_with_0_and_refuses_a_port_in_use_with_one_line_and_2(
    rig: Rig,
) -> None:
    import os
    import socket
    import subprocess
    import sys

    rig.redis()
    gw = rig.gateway()
    assert gw.stop() == 0
    assert "gateway stopped" in gw.tail()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**gw.env, "IOTBRIDGE_GATEWAY__PORT": str(taken.getsockname()[1])}
        result = subprocess.run([sys.executable, "-m", "bridge.cli", "gateway"], env={**os.environ, **env},
                                capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


# --- 9. HTTPS (the http.tls section, as for every process) ----------------------------------------


def test_the_gateway_serves_https_with_http_tls_and_refuses_plain_http(rig: Rig) -> None:
    import ssl
    import subprocess

    certs = rig.tmp_path / "certs"
    root = Path(__file__).parents[2]
    subprocess.run(["sh", str(root / "broker" / "make-dev-certs.sh"), str(certs)], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    rig.redis()
    gw = GatewayProcess(rig.tmp_path / "gateway", name=rig.name,
                        redis_url=f"redis://127.0.0.1:{rig.db.port}/0",  # type: ignore[union-attr]
                        env={"IOTBRIDGE_HTTP__TLS__CERT_FILE": str(certs / "server.crt"),
                             "IOTBRIDGE_HTTP__TLS__KEY_FILE": str(certs / "server.key")})  # fmt: skip
    rig.gateways.append(gw)
    gw.service.start()
    token = gw.token("tls-*")
    https = f"https://127.0.0.1:{gw.port}"
    trust = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with httpx.Client(timeout=30, verify=trust, headers=auth(token)) as http:
        wait_until(lambda: http.get(f"{https}/readyz").status_code == 200, 30, "ready over HTTPS")
        ok = http.post(f"{https}/api/v1/topics/{topic('tls-1')}", content=payload(1), headers=JSON)
        assert ok.status_code == 200, ok.text
        assert http.get(f"{https}/docs").status_code == 200
    with httpx.Client(timeout=5) as plain, pytest.raises(httpx.TransportError):
        plain.get(f"http://127.0.0.1:{gw.port}/readyz")
    assert telemetry_pairs(rig.client(), rig.name) == Counter({("tls-1", 1): 1})
    gw.stop()
    gone = GatewayProcess(rig.tmp_path / "gone", name=rig.name, redis_url="redis://127.0.0.1:1/0",
                          env={"IOTBRIDGE_HTTP__TLS__CERT_FILE": str(certs / "nothing.crt"),
                               "IOTBRIDGE_HTTP__TLS__KEY_FILE": str(certs / "server.key")})  # fmt: skip
    missing = gone.cli("gateway")
    assert missing.returncode == 2
    assert "No such file" in missing.stderr
    assert "Traceback" not in missing.stderr
