"""The ingest endpoint as /openapi.json describes it, and /docs and /redoc served with no internet
(built in-process; nothing here talks to Redis)."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from config.settings import Settings
from gateway.server import GatewayApp

INGEST = "/api/v1/topics/{topic}"


@pytest.fixture(scope="module")
def gateway() -> GatewayApp:
    return GatewayApp(Settings(), CollectorRegistry())


@pytest.fixture(scope="module")
def spec(gateway: GatewayApp) -> dict[str, Any]:
    return gateway.app.openapi()


def test_ingest_has_its_bearer_scheme_every_status_and_typed_examples(spec: dict[str, Any]) -> None:
    post = spec["paths"][INGEST]["post"]
    schemes = spec["components"]["securitySchemes"]
    bearer = [name for name, s in schemes.items() if s == {**s, "type": "http", "scheme": "bearer"}]
    assert bearer
    assert any(bearer[0] in requirement for requirement in post["security"])
    assert set(post["responses"]) == {"200", "401", "403", "413", "415", "422", "429", "503"}
    body = post["requestBody"]["content"]
    assert body["application/json"]["example"]["seq"] == 42
    assert set(body["application/json"]["schema"]["required"]) == {"ts", "seq", "values"}
    assert body["application/x-ndjson"]["example"].count("\n") == 3
    models = spec["components"]["schemas"]
    for name in ("Stored", "BulkResult", "Rejected", "Problem"):
        assert models[name]["examples"], name
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in ok["anyOf"]} == {"Stored", "BulkResult"}


async def test_docs_and_redoc_load_every_asset_from_the_gateway_itself(gateway: GatewayApp) -> None:
    transport = httpx.ASGITransport(app=gateway.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for page in ("/docs", "/redoc"):
            await _check_page(client, page)


async def _check_page(client: httpx.AsyncClient, page: str) -> None:
    html = await client.get(page)
    assert html.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
    urls += re.findall(r"""url: ?['"]([^'"]+)['"]""", html.text)
    assert urls, page
    for url in urls:
        assert not re.match(r"^(https?:)?//", url), f"{page} loads {url} from elsewhere"
        assert (await client.get(url)).status_code == 200, url
