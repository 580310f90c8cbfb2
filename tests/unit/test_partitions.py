"""Session partitions in the settings: topic filters as sets (overlap, inclusion, intersection),
and check-config refusing overlapping partitions and naming route topics no partition takes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.partitions import PartitionedSource, partition_subscriptions
from bridge.routing import RouteTable
from config import loader
from config.errors import ConfigError
from config.settings import RouteSettings
from config.topic_filters import includes, intersect
from observability.metrics import BridgeMetrics

ROUTE = "plant/+/+/+/telemetry"


@pytest.mark.parametrize(
    ("a", "b", "common"),
    [
        ("plant/s0/#", ROUTE, "plant/s0/+/+/telemetry"),
        ("plant/+/l1/#", "plant/s0/#", "plant/s0/l1/#"),
        ("plant/s0/#", "plant/s1/#", None),
        ("a/#", "a", "a"),  # a/# matches its parent level (MQTT 5.0, 4.7.1.2)
        ("a/+", "a", None),
        ("a/+/c", "a/b/+", "a/b/c"),
        ("#", ROUTE, ROUTE),
        ("plant/s0/l1/x/telemetry/extra", ROUTE, None),
    ],
)
def test_intersection_is_the_filter_of_the_topics_both_match(
    a: str, b: str, common: str | None
) -> None:
    assert intersect(a, b) == common
    assert intersect(b, a) == common


@pytest.mark.parametrize(
    ("outer", "inner", "included"),
    [
        ("plant/#", ROUTE, True),
        ("plant/+/+/+/+", ROUTE, True),
        (ROUTE, "plant/s0/l1/a1/telemetry", True),
        ("plant/s0/#", ROUTE, False),
        (ROUTE, "plant/#", False),
        ("a/#", "a", True),
        ("a/+", "a/#", False),
    ],
)
def test_inclusion(outer: str, inner: str, included: bool) -> None:
    assert includes(outer, inner) is included


def _problems(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        loader.parse(text)
    return {p.path: p.message for p in caught.value.problems}


def _yaml(*partitions: str, coverage: str = "complete") -> str:
    lines = "".join(f"    - {p}\n" for p in partitions)
    return f"bridge:\n  partition_coverage: {coverage}\n  partitions:\n{lines}"


def test_overlapping_partitions_are_refused_with_the_topics_both_take() -> None:
    problems = _problems(
        _yaml(
            '{name: s0, filters: ["plant/s0/#"]}',
            '{name: l1, filters: ["plant/+/l1/#"]}',
            coverage="declared",
        )
    )
    assert problems == {
        "bridge.partitions": "partitions 's0' and 'l1' overlap: 'plant/s0/#' and 'plant/+/l1/#' "
        "both take 'plant/s0/l1/#'"
    }


def test_route_topics_no_partition_takes_are_named() -> None:
    problems = _problems(
        _yaml('{name: s0, filters: ["plant/s0/#"]}', '{name: s1, filters: ["plant/s1/#"]}')
    )
    assert problems == {
        "bridge.partitions": "route 'telemetry' topics plant/+/+/+/telemetry beyond "
        "plant/s0/+/+/telemetry, plant/s1/+/+/telemetry: taken by no partition; add one, or set "
        "bridge.partition_coverage: declared"
    }


def test_declared_coverage_accepts_partitions_of_the_known_sites() -> None:
    settings = loader.parse(
        _yaml(
            '{name: s0, filters: ["plant/s0/#"]}',
            '{name: s1, filters: ["plant/s1/#"]}',
            coverage="declared",
        )
    )
    assert [p.name for p in settings.bridge.partitions] == ["s0", "s1"]


def test_a_partition_covering_every_route_needs_no_declaration() -> None:
    settings = loader.parse(_yaml('{name: all, filters: ["plant/#"]}'))
    assert settings.bridge.partitions[0].filters == ["plant/#"]


@pytest.mark.parametrize(
    ("partition", "message"),
    [
        ('{name: x, filters: ["other/#"]}', "partition 'x': filter 'other/#' takes no topic"),
        ('{name: x, filters: ["$share/g/plant/#"]}', "a $ topic"),
        ('{name: x, filters: ["plant/#/l1"]}', "# is only allowed as the last level"),
        ('{name: x, filters: ["plant/s+/#"]}', "a wildcard must be the whole level"),
        ('{name: "a b", filters: ["plant/#"]}', "should match pattern"),
    ],
)
def test_bad_partitions_are_named(partition: str, message: str) -> None:
    problems = _problems(_yaml(partition, coverage="declared"))
    assert any(message in text for text in problems.values()), problems
    assert all(path.startswith("bridge.partitions") for path in problems), problems


def test_partitions_and_a_shared_group_exclude_each_other() -> None:
    problems = _problems(_yaml('{name: all, filters: ["plant/#"]}') + "  shared_group: g\n")
    assert "exclude each other" in problems["bridge"]


def test_duplicate_partition_names_are_refused() -> None:
    problems = _problems(
        _yaml(
            '{name: s0, filters: ["plant/s0/#"]}',
            '{name: s0, filters: ["plant/s1/#"]}',
            coverage="declared",
        )
    )
    assert "partition name 's0' is used twice" in problems["bridge.partitions"]


def test_a_partition_subscribes_to_its_filters_narrowed_to_each_route() -> None:
    routes = RouteTable(
        [
            RouteSettings(name="telemetry", topic="plant/{site}/{line}/{asset}/telemetry"),
            RouteSettings(name="events", topic="plant/{site}/{line}/{asset}/events", qos=0),
        ]
    )
    assert partition_subscriptions(["plant/s0/#"], routes) == [
        ("plant/s0/+/+/events", 0),
        ("plant/s0/+/+/telemetry", 1),
    ]


def test_check_config_exits_non_zero_naming_the_yaml_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        _yaml('{name: s0, filters: ["plant/s0/#"]}', '{name: s1, filters: ["plant/+/l1/#"]}')
    )
    result = subprocess.run([sys.executable, "-m", "bridge.cli", "check-config", str(bad)],
                            capture_output=True, check=False, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 1
    assert f"{bad}: bridge.partitions: partitions 's0' and 's1' overlap" in result.stderr
    assert "route 'telemetry' topics plant/+/+/+/telemetry beyond" in result.stderr


@pytest.mark.parametrize(
    ("bridges", "shares"), [(1, [4]), (2, [2, 2]), (3, [2, 1, 1]), (5, [1, 1, 1, 1, 0])]
)
def test_each_bridge_of_a_fleet_takes_a_fair_share_of_the_partitions(
    bridges: int, shares: list[int]
) -> None:
    settings = loader.parse(
        _yaml(
            *(f'{{name: s{k}, filters: ["plant/s{k}/#"]}}' for k in range(4)), coverage="declared"
        )
    )
    fleet = [
        PartitionedSource(
            settings,
            RouteTable(settings.bridge.routes),
            lambda _m: None,
            BridgeMetrics(CollectorRegistry()),
        )
        for _ in range(bridges)
    ]
    members = [source.owner for source in fleet]
    assert sorted((source._share(members) for source in fleet), reverse=True) == shares
