"""Publishes and their outcomes, over one engine's connections (engine thread only).

The outbox hands a message to its connection and follows it to an outcome: acknowledged (QoS 1:
PUBACKed; QoS 0: written to the socket), rejected by the broker, or given up without a PUBACK
(`unconfirmed`: the connection dropped, or the drain ended), when the broker may have taken it
all the same. The acknowledged set (`AckLog`) records exactly what the broker PUBACKed; what was
given up is recorded apart, so the audit can tell it from a message nobody sent.

A message's extras (a duplicate, a bad copy, a held message released) may find the window full:
they wait in the connection's `backlog`, which holds at most that, since the engine starts a
scheduled message only on a `ready` connection (empty backlog, a free slot).
"""

from __future__ import annotations

import time

from simulators.acklog import AckLog
from simulators.connection import Connection
from simulators.stats import PublishStats

# Sentinel epochs of an in-flight message: a fault's extra message (not audited); a bad one is
# stored as -2 - epoch.
EXTRA = -1


class Outbox:
    def __init__(self, qos: int, stats: PublishStats, acks: AckLog) -> None:
        self.qos = qos
        self.stats = stats
        self.acks = acks
        self.in_flight = 0  # QoS 1 publishes awaiting their PUBACK, over all connections
        self.backlogged: set[Connection] = set()
        self.dirty: list[Connection] = []

    def publish(
        self,
        conn: Connection,
        topic: bytes,
        payload: bytes,
        ident: tuple[int, int, int],
        scheduled: bool = True,
    ) -> None:
        """Publish `payload` for `ident` = (local asset, epoch, seq); a scheduled message that
        cannot go is skipped, an extra that cannot go is a failure."""
        if not conn.up:
            self._not_sent("not_connected", scheduled)
            return
        if self.qos == 1 and (conn.backlog or conn.full):
            conn.backlog.append((topic, payload, ident, scheduled))
            self.backlogged.add(conn)
            return
        self._send(conn, topic, payload, ident, scheduled)

    def _send(
        self,
        conn: Connection,
        topic: bytes,
        payload: bytes,
        ident: tuple[int, int, int],
        scheduled: bool,
    ) -> None:
        stats = self.stats
        mid = conn.publish(topic, payload)
        if mid < 0:
            self._not_sent("error", scheduled)
            return
        stats.sent += 1
        if not scheduled:
            stats.extras_sent += 1
        if self.qos == 1:
            conn.pending[mid] = (*ident, time.perf_counter())
            self.in_flight += 1
        else:
            conn.unflushed += 1
            self._record(*ident)
        self.mark(conn)

    def _not_sent(self, reason: str, scheduled: bool, count: int = 1) -> None:
        if scheduled:
            self.stats.skip(reason, count)
        else:
            self.stats.fail(reason, count)

    def _record(self, local: int, epoch: int, seq: int) -> None:
        if epoch >= 0:
            self.acks.add(local, epoch, seq)
        elif epoch < EXTRA:
            self.acks.add_bad(local, -2 - epoch, seq)

    def on_ack(self, conn: Connection, mid: int, failed: bool) -> None:
        entry = conn.pending.pop(mid, None)
        if entry is None:
            return  # given up already (the connection dropped): stays unconfirmed
        self.in_flight -= 1
        local, epoch, seq, started = entry
        if failed:  # an MQTT 5 PUBACK with an error reason, e.g. not authorized
            self.stats.fail("rejected")
        else:
            self.stats.acked += 1
            self.stats.observe(time.perf_counter() - started)
            self._record(local, epoch, seq)
        if conn.backlog:
            self.backlogged.add(conn)

    def give_up(self, conn: Connection, reason: str = "not_connected") -> None:
        """The connection's outstanding publishes end without a PUBACK (unconfirmed), its
        backlog without being sent (`reason`)."""
        pending = conn.pending
        if pending:
            for local, epoch, seq, _ in pending.values():
                if epoch >= 0:
                    self.acks.add_unconfirmed(local, epoch, seq)
                elif epoch < EXTRA:
                    self.acks.add_bad(local, -2 - epoch, seq)
            self.stats.fail("unacked", len(pending))
            self.in_flight -= len(pending)
            pending.clear()
        for _topic, _payload, _ident, scheduled in conn.backlog:
            self._not_sent(reason, scheduled)
        conn.backlog.clear()
        self.backlogged.discard(conn)

    def drain_backlogs(self) -> None:
        for conn in list(self.backlogged):
            self.backlogged.discard(conn)
            backlog = conn.backlog
            while backlog and not conn.full and conn.up:
                topic, payload, ident, scheduled = backlog.popleft()
                self._send(conn, topic, payload, ident, scheduled)

    def mark(self, conn: Connection) -> None:
        if not conn.dirty:
            conn.dirty = True
            self.dirty.append(conn)

    def flush(self) -> None:
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            written = conn.unflushed
            if conn.flush():
                if self.qos == 0:
                    self.stats.acked += written
            else:
                self.mark(conn)  # the kernel buffer is full: try again next pass
