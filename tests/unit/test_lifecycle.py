from __future__ import annotations

import asyncio
import random

from config.settings import BackoffSettings
from observability.lifecycle import Backoff


def test_backoff_grows_caps_and_resets() -> None:
    backoff = Backoff(BackoffSettings(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.0))
    assert [round(backoff.next_delay(), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_backoff_jitter_stays_within_its_fraction() -> None:
    backoff = Backoff(BackoffSettings(initial_s=1.0, max_s=1.0, jitter=0.2), random.Random(7))
    delays = [backoff.next_delay() for _ in range(200)]
    assert min(delays) >= 0.8
    assert max(delays) <= 1.2
    assert len(set(delays)) > 100


async def test_backoff_wait_returns_early_when_stopping() -> None:
    backoff = Backoff(BackoffSettings(initial_s=30.0, max_s=30.0, jitter=0.0))
    stop = asyncio.Event()
    stop.set()
    async with asyncio.timeout(1):
        assert await backoff.wait(stop) is True
