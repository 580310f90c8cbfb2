"""The naive HTTP ingestor the gateway is measured against: FastAPI on uvicorn, one awaited XADD
per request (the usual blueprint). It parses and type-checks the body with a pydantic model and
writes one entry; no tokens, no dedup, no dead letters, so it does less work per request than the
gateway, never more.

    python bench/naive_gateway.py --port 8100 --redis redis://127.0.0.1:6379/0 --stream naive:tel
"""

from __future__ import annotations

import argparse

import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class Reading(BaseModel):
    ts: float
    seq: int
    values: dict[str, float]


def build(redis_url: str, stream: str) -> FastAPI:
    app = FastAPI()
    client = aioredis.Redis.from_url(redis_url, max_connections=128)

    @app.post("/api/v1/topics/{topic:path}")
    async def ingest(topic: str, reading: Reading) -> dict[str, str]:
        asset = topic.split("/")[3] if topic.count("/") >= 3 else topic
        fields: dict[str, str | float | int] = {"asset": asset, "topic": topic,
                                                "seq": reading.seq, "ts": reading.ts}  # fmt: skip
        fields.update({f"v.{k}": v for k, v in reading.values.items()})
        entry = await client.xadd(stream, fields)  # type: ignore[arg-type]
        return {"status": "stored", "id": entry.decode() if isinstance(entry, bytes) else entry}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--stream", required=True)
    args = parser.parse_args()
    uvicorn.run(build(args.redis, args.stream), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()
