"""Where a reader of the anomaly streams stands: a query's cursor and a live event's id.

On one Redis there is one anomaly stream, and both are its entry ids, as they always were. On a
Redis Cluster there is one stream per shard, read in the merged order (entry id, stream index) of
`bridge.shard_reads`, where two streams can hold the same id:

- a query's cursor is a point in that order: `<id>:<n>` continues after the entry `<id>` of
  stream `<n>` (then at `<id>` itself in the streams after it), a bare `<id>` after `<id>` in
  every stream (on one Redis, the only form);
- a live event's id is the position in each stream, `<id0>,<id1>,...`: the live reader follows
  every stream at once (one XREAD each), so their events reach a client in no set order and no
  single point of the order says what it has had. A bare `<id>` as Last-Event-ID (one taken from
  a single Redis, or an anomaly's id) stands for that id in every stream.
"""

from __future__ import annotations

from collections.abc import Sequence

from bridge.record import entry_key

CURSOR = r"^\d+(-\d+)?(:\d+)?$"
EVENT_ID = r"^\d+(-\d+)?(,\d+(-\d+)?)*$"

Position = tuple[int, int]  # an entry id as (ms, seq)


def cursor_of(entry_id: str, index: int, streams: int) -> str:
    """The cursor that continues after the entry `entry_id` of stream `index`."""
    return entry_id if index == streams - 1 else f"{entry_id}:{index}"


def starts_after(cursor: str, streams: int) -> list[str]:
    """The XRANGE start of each stream that continues after `cursor`. ValueError when it names a
    stream there is not."""
    entry_id, _, named = cursor.partition(":")
    index = int(named) if named else streams - 1
    if index >= streams:
        raise ValueError(f"the cursor names anomaly stream {index}; there are {streams}")
    return [f"({entry_id}" if i <= index else entry_id for i in range(streams)]


def positions_of(event_id: str, streams: int) -> list[Position]:
    """The position in each stream that a live event id names. ValueError when it names another
    number of streams."""
    parts = event_id.split(",")
    if len(parts) == 1:
        parts *= streams
    elif len(parts) != streams:
        raise ValueError(f"the event id names {len(parts)} anomaly streams; there are {streams}")
    return [entry_key(part) for part in parts]


def event_id(positions: Sequence[Position]) -> str:
    """A live event's id: the position in every stream."""
    return ",".join(f"{ms}-{seq}" for ms, seq in positions)
