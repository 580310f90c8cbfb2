"""When each message of a run is due: the rate scheduling math, kept pure so it can be tested.

The run is one ordered sequence of send slots. Slot j belongs to asset j % assets, as that asset's
message number j // assets, and is due at j / (assets * rate_hz) seconds after the start. So each
asset publishes exactly every 1 / rate_hz seconds, and the assets are staggered evenly across that
period instead of all publishing at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Products like 0.3 * 10 come out as 3.0000000000000004 or 2.9999999999999996; this absorbs that.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class Schedule:
    assets: int
    rate_hz: float
    duration_s: float

    @property
    def per_asset(self) -> int:
        """Messages per asset: the whole periods in the duration, and at least one."""
        return max(1, math.floor(self.duration_s * self.rate_hz + _EPSILON))

    @property
    def total(self) -> int:
        return self.assets * self.per_asset

    @property
    def target_rate(self) -> float:
        """Messages per second over the whole fleet."""
        return self.assets * self.rate_hz

    def slot(self, number: int) -> tuple[int, int]:
        """(asset index, seq) of send slot `number`."""
        seq, index = divmod(number, self.assets)
        return index, seq

    def time_of(self, number: int) -> float:
        """Seconds after the start at which slot `number` is due."""
        return number / self.target_rate

    def due(self, elapsed_s: float) -> int:
        """How many slots are due `elapsed_s` after the start (slot 0 is due at once)."""
        if elapsed_s < 0:
            return 0
        return min(self.total, math.floor(elapsed_s * self.target_rate + _EPSILON) + 1)
