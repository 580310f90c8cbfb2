"""The spool on a real filesystem: order, durability across reopen, torn tails, its bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.sink import Append, Dedup
from bridge.spool import Spool, SpoolFull


def _batch(start: int, count: int) -> list[Append]:
    return [
        Append.of(
            "p:tel:telemetry",
            ["asset", "a1", "seq", str(i), "payload", b"\xff\x00raw"],
            Dedup("p:dedup:telemetry", "a1", i, 1.5 + i),
        )
        for i in range(start, start + count)
    ]


def _drain(spool: Spool) -> list[Append]:
    out: list[Append] = []
    while (batch := spool.peek()) is not None:
        out += batch
        spool.consume()
    return out


def test_batches_come_back_in_order_with_their_bytes_and_dedup(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=2_000)
    for start in range(0, 100, 10):
        spool.append(_batch(start, 10))
    assert spool.entries == 100
    assert len(list(tmp_path.glob("seg-*.spool"))) > 1
    drained = _drain(spool)
    assert [a.dedup.seq for a in drained if a.dedup] == list(range(100))
    assert drained[0].fields() == [b"asset", b"a1", b"seq", b"0", b"payload", b"\xff\x00raw"]
    assert drained[0].dedup == Dedup("p:dedup:telemetry", "a1", 0, 1.5)
    assert spool.empty
    assert spool.bytes == 0
    assert list(tmp_path.glob("seg-*")) == []


def test_a_reopened_spool_resumes_where_draining_stopped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=1_000_000)
    for start in range(0, 50, 10):
        spool.append(_batch(start, 10))
    spool.peek()
    spool.consume()
    reopened = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=1_000_000)
    assert reopened.entries == 40
    assert [a.dedup.seq for a in _drain(reopened) if a.dedup] == list(range(10, 50))


def test_a_torn_tail_is_cut_and_the_rest_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=1_000_000)
    spool.append(_batch(0, 5))
    spool.append(_batch(5, 5))
    [segment] = tmp_path.glob("seg-*.spool")
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # a crash in the middle of the second record's write
    reopened = Spool(tmp_path, max_bytes=10_000_000, segment_bytes=1_000_000)
    assert reopened.entries == 5
    assert [a.dedup.seq for a in _drain(reopened) if a.dedup] == list(range(5))


def test_a_full_spool_refuses_and_stores_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=3_000, segment_bytes=1_000_000)
    appended = 0
    for start in range(0, 1000, 10):
        try:
            spool.append(_batch(start, 10))
        except SpoolFull:
            break
        appended += 10
    else:
        pytest.fail("the spool never filled")
    stored = spool.entries
    assert stored == appended
    assert 0 < stored < 1000
    assert len(_drain(spool)) == stored
