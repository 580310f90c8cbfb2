"""The loss audit on in-memory streams: compact sets, exact counts, negative controls, paging."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulators.audit import (
    Entry,
    SeqSet,
    asset_level_of,
    audit,
    audit_redis,
    dead_letter_identity,
    read_stream,
)

TOPIC = "plant/s1/l1/{asset}/telemetry"
ASSET_LEVEL = 3


def _entry(n: int, asset: str, seq: int) -> Entry:
    fields: dict[bytes | str, bytes | str] = {
        b"asset": asset.encode(),
        b"seq": str(seq).encode(),
        b"ts": b"1700000000.0",
        b"v.temperature": b"50.0",
    }
    return f"1700000000000-{n}".encode(), fields


def _stream(pairs: list[tuple[str, int]]) -> list[Entry]:
    return [_entry(n, asset, seq) for n, (asset, seq) in enumerate(pairs)]


def _letter(asset: str, seq: int, reason: str, payload: bytes | None = None) -> Entry:
    body = payload if payload is not None else json.dumps({"ts": 1, "seq": seq}).encode()
    fields: dict[bytes | str, bytes | str] = {
        "topic": TOPIC.format(asset=asset),
        "reason": reason,
        "payload": body,
    }
    return "1700000000000-0", fields


PAIRS = [(f"a{a}", s) for s in range(200) for a in range(5)]  # 1,000 messages, interleaved


# --- SeqSet ---------------------------------------------------------------------------------------


def test_consecutive_sequence_numbers_are_kept_as_one_range() -> None:
    seqs = SeqSet.of(PAIRS)
    assert len(seqs) == 1000
    assert seqs.range_count() == 5
    assert seqs.ranges("a3") == [(0, 199)]
    assert ("a3", 199) in seqs
    assert ("a3", 200) not in seqs
    assert ("a9", 0) not in seqs
    assert seqs == SeqSet.of(reversed(PAIRS))  # the same set, whatever the order of arrival
    assert seqs != SeqSet.of(PAIRS[1:])


def test_out_of_order_additions_merge_and_gaps_stay_apart() -> None:
    seqs = SeqSet()
    for seq in (5, 3, 9, 4, 1, 2, 12, 11):
        assert seqs.add("a", seq)
    assert not seqs.add("a", 4)  # already there
    assert seqs.ranges("a") == [(1, 5), (9, 9), (11, 12)]
    assert seqs.add_range("a", 6, 11) == 4  # 6, 7, 8 and 10 are new; 9 and 11 were there
    assert seqs.ranges("a") == [(1, 12)]
    assert len(seqs) == 12


def test_difference_is_range_arithmetic() -> None:
    left = SeqSet()
    left.add_range("a", 0, 99)
    left.add_range("b", 10, 19)
    right = SeqSet()
    right.add_range("a", 10, 19)
    right.add_range("a", 50, 200)
    right.add("b", 10)
    missing = left.difference(right)
    assert missing.ranges("a") == [(0, 9), (20, 49)]
    assert missing.ranges("b") == [(11, 19)]
    assert len(missing) == 10 + 30 + 9


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(0, 60), st.integers(0, 5)),
        max_size=40,
    ),
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 70)), max_size=40),
)
def test_seq_set_behaves_like_a_set_of_pairs(
    ranges: list[tuple[str, int, int]], others: list[tuple[str, int]]
) -> None:
    seqs, model = SeqSet(), set[tuple[str, int]]()
    for asset, first, width in ranges:
        new = {(asset, s) for s in range(first, first + width + 1)} - model
        assert seqs.add_range(asset, first, first + width) == len(new)
        model |= new
    assert len(seqs) == len(model)
    assert set(seqs) == model
    for asset in seqs.assets():  # sorted, disjoint and never adjacent: the compact form
        spans = seqs.ranges(asset)
        assert all(a_last + 1 < b_first for (_, a_last), (b_first, _) in itertools.pairwise(spans))
    other = SeqSet.of(others)
    assert set(seqs.difference(other)) == model - set(others)
    assert all((pair in seqs) == (pair in model) for pair in others)


# --- audit: exact counts and the negative controls -----------------------------------------------


def test_a_complete_stream_audits_clean() -> None:
    report = audit(SeqSet.of(PAIRS), _stream(PAIRS))
    assert report.ok
    assert report.as_dict() == {
        "acked": 1000, "found": 1000, "lost": 0, "duplicated": 0, "unexpected": 0, "unconfirmed": 0,
        "entries": 1000, "dead_letters": 0, "dead_lettered": 0,
        "examples": {"lost": [], "duplicated": [], "unexpected": []},
    }  # fmt: skip


@pytest.mark.parametrize("deleted", [1, 7, 100])
def test_deleting_n_entries_reports_exactly_n_lost(deleted: int) -> None:
    stream = _stream(PAIRS)
    rng = random.Random(deleted)
    gone = set(rng.sample(range(len(stream)), deleted))
    report = audit(SeqSet.of(PAIRS), [e for i, e in enumerate(stream) if i not in gone])
    assert (report.lost, report.found, report.duplicated, report.unexpected) == (
        deleted,
        1000 - deleted,
        0,
        0,
    )
    gone_pairs = SeqSet.of(PAIRS[i] for i in gone)
    named = [f"{a}/{f}" if f == last else f"{a}/{f}..{last}"
             for a in gone_pairs.assets() for f, last in gone_pairs.ranges(a)]  # fmt: skip
    assert report.examples["lost"] == named[:5]
    assert not report.ok


def test_acked_members_never_published_are_lost() -> None:
    acked = SeqSet.of(PAIRS)
    acked.add_range("a0", 200, 209)  # ten the publisher claims, none in the stream
    acked.add("ghost", 0)
    report = audit(acked, _stream(PAIRS))
    assert (report.acked, report.lost, report.found) == (1011, 11, 1000)
    assert report.examples["lost"] == ["a0/200..209", "ghost/0"]


def test_a_duplicated_entry_reports_one_duplicate() -> None:
    stream = _stream(PAIRS)
    stream.insert(500, stream[123])
    report = audit(SeqSet.of(PAIRS), stream)
    assert (report.lost, report.duplicated, report.unexpected) == (0, 1, 0)
    asset, seq = PAIRS[123]
    assert report.examples["duplicated"] == [f"{asset}/{seq} again at 1700000000000-123"]


def test_entries_nobody_acked_and_unreadable_entries_are_unexpected() -> None:
    acked = SeqSet.of(PAIRS[:-1])  # the publisher never saw the last PUBACK
    stream = _stream(PAIRS)
    stream.append(("1700000000001-0", {"asset": "a1", "seq": "not a number"}))
    report = audit(acked, stream)
    assert (report.lost, report.duplicated, report.unexpected) == (0, 0, 2)
    assert report.examples["unexpected"][1] == "1700000000001-0: no asset/seq"


def test_str_fields_from_a_decoding_client_are_read_too() -> None:
    stream: list[Entry] = [("1-0", {"asset": "a", "seq": "0"}), ("1-1", {"asset": "a", "seq": "1"})]
    assert audit(SeqSet.of([("a", 0), ("a", 1)]), stream).ok


# --- dead letters count only when the caller expects them ---------------------------------------


def test_dead_letters_account_for_messages_only_with_an_accepted_reason() -> None:
    kept = [p for p in PAIRS if p[0] != "a4" or p[1] < 150]
    flood = [_letter("a4", s, "rate") for s in range(150, 200)]
    acked = SeqSet.of(PAIRS)
    refused = audit(acked, _stream(kept), flood, asset_level=ASSET_LEVEL)
    assert (refused.lost, refused.dead_letters, refused.dead_lettered) == (50, 50, 0)
    accepted = audit(acked, _stream(kept), flood, accept_reasons={"rate"}, asset_level=ASSET_LEVEL)
    assert (accepted.lost, accepted.found, accepted.dead_lettered) == (0, 1000, 50)
    other_reason = audit(
        acked, _stream(kept), flood, accept_reasons={"schema"}, asset_level=ASSET_LEVEL
    )
    assert other_reason.lost == 50


def test_a_dead_letter_whose_payload_cannot_be_read_accounts_for_nothing() -> None:
    kept = [p for p in PAIRS if p != ("a0", 0)]
    cut = [_letter("a0", 0, "rate", payload=b'{"ts": 1, "se')]
    report = audit(
        SeqSet.of(PAIRS), _stream(kept), cut, accept_reasons={"rate"}, asset_level=ASSET_LEVEL
    )
    assert report.lost == 1


def test_accepting_dead_letters_needs_the_asset_level() -> None:
    with pytest.raises(ValueError, match="asset_level"):
        audit(SeqSet(), [], [], accept_reasons={"rate"})


@pytest.mark.parametrize(
    ("fields", "identity"),
    [
        ({"topic": "plant/s/l/a7/telemetry", "payload": '{"seq": 3}'}, ("a7", 3)),
        ({b"topic": b"plant/s/l/a7/telemetry", b"payload": b'{"seq": 3, "x": 1}'}, ("a7", 3)),
        ({"topic": "plant/s/l/a7/telemetry", "payload": '{"seq": true}'}, None),
        ({"topic": "plant/s/l/a7/telemetry", "payload": '{"seq": -1}'}, None),
        ({"topic": "plant/s/l/a7/telemetry", "payload": "[3]"}, None),
        ({"topic": "plant/s/l/a7/telemetry", "payload": b"\xff\xfe"}, None),
        ({"topic": "plant/s", "payload": '{"seq": 3}'}, None),
        ({"payload": '{"seq": 3}'}, None),
    ],
)
def test_dead_letter_identity(
    fields: Mapping[bytes | str, bytes | str], identity: tuple[str, int] | None
) -> None:
    assert dead_letter_identity(fields, ASSET_LEVEL) == identity


def test_asset_level_of_a_route_template() -> None:
    assert asset_level_of("plant/{site}/{line}/{asset}/telemetry") == 3
    assert asset_level_of("x/{unit}/data", "unit") == 1


# --- paging -------------------------------------------------------------------------------------


class FakeStreams:
    """XRANGE over in-memory streams, with Redis's exclusive `(` start, counting calls."""

    def __init__(self, entries: list[Entry], **others: list[Entry]) -> None:
        self.entries = entries
        self.streams = {"k": entries, **others}
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def _key(entry_id: bytes | str) -> tuple[int, int]:
        text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        ms, seq = text.split("-")
        return int(ms), int(seq)

    def xrange(self, name: str, min: str, _max: str, count: int) -> list[Any]:
        self.calls.append((min, count))
        if min == "-":
            rows = self.streams.get(name, [])
        else:
            start = self._key(min.lstrip("("))
            exclusive = min.startswith("(")
            rows = [
                e
                for e in self.streams.get(name, [])
                if self._key(e[0]) > start or (not exclusive and self._key(e[0]) == start)
            ]
        return rows[:count]


