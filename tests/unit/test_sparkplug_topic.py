"""Sparkplug topics parse or are refused; ids and metric names become plain, distinct names."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sparkplug import names
from bridge.sparkplug.topic import (
    EdgeTopic,
    MessageType,
    StateTopic,
    TopicError,
    parse,
    subscriptions,
)
from config.sections import NAME_PATTERN

PLAIN = re.compile(NAME_PATTERN)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("spBv1.0/Plant 1/NBIRTH/Edge_1", EdgeTopic("Plant 1", MessageType.NBIRTH, "Edge_1")),
        ("spBv1.0/g/NDATA/n", EdgeTopic("g", MessageType.NDATA, "n")),
        ("spBv1.0/g/NDEATH/n", EdgeTopic("g", MessageType.NDEATH, "n")),
        ("spBv1.0/g/NCMD/n", EdgeTopic("g", MessageType.NCMD, "n")),
        ("spBv1.0/g/DBIRTH/n/d", EdgeTopic("g", MessageType.DBIRTH, "n", "d")),
        ("spBv1.0/g/DDATA/n/Pump ü", EdgeTopic("g", MessageType.DDATA, "n", "Pump ü")),
        ("spBv1.0/g/DDEATH/n/d", EdgeTopic("g", MessageType.DDEATH, "n", "d")),
        ("spBv1.0/g/DCMD/n/d", EdgeTopic("g", MessageType.DCMD, "n", "d")),
        ("spBv1.0/STATE/scada-1", StateTopic("scada-1")),
    ],
)
def test_topics_parse(topic: str, expected: EdgeTopic | StateTopic) -> None:
    assert parse(topic) == expected
    assert str(expected) == topic


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("spAv1.0/g/NDATA/n", "namespace"),
        ("spBv1.0/g/NDATA", "levels"),
        ("spBv1.0/g/NDATA/n/d/x", "levels"),
        ("spBv1.0/g/NDATA/n/d", "takes no device"),
        ("spBv1.0/g/DDATA/n", "needs a device"),
        ("spBv1.0/g/STATUS/n", "unknown message type"),
        ("spBv1.0//NDATA/n", "empty group"),
        ("spBv1.0/g/NDATA/", "empty edge node"),
        ("spBv1.0/g/DDATA/n/", "empty device"),
        ("spBv1.0/g+/NDATA/n", "reserved"),
        ("spBv1.0/g/NDATA/n#", "reserved"),
        ("spBv1.0/STATE/", "empty host"),
    ],
)
def test_malformed_topics_are_refused(topic: str, why: str) -> None:
    with pytest.raises(TopicError, match=why):
        parse(topic)


def test_subscriptions() -> None:
    assert subscriptions(["#"], "h") == ["spBv1.0/#"]
    assert subscriptions(["A", "B"], "h") == ["spBv1.0/STATE/h", "spBv1.0/A/#", "spBv1.0/B/#"]


@pytest.mark.parametrize(
    ("original", "escaped"),
    [
        ("Edge_Node_1", "Edge_Node_1"),
        ("Node Control/Rebirth", "Node-20Control.Rebirth"),
        ("Line-3", "Line-2D3"),
        ("a.b", "a-2Eb"),
        ("Zürich", "Z-C3-BCrich"),
        ("_hidden", "0-_hidden"),
        ("-x", "0--2Dx"),
        ("/root", "0-.root"),
    ],
)
def test_escaping_examples(original: str, escaped: str) -> None:
    assert names.escape(original) == escaped
    assert names.unescape(escaped) == original


def test_asset_ids() -> None:
    assert names.asset_id("Plant 1", "Edge_1") == "Plant-201.Edge_1"
    assert names.asset_id("Plant 1", "Edge_1", "Pump.2") == "Plant-201.Edge_1.Pump-2E2"
    assert PLAIN.fullmatch(names.asset_id("Plant 1", "Edge_1", "Pump.2"))


def test_long_names_are_shortened_with_a_digest() -> None:
    long_a, long_b = "x" * 100, "x" * 99 + "y"
    assert len(names.escape(long_a)) == 64
    assert names.escape(long_a) != names.escape(long_b)
    assert names.escape(long_a).startswith("x" * 46 + "--")
    with pytest.raises(ValueError, match="cannot be reversed"):
        names.unescape(names.escape(long_a))


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(min_size=1, max_size=40))
def test_every_name_escapes_to_a_plain_name_and_back(text: str) -> None:
    escaped = names.escape(text)
    assert PLAIN.fullmatch(escaped)
    if len(escaped) < 64 or escaped[46:48] != "--":
        assert names.unescape(escaped) == text


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_distinct_names_stay_distinct(first: str, second: str) -> None:
    assert (names.escape(first) == names.escape(second)) == (first == second)
