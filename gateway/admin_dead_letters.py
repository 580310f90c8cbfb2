"""Dead letters: list, read, replay and delete the entries of `iotbridge:dlq`.

A replay sends the stored topic and payload through `ctx.ingest`, the path every HTTP message
takes: the current route table and contracts, the same dedup and the same batched write. Then
the dead letter is removed (XDEL), whatever the outcome:

- stored: it is in its telemetry stream now;
- duplicate: it was already there (the dedup recognised its (asset, seq)), so a replay repeated
  after a crash between the write and the XDEL stores nothing twice;
- rejected: still invalid; `ingest` has written a new dead letter with the new reason at the end
  of the stream, so one dead letter per message remains, with its current reason.

A dead letter whose payload was cut at `bridge.dlq_payload_bytes` (or whose topic is not UTF-8)
cannot be replayed and is left as it is (`not_replayable`). The XDEL comes only after `ingest`
returned: when Redis goes away in between, the dead letter stays, and the next replay answers
`duplicate`. Replays in one process run one at a time (a lock), so two requests never replay
the same dead letter together; across gateway processes they may, and a still-invalid one is
then dead-lettered twice (never stored twice).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status

from gateway.admin_auth import AUTH_RESPONSES
from gateway.admin_http import AdminRoute
from gateway.admin_models import (
    DeadLetter,
    DeadLetterPage,
    ReplayFilter,
    ReplayResult,
    ReplaySummary,
)
from gateway.admin_redis import Entry, newest_id, read_range, text
from gateway.context import GatewayContext, IngestOutcome, Unavailable

log = logging.getLogger(__name__)

# Entries read per XRANGE; a listing reads at most SCAN_BUDGET entries before it answers with a
# cursor, so a filter that matches nothing never makes one request read the whole stream.
CHUNK = 500
SCAN_BUDGET = 20_000
ENTRY_ID = r"^\d+(-\d+)?$"

EntryId = Annotated[str, Path(pattern=ENTRY_ID, description="A dead letter's entry id.")]
NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"description": "No such dead letter."}}
UNAVAILABLE: dict[int | str, dict[str, object]] = {
    503: {"description": "Redis is away; `Retry-After` says when to try again."}
}


def _float(value: bytes | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def to_letter(entry_id: str, fields: dict[str, bytes]) -> DeadLetter:
    payload = fields.get("payload", b"")
    size = fields.get("size")
    try:
        shown, encoding = payload.decode(), "utf-8"
    except UnicodeDecodeError:
        shown, encoding = base64.b64encode(payload).decode(), "base64"
    return DeadLetter(
        id=entry_id,
        topic=fields.get("topic", b"").decode(errors="replace"),
        route=text(fields.get("route", b"")),
        reason=text(fields.get("reason", b"")),
        error=fields.get("error", b"").decode(errors="replace"),
        received_at=_float(fields.get("rx")),
        size=int(size) if size is not None and size.isdigit() else None,
        payload=shown,
        payload_encoding="utf-8" if encoding == "utf-8" else "base64",
        truncated=size is not None and size.isdigit() and int(size) > len(payload),
    )


def _matches(fields: dict[str, bytes], reason: str | None, route: str | None) -> bool:
    return (reason is None or fields.get("reason") == reason.encode()) and (
        route is None or fields.get("route") == route.encode()
    )


def _unavailable(exc: Unavailable, done: str = "") -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        f"redis unavailable: {exc.detail}{done}",
        headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
    )


class DeadLetters:
    def __init__(self, ctx: GatewayContext) -> None:
        self._ctx = ctx
        self._redis = ctx.redis
        self._key = ctx.keys.dead_letters
        self._lock = asyncio.Lock()

    async def page(
        self, cursor: str | None, count: int, reason: str | None, route: str | None
    ) -> DeadLetterPage:
        start = f"({cursor}" if cursor else "-"
        items: list[DeadLetter] = []
        scanned = 0
        while scanned < SCAN_BUDGET:
            chunk = await read_range(self._redis, self._key, start, "+", CHUNK)
            for entry_id, fields in chunk:
                scanned += 1
                start = f"({entry_id}"
                if _matches(fields, reason, route):
                    items.append(to_letter(entry_id, fields))
                    if len(items) == count:
                        return DeadLetterPage(items=items, next_cursor=entry_id)
            if len(chunk) < CHUNK:
                return DeadLetterPage(items=items, next_cursor=None)
        return DeadLetterPage(items=items, next_cursor=start[1:])

    async def get(self, entry_id: str) -> Entry | None:
        found = await read_range(self._redis, self._key, entry_id, entry_id, 1)
        return found[0] if found else None

    async def delete(self, entry_id: str) -> bool:
        return int(await self._redis.xdel(self._key, entry_id)) == 1

    async def replay_one(self, entry_id: str) -> ReplayResult | None:
        async with self._lock:
            entry = await self.get(entry_id)
            if entry is None:
                return None
            result = await self._replay(*entry)
            await self._remove([result])
            return result

    async def replay_matching(self, wanted: ReplayFilter) -> ReplaySummary:
        async with self._lock:
            return await self._replay_matching(wanted)

    async def _replay_matching(self, wanted: ReplayFilter) -> ReplaySummary:
        # Only what is there now: a still-invalid letter is dead-lettered again after `last`.
        last = await newest_id(self._redis, self._key)
        if last is None:
            return ReplaySummary(matched=0, stored=0, duplicate=0, rejected=0, not_replayable=0,
                                 complete=True)  # fmt: skip
        counts: Counter[str] = Counter()
        start, complete = "-", True
        while True:
            chunk = await read_range(self._redis, self._key, start, last, CHUNK)
            matched = [e for e in chunk if _matches(e[1], wanted.reason, wanted.route)]
            room = wanted.limit - sum(counts.values())
            if len(matched) > room:
                matched, complete = matched[:room], False
            results = await asyncio.gather(
                *(self._replay(*entry) for entry in matched), return_exceptions=True
            )
            done = [r for r in results if isinstance(r, ReplayResult)]
            await self._remove(done)
            counts.update(r.status for r in done)
            failed = next((r for r in results if isinstance(r, BaseException)), None)
            if isinstance(failed, Unavailable):
                raise _unavailable(failed, f" ({len(done)} replayed before it; run it again)")
            if failed is not None:
                raise failed
            if not complete or len(chunk) < CHUNK:
                break
            start = f"({chunk[-1][0]}"
        summary = ReplaySummary(
            matched=sum(counts.values()), stored=counts["stored"], duplicate=counts["duplicate"],
            rejected=counts["rejected"], not_replayable=counts["not_replayable"],
            complete=complete,
        )  # fmt: skip
        log.info("dead letters replayed", extra=summary.model_dump())
        return summary

    async def _replay(self, entry_id: str, fields: dict[str, bytes]) -> ReplayResult:
        letter = to_letter(entry_id, fields)
        raw_topic = fields.get("topic", b"")
        if letter.truncated:
            return ReplayResult(dead_letter=entry_id, status="not_replayable", id=None,
                                reason="truncated", error="the stored payload was cut")  # fmt: skip
        try:
            topic = raw_topic.decode()
        except UnicodeDecodeError:
            return ReplayResult(dead_letter=entry_id, status="not_replayable", id=None,
                                reason="topic", error="the topic is not UTF-8")  # fmt: skip
        outcome: IngestOutcome = await self._ctx.ingest(topic, fields.get("payload", b""))
        return ReplayResult(dead_letter=entry_id, status=outcome.status, id=outcome.id,
                            reason=outcome.reason, error=outcome.error)  # fmt: skip

    async def _remove(self, results: list[ReplayResult]) -> None:
        gone = [r.dead_letter for r in results if r.status != "not_replayable"]
        if gone:
            await self._redis.xdel(self._key, *gone)


def dead_letter_router(ctx: GatewayContext) -> APIRouter:
    letters = DeadLetters(ctx)
    router = APIRouter(prefix="/api/v1/dead-letters", tags=["dead letters"], route_class=AdminRoute)

    @router.get("", response_model=DeadLetterPage, summary="List dead letters")
    async def list_dead_letters(
        cursor: Annotated[str | None, Query(pattern=ENTRY_ID, description="next_cursor of the "
                                            "previous page: the listing goes on after it.")] = None,
        count: Annotated[int, Query(gt=0, le=1000, description="Items per page.")] = 100,
        reason: Annotated[str | None, Query(description="Only this reason.")] = None,
        route: Annotated[str | None, Query(description="Only this route (or `unrouted`).")] = None,
    ) -> DeadLetterPage:  # fmt: skip
        """Dead letters oldest first, optionally only one reason and route. A page ends at
        `count` items or after 20,000 entries read; `next_cursor` continues it."""
        return await letters.page(cursor, count, reason, route)

    @router.post("/replay", response_model=ReplaySummary, summary="Replay matching dead letters",
                 responses={**UNAVAILABLE, **AUTH_RESPONSES})  # fmt: skip
    async def replay_dead_letters(wanted: ReplayFilter) -> ReplaySummary:
        """Replays every dead letter that matches the filter and was written before this
        request, through the current contracts and the dedup: stored ones and duplicates are
        removed, still-invalid ones are dead-lettered again with their new reason (and the old
        entry removed). Replaying twice stores once."""
        return await letters.replay_matching(wanted)

    @router.get("/{entry_id}", response_model=DeadLetter, summary="One dead letter",
                responses=NOT_FOUND)  # fmt: skip
    async def get_dead_letter(entry_id: EntryId) -> DeadLetter:
        entry = await letters.get(entry_id)
        if entry is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {entry_id}")
        return to_letter(*entry)

    @router.post("/{entry_id}/replay", response_model=ReplayResult,
                 summary="Replay one dead letter", responses={**NOT_FOUND, **UNAVAILABLE})  # fmt: skip
    async def replay_dead_letter(entry_id: EntryId) -> ReplayResult:
        """Validates the stored payload against the current contract and writes it through the
        dedup; see `POST /api/v1/dead-letters/replay` for what happens to the dead letter."""
        try:
            result = await letters.replay_one(entry_id)
        except Unavailable as exc:
            raise _unavailable(exc) from exc
        if result is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {entry_id}")
        return result

    @router.delete("/{entry_id}", status_code=status.HTTP_204_NO_CONTENT,
                   summary="Delete one dead letter", responses=NOT_FOUND)  # fmt: skip
    async def delete_dead_letter(entry_id: EntryId) -> Response:
        if not await letters.delete(entry_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no dead letter {entry_id}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