@pytest.mark.parametrize(("total", "page"), [(10, 3), (9, 3), (0, 3), (1000, 10_000)])
def test_read_stream_pages_with_an_exclusive_start_and_reads_each_entry_once(
    total: int, page: int
) -> None:
    streams = FakeStreams(_stream(PAIRS[:total]))
    got = list(read_stream(streams, "k", page_size=page))  # type: ignore[arg-type]
    assert got == streams.entries
    assert len(streams.calls) == total // page + 1
    assert all(m.startswith("(") for m, _ in streams.calls[1:])


def test_audit_redis_reads_every_shard_stream_and_the_dead_letters() -> None:
    shard0 = _stream([p for p in PAIRS if p[0] in ("a0", "a1")])
    shard1 = _stream([p for p in PAIRS if p[0] not in ("a0", "a1")])
    shard1.append(("1700000000001-0", shard0[0][1]))  # in two shards: still a duplicate
    streams = FakeStreams([], s0=shard0, s1=shard1, dlq=[_letter("a9", 0, "rate")])
    acked = SeqSet.of([*PAIRS, ("a9", 0)])
    report = audit_redis(
        streams,  # type: ignore[arg-type]
        ["s0", "s1"],
        acked,
        dead_letters="dlq",
        accept_reasons={"rate"},
        asset_level=ASSET_LEVEL,
        page_size=300,
    )
    assert (report.acked, report.found, report.lost, report.duplicated) == (1001, 1001, 0, 1)
    assert (report.entries, report.dead_letters, report.dead_lettered) == (1001, 1, 1)
    assert audit_redis(streams, "s0", acked).lost == 601  # type: ignore[arg-type]
