"""The sequence of one edge-node session, with a reorder buffer.

Every message of an edge node but NDEATH carries `seq`, one more than the node's previous message
(NDATA, DBIRTH, DDATA and DDEATH share the count), 255 followed by 0; the NBIRTH sets the start
(tck-id-payloads-sequence-num-always-included, tck-id-payloads-sequence-num-zero-nbirth,
tck-id-payloads-sequence-num-incrementing, tck-id-payloads-nbirth-seq). A message ahead of the
next expected seq is held and a timer starts (tck-id-operational-behavior-host-reordering-start);
the missing ones arriving in time release everything held in order and stop it
(tck-id-operational-behavior-host-reordering-success); the timer running out releases what is
held, skips the hole and tells the host to ask for a rebirth
(tck-id-operational-behavior-host-reordering-rebirth). Time is passed in, never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

SEQ_MODULUS = 256
# A seq up to 127 ahead of the expected one is held; one further "ahead" is as likely one the host
# has passed already (a duplicate, a very late message): it cannot be placed.
WINDOW = SEQ_MODULUS // 2

T = TypeVar("T")


class Placement(Enum):
    RELEASED = "released"  # the expected seq: released with whatever it unblocked
    HELD = "held"  # ahead of the expected seq: held until the hole fills or the timer runs out
    DUPLICATE = "duplicate"  # the same seq is held already
    BEHIND = "behind"  # behind the expected seq (or 128+ ahead): cannot be placed


@dataclass(slots=True)
class Offer(Generic[T]):
    placement: Placement
    released: list[T] = field(default_factory=list)


class Reorder(Generic[T]):
    """Puts one session's messages back in seq order; `timeout_s` is the Reorder Timeout
    (tck-id-operational-behavior-host-reordering-param)."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._expected: int | None = None
        self._held: dict[int, tuple[T, float]] = {}

    @property
    def started(self) -> bool:
        return self._expected is not None

    @property
    def expected(self) -> int | None:
        return self._expected

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def deadline(self) -> float | None:
        """When the oldest held message's wait ends (None: nothing held)."""
        if not self._held:
            return None
        return min(arrived for _, arrived in self._held.values()) + self._timeout_s

    def start(self, seq: int) -> int:
        """A birth with `seq` starts the session; returns how many held messages it drops."""
        dropped = len(self._held)
        self._held.clear()
        self._expected = (seq + 1) % SEQ_MODULUS
        return dropped

    def stop(self) -> None:
        self._held.clear()
        self._expected = None

    def offer(self, seq: int, item: T, now: float) -> Offer[T]:
        """Place one message of the started session."""
        assert self._expected is not None, "offer before start"
        ahead = (seq - self._expected) % SEQ_MODULUS
        if ahead == 0:
            self._expected = (seq + 1) % SEQ_MODULUS
            return Offer(Placement.RELEASED, [item, *self._release_consecutive()])
        if ahead >= WINDOW:
            return Offer(Placement.BEHIND)
        if seq in self._held:
            return Offer(Placement.DUPLICATE)
        self._held[seq] = (item, now)
        return Offer(Placement.HELD)

    def expire(self, now: float) -> tuple[list[T], int] | None:
        """When the wait has run out: everything held, in seq order, and how many seqs never came;
        None before the deadline (or with nothing held)."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        return self.flush()

    def flush(self) -> tuple[list[T], int]:
        """Everything held, in seq order, the holes skipped; and how many seqs never came."""
        assert self._expected is not None or not self._held
        released: list[T] = []
        missing = 0
        while self._held:
            assert self._expected is not None
            ahead = min((seq - self._expected) % SEQ_MODULUS for seq in self._held)
            missing += ahead
            self._expected = (self._expected + ahead) % SEQ_MODULUS
            released.append(self._held.pop(self._expected)[0])
            self._expected = (self._expected + 1) % SEQ_MODULUS
            released += self._release_consecutive()
        return released, missing

    def _release_consecutive(self) -> list[T]:
        released: list[T] = []
        while self._expected in self._held:
            released.append(self._held.pop(self._expected)[0])
            self._expected = (self._expected + 1) % SEQ_MODULUS
        return released
