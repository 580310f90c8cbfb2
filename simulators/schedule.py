"""When each asset's next message is due, and which messages are too late to send.

A timing wheel of 5 ms ticks: a tick's bucket lists the assets due in it; an asset whose message
was sent goes into the bucket of its next one. Per message this costs a list append, where a heap
would cost a tuple and two O(log n) operations; per asset it costs two array slots.

A message not sent `max_lag_s` after it was due is skipped (the engine counts it as
behind_schedule): an engine that cannot keep up, or whose connections cannot take more, keeps
its place in the schedule instead of queueing what it could not send.
"""

from __future__ import annotations

from array import array

from simulators.fleet import Fleet

TICK_S = 0.005
WHEEL_SLOTS = 4096  # 20 s of ticks; longer intervals wait a few laps (`due_tick` says when)


class Schedule:
    """The next message of every asset of one engine: its number `next_k` and its `due_tick`."""

    def __init__(self, fleet: Fleet, per_asset: int, max_lag_s: float) -> None:
        self._fleet = fleet
        self.per_asset = per_asset
        n = fleet.count
        self.lag_ticks = max(1, round(max_lag_s / TICK_S))
        self.next_k = array("l", bytes(8 * n))
        self.due_tick = array("l", (int(fleet.due_s(i, 0) / TICK_S) for i in range(n)))
        self._wheel: list[list[int]] = [[] for _ in range(WHEEL_SLOTS)]
        for local in range(n):
            self._wheel[self.due_tick[local] % WHEEL_SLOTS].append(local)
        self.remaining = n  # assets with messages left

    def take(self, tick: int) -> list[int]:
        """The assets due at `tick` (call once per tick, in order); the others of its slot stay
        for a later lap."""
        slot = tick % WHEEL_SLOTS
        bucket, self._wheel[slot] = self._wheel[slot], []
        due = []
        for local in bucket:
            if self.due_tick[local] > tick:
                self._wheel[slot].append(local)
            else:
                due.append(local)
        return due

    def skip_late(self, local: int, tick: int) -> int:
        """Pass over the asset's messages due more than the lag before `tick`; how many."""
        if tick - self.due_tick[local] <= self.lag_ticks or self.done(local):
            return 0
        k, skipped = self.next_k[local], 0
        while k < self.per_asset and tick - self._due_tick(local, k) > self.lag_ticks:
            k += 1
            skipped += 1
        self.next_k[local] = k
        if k < self.per_asset:
            self.due_tick[local] = self._due_tick(local, k)
        else:
            self.remaining -= 1
        return skipped

    def done(self, local: int) -> bool:
        return self.next_k[local] >= self.per_asset

    def advance(self, local: int, tick: int) -> bool:
        """The asset's message is dealt with (sent or skipped): schedule the next one after
        `tick`; False when that was its last."""
        k = self.next_k[local] + 1
        self.next_k[local] = k
        if k >= self.per_asset:
            self.remaining -= 1
            return False
        self.due_tick[local] = max(tick + 1, self._due_tick(local, k))
        self.place(local)
        return True

    def place(self, local: int) -> None:
        """Put an asset (taken and not served) back in the bucket of its due tick."""
        self._wheel[self.due_tick[local] % WHEEL_SLOTS].append(local)

    def unsent(self) -> int:
        """Messages of the schedule not dealt with yet."""
        per_asset = self.per_asset
        return sum(per_asset - k for k in self.next_k)

    def _due_tick(self, local: int, k: int) -> int:
        return int(self._fleet.due_s(local, k) / TICK_S)
