"""The `http` section: basic auth on /metrics and HTTPS (with client certificates) on the port every
process serves, checked with the server in this process, with a real `iotbridge broker` process,
and with a real Prometheus scraping as observability/prometheus/prometheus.yml documents it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from config.settings import HttpSettings
from observability.http import HealthServer
from observability.render import Prometheus
from tests.compose_config import require
from tests.services import Service, free_port, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
SECRET = "metrics-Secret-5d1e7a"
USER = "prometheus"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run(["sh", str(ROOT / "broker" / "make-dev-certs.sh"), str(directory), "prometheus"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return directory


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all
    headers: dict[str, str]
    body: str


def get(
    url: str,
    *,
    auth: tuple[str, str] | None = None,
    ca: Path | None = None,
    client: tuple[Path, Path] | None = None,
) -> Answer:
    """One GET as a scraper or a probe would send it."""
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if client is not None:
            context.load_cert_chain(*client)
    request = urllib.request.Request(url)  # noqa: S310 -- the test's own loopback URLs
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:  # noqa: S310
            return Answer(response.status, dict(response.headers), response.read().decode())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read().decode())
    except (OSError, http.client.HTTPException) as exc:
        return Answer(0, {}, repr(exc))


def _server_files(certs: Path) -> dict[str, str]:
    return {"cert_file": str(certs / "server.crt"), "key_file": str(certs / "server.key")}


@contextlib.asynccontextmanager
async def serving(http: HttpSettings) -> AsyncIterator[int]:
    """The /metrics server of every process, in this event loop, on a free port."""
    registry = CollectorRegistry()
    Counter("iotbridge_test_requests", "A sample to find in /metrics.", registry=registry).inc()
    server = HealthServer("127.0.0.1", 0, registry, lambda: (True, "ready"), http)
    await server.start()
    try:
        yield server.port
    finally:
        await server.close()


async def test_metrics_need_the_right_credentials_and_the_probes_none() -> None:
    http = HttpSettings(username=USER, password=SECRET)
    async with serving(http) as port:
        base = f"http://127.0.0.1:{port}"
        anonymous, wrong, other_user, right = await asyncio.gather(
            asyncio.to_thread(get, f"{base}/metrics"),
            asyncio.to_thread(get, f"{base}/metrics", auth=(USER, "not-" + SECRET)),
            asyncio.to_thread(get, f"{base}/metrics", auth=("admin", SECRET)),
            asyncio.to_thread(get, f"{base}/metrics", auth=(USER, SECRET)),
        )
        probes = [await asyncio.to_thread(get, f"{base}{path}") for path in ("/healthz", "/readyz")]
    for refused in (anonymous, wrong, other_user):
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith('Basic realm="iotbridge metrics"')
        assert "iotbridge_test_requests" not in refused.body
    assert right.status == 200
    assert "iotbridge_test_requests_total 1.0" in right.body
    assert [(p.status, p.body) for p in probes] == [(200, "ok\n"), (200, "ready\n")]


async def test_https_with_the_dev_ca_and_plain_http_to_the_tls_port_fails(certs: Path) -> None:
    async with serving(HttpSettings(tls=_server_files(certs))) as port:
        https = await asyncio.to_thread(
            get, f"https://localhost:{port}/metrics", ca=certs / "ca.crt"
        )
        plain = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
        untrusted = await asyncio.to_thread(get, f"https://localhost:{port}/metrics")
        # The server still answers after those failures.
        after = await asyncio.to_thread(
            get, f"https://127.0.0.1:{port}/healthz", ca=certs / "ca.crt"
        )
    assert https.status == 200
    assert "iotbridge_test_requests_total 1.0" in https.body
    assert plain.status == 0, plain
    assert untrusted.status == 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.body
    assert (after.status, after.body) == (200, "ok\n")


def test_a_missing_certificate_file_stops_the_process_with_one_line(tmp_path: Path) -> None:
    env = {"IOTBRIDGE_BROKER__PORT": str(free_port()), "IOTBRIDGE_BROKER__METRICS_PORT": "0",
           "IOTBRIDGE_HTTP__TLS__CERT_FILE": str(tmp_path / "absent.crt"),
           "IOTBRIDGE_HTTP__TLS__KEY_FILE": str(tmp_path / "absent.key")}  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "bridge.cli", "broker"], cwd=ROOT, text=True,
                            env={**_environ(), **env}, capture_output=True, timeout=60,
                            check=False)  # fmt: skip
    assert result.returncode == 2
    assert "cannot run" in result.stderr
    assert "Traceback" not in result.stderr


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IOTBRIDGE_")}


@dataclass
class Secured:
    """`iotbridge broker` serving /metrics with basic auth over HTTPS with client certificates."""

    service: Service
    certs: Path

    @property
    def client(self) -> tuple[Path, Path]:
        return self.certs / "prometheus.crt", self.certs / "prometheus.key"

    def get(self, path: str, **kwargs: Any) -> Answer:
        kwargs.setdefault("ca", self.certs / "ca.crt")
        return get(f"https://localhost:{self.service.port}{path}", **kwargs)


@pytest.fixture(scope="module")
def secured(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    port = free_port()
    env = {
        "IOTBRIDGE_BROKER__PORT": str(free_port()),
        "IOTBRIDGE_BROKER__METRICS_PORT": str(port),
        "IOTBRIDGE_HTTP__USERNAME": USER,
        "IOTBRIDGE_HTTP__PASSWORD": SECRET,
        "IOTBRIDGE_HTTP__TLS__CERT_FILE": str(certs / "server.crt"),
        "IOTBRIDGE_HTTP__TLS__KEY_FILE": str(certs / "server.key"),
        "IOTBRIDGE_HTTP__TLS__CLIENT_CA_FILE": str(certs / "ca.crt"),
        "IOTBRIDGE_LOGGING__LEVEL": "DEBUG",
    }
    argv = [sys.executable, "-m", "bridge.cli", "broker"]
    service = Service("broker", argv, port, tmp_path_factory.mktemp("broker"), env)
    service.start()
    rig = Secured(service, certs)
    try:
        wait_until(lambda: rig.get("/readyz", client=rig.client).status == 200, 20, "broker ready")
        yield rig
    finally:
        service.stop()


def test_the_process_serves_https_to_clients_with_a_certificate_and_the_password(
    secured: Secured,
) -> None:
    client = secured.client
    assert secured.get("/metrics", client=client).status == 401
    assert secured.get("/metrics", client=client, auth=(USER, "wrong")).status == 401
    metrics = secured.get("/metrics", client=client, auth=(USER, SECRET))
    assert metrics.status == 200
    assert "iotbridge_build_info" in metrics.body
    assert secured.get("/healthz", client=client).status == 200
    # No client certificate, or no TLS: no HTTP answer at all, credentials or not.
    assert secured.get("/metrics", auth=(USER, SECRET)).status == 0
    plain = get(f"http://127.0.0.1:{secured.service.port}/healthz")
    assert plain.status == 0, plain


def test_the_password_is_in_no_response_log_or_command_line(secured: Secured) -> None:
    client = secured.client
    answers = [
        secured.get(path, client=client, auth=auth)
        for path in ("/metrics", "/healthz", "/readyz", "/nothing")
        for auth in (None, (USER, "wrong"), (USER, SECRET))
    ]
    assert {a.status for a in answers} == {200, 401, 404}
    for answer in answers:
        assert SECRET not in answer.body
        assert SECRET not in repr(answer.headers)
    log = secured.service.log_path.read_text()
    assert "serving /metrics /healthz /readyz" in log
    assert SECRET not in log
    cmdline = Path(f"/proc/{secured.service.pid}/cmdline").read_bytes().decode(errors="replace")
    assert SECRET not in cmdline


def _prometheus_binary() -> str:
    return require("prometheus", "/usr/bin/prometheus")


def documented_job() -> dict[str, Any]:
    """The commented scrape job of observability/prometheus/prometheus.yml, uncommented."""
    lines = (ROOT / "observability" / "prometheus" / "prometheus.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "scrapes with this example" in line) + 1
    block = []
    for line in lines[start:]:
        if not line.startswith("#  "):
            break
        block.append(line[2:])
    [job] = yaml.safe_load("\n".join(block))
    return dict(job)


def test_prometheus_scrapes_with_the_documented_basic_auth_and_tls_config(
    secured: Secured, tmp_path: Path
) -> None:
    binary = _prometheus_binary()
    certs = secured.certs
    password_file = tmp_path / "http-password"
    password_file.write_text(SECRET)
    target = [{"targets": [f"localhost:{secured.service.port}"]}]
    job = documented_job()
    assert job["scheme"] == "https"
    job["job_name"] = "secured"
    job["basic_auth"]["password_file"] = str(password_file)
    job["tls_config"] = {"ca_file": str(certs / "ca.crt"), "cert_file": str(secured.client[0]),
                         "key_file": str(secured.client[1])}  # fmt: skip
    job["static_configs"] = target
    # The same target without the password: it must stay down.
    anonymous = {"job_name": "anonymous", "scheme": "https", "static_configs": target,
                 "tls_config": job["tls_config"]}  # fmt: skip
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
              "scrape_configs": [job, anonymous]}  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    service = Service("prometheus", argv, port, tmp_path).start()
    try:
        prometheus = Prometheus(f"http://127.0.0.1:{port}")

        def up() -> dict[str, str]:
            # ValueError: while it starts, Prometheus may answer with a plain-text 503.
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                result = prometheus.query("up")
                return {r["metric"]["job"]: r["value"][1] for r in result}
            return {}

        wait_until(lambda: len(up()) == 2, 30, "both jobs scraped")
        assert up() == {"secured": "1", "anonymous": "0"}
        build = prometheus.query('iotbridge_build_info{job="secured"}')
        assert [r["metric"]["component"] for r in build] == ["broker"]
    finally:
        service.stop()
