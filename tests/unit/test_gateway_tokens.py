"""Device tokens and the failure throttle, in-process."""

from __future__ import annotations

import re

from gateway.tokens import FailureThrottle, decode, encode, new_token


def test_a_token_is_printed_once_and_stored_as_its_hash_bound_to_a_pattern() -> None:
    token, record = new_token("press-*")
    assert re.fullmatch(r"ibt_[0-9a-f]{16}_[A-Za-z0-9_-]{43}", token)
    secret = token.split("_", 2)[2]
    stored = encode(record)
    assert secret not in stored
    assert token.split("_")[1] == record.id
    again = decode(record.id, stored)
    assert again == record
    assert again.allows("press-7")
    assert not again.allows("pump-1")
    assert not new_token("a1")[1].allows("a10")


def test_failures_past_the_allowance_are_delayed_doubling_to_8x_and_a_success_clears_them() -> None:
    throttle = FailureThrottle(allowed=3, penalty_s=0.5)
    delays = [throttle.failed("10.0.0.1") for _ in range(8)]
    assert delays == [0.0, 0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert throttle.failed("10.0.0.2") == 0.0  # per client
    throttle.succeeded("10.0.0.1")
    assert throttle.failed("10.0.0.1") == 0.0


def test_the_throttle_remembers_a_bounded_number_of_clients_least_recent_first_forgotten() -> None:
    throttle = FailureThrottle(allowed=1, penalty_s=1.0)
    assert throttle.failed("first") == 0.0
    for i in range(FailureThrottle.MAX_CLIENTS):
        throttle.failed(f"c{i}")
    assert len(throttle._failures) == FailureThrottle.MAX_CLIENTS
    assert throttle.failed("first") == 0.0  # forgotten: counted from 1 again
    assert throttle.failed("c9999") == 1.0  # still remembered: its second failure
