"""The loss audit: what a publisher had acknowledged against what reached the streams.

At-least-once is checked against the publisher's side of the contract: every `(asset, seq)` the
broker acknowledged (PUBACK) must be in the telemetry stream, once. The audit reports

- `acked`: distinct `(asset, seq)` the publisher had acknowledged;
- `found`: how many of those the streams account for (`found + lost == acked`);
- `lost`: acknowledged but nowhere;
- `duplicated`: telemetry entries beyond the first for the same `(asset, seq)`;
- `unexpected`: telemetry entries the publisher never had acknowledged (or without a readable
  `asset` and `seq`);
- `unconfirmed`: telemetry entries of messages the publisher sent and gave up on without a PUBACK
  (its connection dropped, or its wait for acks ended): the broker had accepted them after all.
  The entry carries the field `UNCONFIRMED` (`simulators.acked.Acked.telemetry` marks them from
  the `--acked` file); they are neither acknowledged nor unexpected;

with a few examples of each. A dead letter accounts for an acknowledged message only when the
caller says its reason is expected (`accept_reasons`, for example `{"rate"}` when a publisher
floods on purpose); otherwise a message that went to the dead-letter stream is lost telemetry.

Sets of sequence numbers are kept per asset as sorted, merged ranges (`SeqSet`), so a run of a
million messages per asset costs a few integers, not a million tuples. Everything here is pure
except `read_stream` and `audit_redis`, which page through Redis with XRANGE.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import redis

Pair = tuple[str, int]
# A stream entry as redis-py returns it: (id, {field: value}), as bytes or as str.
Entry = tuple[bytes | str, Mapping[bytes | str, bytes | str]]

# XRANGE page size: large enough that a million entries is a hundred round trips, small enough
# that one reply stays a few megabytes.
PAGE_SIZE = 10_000
EXAMPLES = 5
# Field the acked file's reader adds to an entry the publisher gave up on without a PUBACK.
UNCONFIRMED = "unconfirmed"


class SeqSet:
    """Sets of sequence numbers per asset, stored as sorted, disjoint, non-adjacent ranges."""

    def __init__(self) -> None:
        self._starts: dict[str, list[int]] = {}
        self._ends: dict[str, list[int]] = {}
        self._count = 0

    @classmethod
    def of(cls, pairs: Iterable[Pair]) -> SeqSet:
        seqs = cls()
        for asset, seq in pairs:
            seqs.add(asset, seq)
        return seqs

    def add(self, asset: str, seq: int) -> bool:
        """Add one `(asset, seq)`; True when it was not there yet."""
        return self.add_range(asset, seq, seq) == 1

    def add_range(self, asset: str, first: int, last: int) -> int:
        """Add `first..last` (inclusive) for an asset; returns how many were new."""
        if last < first:
            return 0
        starts = self._starts.setdefault(asset, [])
        ends = self._ends.setdefault(asset, [])
        # Ranges lo..hi-1 overlap [first, last] or touch it, so they merge into one.
        lo = bisect_left(ends, first - 1)
        hi = bisect_right(starts, last + 1)
        covered = sum(max(0, min(ends[k], last) - max(starts[k], first) + 1) for k in range(lo, hi))
        added = last - first + 1 - covered
        if lo < hi:
            first, last = min(first, starts[lo]), max(last, ends[hi - 1])
        starts[lo:hi] = [first]
        ends[lo:hi] = [last]
        self._count += added
        return added

    def __contains__(self, pair: object) -> bool:
        if not isinstance(pair, tuple) or len(pair) != 2:
            return False
        asset, seq = pair
        starts = self._starts.get(asset)
        if not starts or not isinstance(seq, int):
            return False
        i = bisect_right(starts, seq)
        return i > 0 and self._ends[asset][i - 1] >= seq

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Pair]:
        for asset in self.assets():
            for first, last in self.ranges(asset):
                for seq in range(first, last + 1):
                    yield asset, seq

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SeqSet):
            return NotImplemented
        return {a: self.ranges(a) for a in self.assets()} == {
            a: other.ranges(a) for a in other.assets()
        }

    __hash__ = None  # type: ignore[assignment]  # mutable, so unhashable (like set)

    def __repr__(self) -> str:
        return f"SeqSet({len(self)} in {self.range_count()} ranges)"

    def assets(self) -> list[str]:
        return sorted(asset for asset, starts in self._starts.items() if starts)

    def ranges(self, asset: str) -> list[tuple[int, int]]:
        """The asset's inclusive ranges, ascending."""
        return list(zip(self._starts.get(asset, []), self._ends.get(asset, []), strict=True))

    def range_count(self) -> int:
        return sum(len(starts) for starts in self._starts.values())

    def difference(self, other: SeqSet) -> SeqSet:
        """The members of this set that are not in `other`."""
        out = SeqSet()
        for asset in self.assets():
            theirs = other.ranges(asset)
            j = 0
            for first, last in self.ranges(asset):
                start = first
                while j < len(theirs) and theirs[j][1] < start:
                    j += 1
                k = j
                while start <= last and k < len(theirs) and theirs[k][0] <= last:
                    other_first, other_last = theirs[k]
                    if other_first > start:
                        out.add_range(asset, start, other_first - 1)
                    start = max(start, other_last + 1)
                    k += 1
                if start <= last:
                    out.add_range(asset, start, last)
        return out


