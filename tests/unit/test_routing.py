from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bridge.routing import RouteTable
from config.settings import RouteSettings

TABLE = RouteTable([
    RouteSettings(name="telemetry", topic="plant/{site}/{line}/{asset}/telemetry"),
    RouteSettings(name="events", topic="plant/{site}/{asset}/events/#", qos=0),
])  # fmt: skip


def test_subscriptions_are_derived_from_the_route_table() -> None:
    assert TABLE.subscriptions() == [("plant/+/+/+/telemetry", 1), ("plant/+/+/events/#", 0)]
    assert TABLE.subscriptions("bridges")[0] == ("$share/bridges/plant/+/+/+/telemetry", 1)


def test_named_levels_are_captured() -> None:
    match = TABLE.match("plant/s1/l2/press-7/telemetry")
    assert match is not None
    route, levels = match
    assert route.name == "telemetry"
    assert levels == {"site": "s1", "line": "l2", "asset": "press-7"}


def test_hash_tail_matches_any_depth() -> None:
    match = TABLE.match("plant/s1/a9/events/door/open")
    assert match is not None
    assert match[0].name == "events"
    assert TABLE.match("plant/s1/a9/events") is not None


def test_levels_outside_the_allowlist_do_not_match() -> None:
    for topic in (
        "plant/s1/l1/a 1/telemetry",
        "plant/s1/l1/$SYS/telemetry",
        "plant/s1/l1//telemetry",
        "plant/s1/l1/ä/telemetry",
        "plant/s1/l1/a1/telemetry/extra",
        "factory/s1/l1/a1/telemetry",
    ):
        assert TABLE.match(topic) is None, topic


@given(st.text(max_size=80))
def test_any_topic_either_matches_cleanly_or_not_at_all(topic: str) -> None:
    match = TABLE.match(topic)
    if match is not None:
        for value in match[1].values():
            assert value.isascii()
            assert "/" not in value
            assert value.strip() == value
