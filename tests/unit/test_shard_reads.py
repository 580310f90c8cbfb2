"""Reading per-shard streams as one: the merged order, cursors and live event ids, and the
query's pages over several streams whose entry ids collide (a fake Redis: pure)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from bridge.record import entry_key
from bridge.shard_reads import by_slot, merge
from config.keys import Keys
from config.settings import Settings
from gateway.admin_anomalies import Anomalies, Wanted
from gateway.admin_redis import MergedRange
from gateway.anomaly_positions import cursor_of, event_id, positions_of, starts_after


def test_merge_orders_by_id_then_stream() -> None:
    a = [("1-0", "a1"), ("3-0", "a3"), ("5-0", "a5")]
    b = [("1-0", "b1"), ("2-0", "b2"), ("5-0", "b5"), ("10-0", "b10")]
    c = [(b"3-0", "c3")]  # ids as bytes too
    merged = list(merge([a, b, c]))
    assert [fields for _, (_, fields) in merged] == [
        "a1",
        "b1",
        "b2",
        "a3",
        "c3",
        "a5",
        "b5",
        "b10",
    ]
    assert [index for index, _ in merged] == [0, 1, 1, 0, 2, 0, 1, 1]
    assert list(merge([a])) == [(0, entry) for entry in a]


def test_one_command_per_slot_only_on_a_cluster() -> None:
    keys = Keys("p", 4, cluster=True)
    streams = keys.anomaly_streams()
    assert by_slot(streams, cluster=False) == [streams]
    groups = by_slot([*streams, keys.worker_dead_letters_of(2)], cluster=True)
    assert sorted(map(len, groups)) == [1, 1, 1, 2]  # shard 2's two keys share its slot


def test_query_cursor_names_the_stream_unless_it_is_the_last() -> None:
    assert cursor_of("7-1", 0, 1) == "7-1"  # one Redis: the entry id, as always
    assert starts_after("7-1", 1) == ["(7-1"]
    assert cursor_of("7-1", 3, 4) == "7-1"
    assert cursor_of("7-1", 1, 4) == "7-1:1"
    # After stream 1's 7-1: streams 0 and 1 past it, streams 2 and 3 from 7-1 itself.
    assert starts_after("7-1:1", 4) == ["(7-1", "(7-1", "7-1", "7-1"]
    assert starts_after("7-1", 4) == ["(7-1"] * 4
    with pytest.raises(ValueError, match="stream 4"):
        starts_after("7-1:4", 4)


def test_live_event_id_is_a_position_per_stream() -> None:
    assert event_id([(7, 1)]) == "7-1"
    assert positions_of("7-1", 1) == [(7, 1)]
    assert event_id([(7, 1), (0, 0), (9, 0)]) == "7-1,0-0,9-0"
    assert positions_of("7-1,0-0,9", 3) == [(7, 1), (0, 0), (9, 0)]
    assert positions_of("7-1", 3) == [(7, 1)] * 3  # a bare id: the same in every stream
    with pytest.raises(ValueError, match="names 2 anomaly streams; there are 3"):
        positions_of("7-1,8-0", 3)


class FakeStreams:
    """XRANGE and XREVRANGE over streams in memory, counting the round trips."""

    def __init__(self, streams: dict[str, list[tuple[str, dict[str, bytes]]]]) -> None:
        self.streams = streams
        self.calls = 0

    async def xrange(self, key: str, start: str, end: str, count: int) -> list[Any]:
        self.calls += 1
        await asyncio.sleep(0)
        low = (-1, -1) if start == "-" else entry_key(start.lstrip("("))
        high = (2**63, 2**63) if end == "+" else entry_key(end)
        if end != "+" and "-" not in end:
            high = (high[0], 2**63)  # an end of ms only takes every entry of that ms
        found = [
            (i.encode(), f)
            for i, f in self.streams.get(key, [])
            if (entry_key(i) > low if start.startswith("(") else entry_key(i) >= low)
            and entry_key(i) <= high
        ]
        return found[:count]


def stream(ids: Sequence[str], name: str) -> list[tuple[str, dict[str, bytes]]]:
    return [(i, {"asset": name.encode(), "detector": b"rate"}) for i in ids]


def colliding() -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    keys = Keys("p", 3, cluster=True).anomaly_streams()
    return {
        keys[0]: stream(["1-0", "2-0", "2-1", "4-0", "6-0"], "a"),
        keys[1]: stream(["1-0", "2-1", "3-0", "6-0"], "b"),
        keys[2]: stream(["2-1", "6-0", "7-0"], "c"),
    }


async def test_merged_range_reads_each_stream_in_pages() -> None:
    data = colliding()
    fake = FakeStreams(data)
    merged = MergedRange(fake, list(data), ["-"] * 3, "+", 2)  # type: ignore[arg-type]
    got = []
    while (found := await merged.next()) is not None:
        got.append((found[1][0], found[0]))
    assert got == sorted(got, key=lambda e: (entry_key(e[0]), e[1]))
    assert len(got) == 12
    assert fake.calls == 3 + 3 + 2  # pages of 2 until one is short (5, 4 and 3 entries)


def anomalies_of(fake: FakeStreams, shards: int) -> Anomalies:
    settings = Settings(redis={"cluster": True, "stream_shards": shards, "key_prefix": "p"})
    ctx = SimpleNamespace(redis=fake, keys=Keys.of(settings.redis), settings=settings)
    return Anomalies(ctx)  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [1, 2, 5, 100])
async def test_pages_over_colliding_ids_give_every_entry_once_in_order(count: int) -> None:
    data = colliding()
    anomalies = anomalies_of(FakeStreams(data), 3)
    got: list[tuple[str, str]] = []
    cursor = None
    for _ in range(20):
        page = await anomalies.page(Wanted(), None, None, cursor, count)
        got += [(a.id, a.asset) for a in page.items]
        assert len(page.items) <= count
        cursor = page.next_cursor
        if cursor is None:
            break
    expected = sorted(
        ((i, f["asset"].decode()) for entries in data.values() for i, f in entries),
        key=lambda e: (entry_key(e[0]), e[1]),
    )
    assert got == expected


async def test_a_filtered_page_and_a_window() -> None:
    anomalies = anomalies_of(FakeStreams(colliding()), 3)
    only_b = await anomalies.page(Wanted(asset="b"), None, None, None, 100)
    assert [a.id for a in only_b.items] == ["1-0", "2-1", "3-0", "6-0"]
    first = await anomalies.page(Wanted(asset="b"), None, None, None, 2)
    assert first.next_cursor == "2-1:1"
    rest = await anomalies.page(Wanted(asset="b"), None, None, first.next_cursor, 100)
    assert [a.id for a in rest.items] == ["3-0", "6-0"]
    # A window by entry time (ms): from 2 ms to 3 ms, every stream.
    since, until = datetime.fromtimestamp(0.002, UTC), datetime.fromtimestamp(0.003, UTC)
    window = await anomalies.page(Wanted(), since, until, None, 100)
    assert [(a.id, a.asset) for a in window.items] == [
        ("2-0", "a"), ("2-1", "a"), ("2-1", "b"), ("2-1", "c"), ("3-0", "b")
    ]  # fmt: skip
