"""What the broker acknowledged, per asset, compactly: the input of `iotbridge audit`.

A device restart sends seq 0 again, so `(asset, seq)` is not an identity across a restart: each
acknowledged message is recorded as `(asset, epoch, seq)`, where the epoch counts the asset's
restarts, with the device time at which each epoch began. The audit gives a stream entry the
epoch its `ts` falls in. Messages with a skewed clock are listed apart (`bad`): they are
dead-lettered or, for a skew inside the bridge's clock window, stored, and are never counted as
lost, duplicated or unexpected. The other deliberately bad messages (malformed, wrong types,
oversized) are extra messages that can only be dead-lettered, and are not recorded at all.
Messages the simulator sent and gave up on without a PUBACK are listed apart too (`unconfirmed`):
the broker may have taken them before the connection dropped, so one found in a stream is
marked for the audit, which counts it as `unconfirmed`, neither acknowledged nor unexpected.

Engines record with `simulators.acklog.AckLog` and write their part of the file at the end.

The file (`--acked FILE`) is JSON lines: a header, then one line per asset that had anything
acknowledged: `{"asset": "a000001", "acked": [[epoch, first, last], ...], "epochs": [ts, ...],
"bad": [[epoch, seq], ...], "unconfirmed": [[epoch, first, last], ...]}` (ranges inclusive, `epochs[i]` the device time epoch i+1 began).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from simulators.acklog import FORMAT, AckLog, write_records
from simulators.audit import UNCONFIRMED, Entry, SeqSet, entry_field

__all__ = ["FORMAT", "AckLog", "Acked", "epoch_key", "load", "load_all", "write", "write_header"]


def write_header(out: TextIO, header: Mapping[str, Any]) -> None:
    out.write(json.dumps({"format": FORMAT, **header}, sort_keys=True) + "\n")


def write(out: TextIO, header: Mapping[str, Any], records: Iterable[Mapping[str, Any]]) -> int:
    """Write the file; returns the number of asset lines."""
    write_header(out, header)
    return write_records(out, records)


def epoch_key(asset: str, epoch: int) -> str:
    """The audit's asset name for one epoch: `a000001`, then `a000001@1` after a restart."""
    return asset if epoch == 0 else f"{asset}@{epoch}"


@dataclass
class Acked:
    """A loaded file: the audited set, the bad messages and each asset's epoch boundaries."""

    header: dict[str, Any]
    acked: SeqSet = field(default_factory=SeqSet)
    bad: set[tuple[str, int]] = field(default_factory=set)
    unconfirmed: SeqSet = field(default_factory=SeqSet)
    epochs: dict[str, list[float]] = field(default_factory=dict)

    def identity(self, asset: str, seq: int, ts: float | None) -> tuple[str, int]:
        starts = self.epochs.get(asset)
        if not starts or ts is None:
            return asset, seq
        return epoch_key(asset, bisect_right(starts, ts)), seq

    def telemetry(self, entries: Iterable[Entry], skipped: list[int]) -> Iterator[Entry]:
        """Stream entries as the audit should see them: named by epoch, bad messages left out
        (counted in `skipped[0]`), unconfirmed ones marked (`audit.UNCONFIRMED`)."""
        for entry_id, fields in entries:
            asset, seq, ts = (entry_field(fields, name) for name in ("asset", "seq", "ts"))
            if asset is None or seq is None or not seq.isdigit():
                yield entry_id, fields
                continue
            try:
                when = float(ts) if ts is not None else None
            except ValueError:
                when = None
            name, number = self.identity(asset, int(seq), when)
            if (name, number) in self.bad:
                skipped[0] += 1
                continue
            if (name, number) in self.unconfirmed and (name, number) not in self.acked:
                yield entry_id, {"asset": name, "seq": str(number), UNCONFIRMED: "1"}
            else:
                yield entry_id, {"asset": name, "seq": str(number)}


def load(path: str | Path) -> Acked:
    """Read an `--acked` file (ValueError when it is not one)."""
    return load_all([path])


def load_all(paths: Iterable[str | Path]) -> Acked:
    """Read the `--acked` files of one run's processes (each with its own assets) as one; the
    first file's header stands for them all (ValueError when one is not an acked file or names
    another route)."""
    loaded: Acked | None = None
    for path in paths:
        loaded = _read(path, loaded)
    if loaded is None:
        raise ValueError("no acked file")
    return loaded


def _read(path: str | Path, loaded: Acked | None) -> Acked:
    with Path(path).open(encoding="utf-8") as lines:
        header = json.loads(next(lines, "{}"))
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not an acked file (format {header.get('format')!r})")
        if loaded is None:
            loaded = Acked(header)
        elif header.get("route") != loaded.header.get("route"):
            raise ValueError(
                f"{path}: route {header.get('route')!r}, not {loaded.header.get('route')!r}"
            )
        for line in lines:
            record = json.loads(line)
            asset = record["asset"]
            for epoch, first, last in record.get("acked", ()):
                loaded.acked.add_range(epoch_key(asset, epoch), first, last)
            for epoch, first, last in record.get("unconfirmed", ()):
                loaded.unconfirmed.add_range(epoch_key(asset, epoch), first, last)
            for epoch, seq in record.get("bad", ()):
                loaded.bad.add((epoch_key(asset, epoch), seq))
            if "epochs" in record:
                loaded.epochs[asset] = sorted(record["epochs"])
    return loaded