@dataclass
class _Bucket:
    """A count and the first few examples of one kind of finding."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, example: str, limit: int) -> None:
        self.count += 1
        if len(self.examples) < limit:
            self.examples.append(example)


@dataclass(frozen=True, slots=True)
class AuditReport:
    acked: int
    found: int
    lost: int
    duplicated: int
    unexpected: int
    entries: int  # telemetry entries read
    dead_letters: int  # dead-letter entries read
    dead_lettered: int  # acknowledged messages accounted for by an accepted dead letter
    examples: Mapping[str, list[str]]  # per kind: lost, duplicated, unexpected
    unconfirmed: int = 0  # entries of messages given up without a PUBACK, found all the same

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "acked": self.acked,
            "found": self.found,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "unconfirmed": self.unconfirmed,
            "entries": self.entries,
            "dead_letters": self.dead_letters,
            "dead_lettered": self.dead_lettered,
            "examples": {kind: list(found) for kind, found in self.examples.items()},
        }


def _text(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("utf-8", "replace")


def entry_field(fields: Mapping[bytes | str, bytes | str], name: str) -> str | None:
    """A field of an entry read with or without decode_responses, as text."""
    value = fields.get(name)
    if value is None:
        value = fields.get(name.encode())
    return _text(value)


def entry_identity(fields: Mapping[bytes | str, bytes | str]) -> Pair | None:
    """`(asset, seq)` of a telemetry entry, or None when the entry does not carry them."""
    asset, seq = entry_field(fields, "asset"), entry_field(fields, "seq")
    if not asset or seq is None or not seq.isdigit():
        return None
    return asset, int(seq)


def dead_letter_identity(
    fields: Mapping[bytes | str, bytes | str], asset_level: int
) -> Pair | None:
    """`(asset, seq)` of a dead letter: the asset from the topic's level `asset_level`, `seq` from
    the kept payload. None when either cannot be read (the payload was not JSON, was cut at
    `bridge.dlq_payload_bytes`, or had no integer `seq`)."""
    topic, payload = entry_field(fields, "topic"), entry_field(fields, "payload")
    if topic is None or payload is None:
        return None
    levels = topic.split("/")
    if not 0 <= asset_level < len(levels) or not levels[asset_level]:
        return None
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    seq = body.get("seq") if isinstance(body, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return None
    return levels[asset_level], seq


def asset_level_of(topic_template: str, level: str = "asset") -> int:
    """Index of `{level}` in a route's topic template (3 for `plant/{site}/{line}/{asset}/...`)."""
    return topic_template.split("/").index("{" + level + "}")


