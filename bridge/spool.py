"""The spool: store and forward on local disk while Redis is away, like HiveMQ Edge's.

A plant's broker queue is small (Mosquitto's default drops silently past 1,000 queued messages),
so during a long Redis outage the bridge appends each batch here, fsyncs, and only then
acknowledges it. When Redis is back the spool drains in order, before any newer message, through
the same deduplicating write, so replaying a batch after a crash leaves one copy.

Files: `seg-<n>.spool`, each a run of records `magic | length | crc32 | payload`; a torn record at
the end (a crash before its fsync, so never acknowledged) is cut off on open. `seg-<n>.done` holds
how far a segment has been drained (advisory: losing it only means replaying into dedup).
All methods block on disk I/O: call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from bridge.sink import Append, Dedup

log = logging.getLogger(__name__)

_MAGIC = b"IBS1"
_HEADER = struct.Struct(">4sII")  # magic, payload length, crc32
_U32 = struct.Struct(">I")


class SpoolFull(Exception):
    """The spool is at its bound; the batch was not stored."""


def _encode(appends: Sequence[Append]) -> bytes:
    parts = [_U32.pack(len(appends))]
    for a in appends:
        d = a.dedup
        head: list[bytes | str] = (
            [a.stream, d.key, d.asset, str(d.seq), repr(d.ts)] if d else [a.stream, "", "", "", ""]
        )
        items = [*head, str(a.count), a.packed]
        parts.append(_U32.pack(len(items)))
        for item in items:
            raw = item.encode() if isinstance(item, str) else bytes(item)
            parts += [_U32.pack(len(raw)), raw]
    return b"".join(parts)


def _decode(payload: bytes) -> list[Append]:
    view = memoryview(payload)
    (count,), pos = _U32.unpack_from(view, 0), _U32.size
    appends = []
    for _ in range(count):
        (n,) = _U32.unpack_from(view, pos)
        pos += _U32.size
        items = []
        for _ in range(n):
            (size,) = _U32.unpack_from(view, pos)
            pos += _U32.size
            items.append(bytes(view[pos : pos + size]))
            pos += size
        stream, key, asset, seq, ts, count, packed = items
        dedup = Dedup(key.decode(), asset.decode(), int(seq), float(ts)) if key else None
        appends.append(Append(stream.decode(), int(count), packed, dedup))
    return appends


class Spool:
    def __init__(self, directory: str | Path, max_bytes: int, segment_bytes: int) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.bytes = 0  # undrained bytes
        self.entries = 0  # undrained messages
        self._segments: list[int] = []
        self._offset = 0  # drained bytes of the oldest segment
        self._peeked: tuple[list[Append], int] | None = None
        self._open()

    def _path(self, n: int, suffix: str = "spool") -> Path:
        return self.dir / f"seg-{n:012d}.{suffix}"

    def _open(self) -> None:
        self._segments = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("seg-*.spool"))
        for i, n in enumerate(self._segments):
            start = self._read_offset(n) if i == 0 else 0
            valid_end, entries = self._scan(n, start)
            self.bytes += valid_end - start
            self.entries += entries
            if i == 0:
                self._offset = start
        if self.entries:
            log.warning("spool holds undelivered messages from an earlier run",
                        extra={"entries": self.entries, "bytes": self.bytes, "dir": str(self.dir)})  # fmt: skip

    def _read_offset(self, n: int) -> int:
        try:
            return int(self._path(n, "done").read_text())
        except (OSError, ValueError):
            return 0

    def _scan(self, n: int, start: int) -> tuple[int, int]:
        """Count messages from `start`; cut a torn tail. Returns (end of valid data, messages)."""
        path = self._path(n)
        data = path.read_bytes()
        pos, entries = start, 0
        while pos + _HEADER.size <= len(data):
            magic, length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size : pos + _HEADER.size + length]
            if magic != _MAGIC or len(body) != length or zlib.crc32(body) != crc:
                break
            entries += _U32.unpack_from(body, 0)[0]
            pos += _HEADER.size + length
        if pos < len(data):
            log.warning(
                "spool segment has a torn tail; cutting it", extra={"file": str(path), "at": pos}
            )
            with path.open("r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        return pos, entries

    @property
    def empty(self) -> bool:
        return self.entries == 0

    def append(self, appends: Sequence[Append]) -> None:
        """Store a batch durably (fsync) or raise SpoolFull."""
        payload = _encode(appends)
        record = _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload
        if self.bytes + len(record) > self.max_bytes:
            raise SpoolFull(f"spool at {self.bytes} of {self.max_bytes} bytes")
        if (
            not self._segments
            or self._path(self._segments[-1]).stat().st_size >= self.segment_bytes
        ):
            self._segments.append(self._segments[-1] + 1 if self._segments else 1)
            self._path(self._segments[-1]).touch()
            self._fsync_dir()
        with self._path(self._segments[-1]).open("ab") as f:
            f.write(record)
            f.flush()
            os.fsync(f.fileno())
        self.bytes += len(record)
        self.entries += len(appends)

    def peek(self) -> list[Append] | None:
        """The oldest undrained batch (the same one until `consume`), or None when empty."""
        if self._peeked is not None:
            return self._peeked[0]
        while self._segments:
            n = self._segments[0]
            with self._path(n).open("rb") as f:
                f.seek(self._offset)
                header = f.read(_HEADER.size)
                if len(header) == _HEADER.size:
                    _magic, length, _crc = _HEADER.unpack(header)
                    appends = _decode(f.read(length))
                    self._peeked = (appends, _HEADER.size + length)
                    return appends
            if len(self._segments) == 1:
                break  # the active segment, drained to its end
            self._drop_oldest()
        self.entries = self.bytes = 0
        return None

    def consume(self) -> None:
        """Mark the peeked batch as written to Redis."""
        if self._peeked is None:
            return
        appends, size = self._peeked
        self._peeked = None
        self._offset += size
        self.bytes -= size
        self.entries -= len(appends)
        n = self._segments[0]
        if self.entries == 0:
            # Fully drained: start afresh so the files do not grow forever.
            while self._segments:
                self._drop_oldest()
            self.bytes = 0
        elif len(self._segments) > 1 and self._offset >= self._path(n).stat().st_size:
            self._drop_oldest()
        else:
            self._path(n, "done").write_text(str(self._offset))

    def _drop_oldest(self) -> None:
        n = self._segments.pop(0)
        self._path(n).unlink(missing_ok=True)
        self._path(n, "done").unlink(missing_ok=True)
        self._offset = self._read_offset(self._segments[0]) if self._segments else 0
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
