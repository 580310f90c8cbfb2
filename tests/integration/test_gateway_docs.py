"""/docs and /redoc in headless Chromium, with every non-loopback host blocked: the API's pages
work offline, and a "Try it out" POST through Swagger UI stores a reading.

Debian's chromium (/usr/bin/chromium, `make services` installs it) driven by Playwright; the
screenshot is written to the test's temporary folder, and copied to $IOTBRIDGE_SCREENSHOT_DIR when
it is set (`IOTBRIDGE_SCREENSHOT_DIR=docs` refreshes the one README shows).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from config.keys import Keys
from gateway.tokens import encode, new_token
from tests.integration.test_gateway_admin import gateway_settings, running_gateway
from tests.services import missing

pytestmark = pytest.mark.integration

INGEST = "#operations-ingest-post_topic_api_v1_topics__topic__post"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        missing("chromium")
    return path


async def test_docs_render_offline_and_try_it_out_stores(
    make_settings, unique, redis_url, tmp_path: Path
) -> None:
    screenshot = tmp_path / "gateway-docs.png"
    async_api = pytest.importorskip("playwright.async_api")
    executable = chromium()
    settings = gateway_settings(make_settings, unique)
    keys = Keys(unique)
    device_token, record = new_token("a*")
    redis = aioredis.Redis.from_url(redis_url)
    await redis.hset(keys.gateway_tokens, record.id, encode(record))
    topic = f"{unique}/plant/s1/l1/a1/telemetry"
    blocked: list[str] = []

    async def only_loopback(route, request) -> None:
        if urlsplit(request.url).hostname in ("127.0.0.1", "localhost"):
            await route.continue_()
        else:
            blocked.append(request.resource_type)
            await route.abort()

    async with running_gateway(settings) as app, async_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1600})
            await page.route("**/*", only_loopback)
            base = f"http://127.0.0.1:{app.port}"
            await page.goto(f"{base}/docs")
            await page.wait_for_selector(INGEST, timeout=30_000)
            paths = await page.locator(".opblock-summary-path").all_inner_texts()
            rendered = {p.replace("\u200b", "") for p in paths}
            assert {"/api/v1/topics/{topic}", "/api/v1/dead-letters", "/api/v1/streams",
                    "/api/v1/anomalies/stream", "/api/v1/routes"} <= rendered  # fmt: skip
            # The device token, through the Authorize dialog.
            await page.click("button.authorize")
            device = page.locator(".auth-container", has_text="HTTPBearer")
            await device.locator("input").fill(device_token)
            await device.locator("button.authorize").click()
            await page.click("button.btn-done")
            await page.click(f"{INGEST} .opblock-summary")
            await page.click(f"{INGEST} .try-out__btn")
            await page.fill(f"{INGEST} input[placeholder='topic']", topic)
            body = json.dumps({"ts": time.time(), "seq": 7, "values": {"temperature": 42.5}})
            await page.fill(f"{INGEST} textarea.body-param__text", body)
            await page.click(f"{INGEST} .execute")
            status = page.locator(
                f"{INGEST} .live-responses-table tr.response .response-col_status"
            )
            await status.first.wait_for(timeout=30_000)
            assert (await status.first.inner_text()).strip() == "200"
            await page.screenshot(path=str(screenshot), full_page=False)

            await page.goto(f"{base}/redoc")
            # ReDoc's menu lists every operation (collapsed, so attached rather than visible).
            await page.get_by_text("List dead letters").first.wait_for(
                state="attached", timeout=30_000
            )
            await page.locator("h1", has_text="iotbridge gateway").first.wait_for(timeout=30_000)
        finally:
            await browser.close()

    entries: Any = await redis.xrange(keys.telemetry("telemetry"), "-", "+")
    await redis.aclose()
    assert len(entries) == 1
    assert entries[0][1][b"seq"] == b"7"
    assert entries[0][1][b"v.temperature"] == b"42.5"
    # Nothing the pages need came from elsewhere: ReDoc asks for its "powered by" logo image from
    # its CDN (cosmetic, blocked above); no script, stylesheet or font was requested.
    assert set(blocked) <= {"image"}
    assert screenshot.stat().st_size > 10_000
    if target := os.environ.get("IOTBRIDGE_SCREENSHOT_DIR"):
        shutil.copy(screenshot, Path(target) / screenshot.name)
