"""The admin API's pure parts: dead-letter decoding, the live buffer's bound, the admin token."""

from __future__ import annotations

import base64

import pytest
from fastapi import HTTPException
from fastapi.security import HTTPAuthorizationCredentials

from config.settings import Settings
from gateway.admin_anomalies import BUFFER_EVENTS, Subscriber, Wanted, to_anomaly
from gateway.admin_auth import admin_guard
from gateway.admin_dead_letters import to_letter

TOKEN = "a-token-of-the-admin-0123456789"


def test_dead_letter_payload_as_text_or_base64_and_truncation() -> None:
    fields = {"topic": b"plant/s1/l1/a1/telemetry", "route": b"telemetry", "reason": b"json",
              "error": b"x", "rx": b"1767225600.5", "size": b"4", "payload": b"\xff\xfe{}"}  # fmt: skip
    letter = to_letter("1-0", fields)
    assert letter.payload_encoding == "base64"
    assert base64.b64decode(letter.payload) == b"\xff\xfe{}"
    assert (letter.received_at, letter.size, letter.truncated) == (1767225600.5, 4, False)
    cut = to_letter("2-0", {**fields, "payload": b"{}", "size": b"70000"})
    assert (cut.payload, cut.payload_encoding, cut.truncated) == ("{}", "utf-8", True)
    bare = to_letter("3-0", {"payload": b"{}"})
    assert (bare.size, bare.truncated, bare.reason) == (None, False, "")


def test_live_buffer_is_bounded() -> None:
    subscriber = Subscriber(Wanted(asset="a1"), [(0, 0)])
    event = to_anomaly("5-0", {"asset": b"a1", "detector": b"rate", "value": b"1.5"})
    assert subscriber.wanted(event)
    assert not subscriber.wanted(to_anomaly("6-0", {"asset": b"a2"}))
    accepted = [subscriber.offer(0, event) for _ in range(BUFFER_EVENTS + 1)]
    assert accepted.count(True) == BUFFER_EVENTS
    assert accepted[-1] is False
    assert subscriber.overflowed
    assert len(subscriber.events) == BUFFER_EVENTS


def test_admin_token_checks() -> None:
    check = admin_guard(Settings(gateway={"admin_token": TOKEN}))
    check(HTTPAuthorizationCredentials(scheme="Bearer", credentials=TOKEN))
    for credentials in (
        None,
        HTTPAuthorizationCredentials(scheme="Bearer", credentials=TOKEN[:-1]),
    ):
        with pytest.raises(HTTPException) as refused:
            check(credentials)
        assert refused.value.status_code == 401
        assert refused.value.headers is not None
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    off = admin_guard(Settings())
    with pytest.raises(HTTPException) as disabled:
        off(HTTPAuthorizationCredentials(scheme="Bearer", credentials=TOKEN))
    assert disabled.value.status_code == 403