def audit(
    acked: SeqSet,
    telemetry: Iterable[Entry],
    dead_letters: Iterable[Entry] = (),
    *,
    accept_reasons: Collection[str] = (),
    asset_level: int | None = None,
    examples: int = EXAMPLES,
) -> AuditReport:
    """Compare the acknowledged set with a telemetry stream and, when some dead-letter reasons
    are expected, the dead-letter stream (which then needs `asset_level` to name the asset)."""
    if accept_reasons and asset_level is None:
        raise ValueError("accept_reasons needs asset_level to read the asset of a dead letter")
    found = SeqSet()
    duplicated, unexpected = _Bucket(), _Bucket()
    entries = unconfirmed = 0
    for entry_id, fields in telemetry:
        entries += 1
        pair = entry_identity(fields)
        where = _text(entry_id)
        if pair is None:
            unexpected.note(f"{where}: no asset/seq", examples)
        elif not found.add(*pair):
            duplicated.note(f"{pair[0]}/{pair[1]} again at {where}", examples)
        elif pair not in acked:
            if entry_field(fields, UNCONFIRMED) is not None:
                unconfirmed += 1
            else:
                unexpected.note(f"{pair[0]}/{pair[1]} at {where}", examples)
    letters, accepted = 0, SeqSet()
    for _entry_id, fields in dead_letters:
        letters += 1
        if asset_level is None or entry_field(fields, "reason") not in accept_reasons:
            continue
        pair = dead_letter_identity(fields, asset_level)
        if pair is not None and pair in acked and pair not in found:
            accepted.add(*pair)
    missing = acked.difference(found).difference(accepted)
    lost = _lost(missing, examples)
    return AuditReport(
        acked=len(acked),
        found=len(acked) - len(missing),
        lost=lost.count,
        duplicated=duplicated.count,
        unexpected=unexpected.count,
        entries=entries,
        dead_letters=letters,
        dead_lettered=len(accepted),
        unconfirmed=unconfirmed,
        examples={
            "lost": lost.examples,
            "duplicated": duplicated.examples,
            "unexpected": unexpected.examples,
        },
    )


def _lost(missing: SeqSet, examples: int) -> _Bucket:
    lost = _Bucket(count=len(missing))
    for asset in missing.assets():
        for first, last in missing.ranges(asset):
            if len(lost.examples) < examples:
                lost.examples.append(
                    f"{asset}/{first}" if first == last else f"{asset}/{first}..{last}"
                )
    return lost


def read_stream(client: redis.Redis, key: str, page_size: int = PAGE_SIZE) -> Iterator[Entry]:
    """Every entry of a stream, oldest first, in XRANGE pages with an exclusive start id, so an
    entry is read once however the pages fall."""
    start = "-"
    while True:
        page = client.xrange(key, start, "+", count=page_size) or []
        for entry_id, fields in page:
            if entry_id is not None and fields is not None:
                yield entry_id, fields
        if len(page) < page_size or page[-1][0] is None:
            return
        start = "(" + (_text(page[-1][0]) or "")


def audit_redis(
    client: redis.Redis,
    streams: str | Sequence[str],
    acked: SeqSet,
    *,
    dead_letters: str | None = None,
    accept_reasons: Collection[str] = (),
    asset_level: int | None = None,
    examples: int = EXAMPLES,
    page_size: int = PAGE_SIZE,
) -> AuditReport:
    """`audit` against the streams in Redis: one telemetry stream, or every shard stream of a
    route (`Keys.telemetry_streams`), and the dead-letter stream when it is named."""
    keys = [streams] if isinstance(streams, str) else list(streams)
    telemetry = chain.from_iterable(read_stream(client, key, page_size) for key in keys)
    letters = read_stream(client, dead_letters, page_size) if dead_letters else iter(())
    return audit(
        acked,
        telemetry,
        letters,
        accept_reasons=accept_reasons,
        asset_level=asset_level,
        examples=examples,
    )
