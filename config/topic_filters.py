"""MQTT topic filters as sets of topics: overlap, inclusion, intersection; and the partition rules
checked against the route table (no topic in two partitions, no route topic in none).

A filter is a set of topics (MQTT 5.0, 4.7): `+` is any one level, a final `#` any number of
levels, none included (`a/#` matches `a`). Two filters overlap when one topic matches both; a
filter includes another when every topic of the other matches it. The intersection of two filters
is again a filter (or empty), which is what a partition's session subscribes to: its filters
narrowed to each route, so it receives no topic the route table does not take.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NAMED = re.compile(r"^\{[a-z_][a-z0-9_]*\}$")


def filter_problem(topic_filter: str) -> str | None:
    """Why a string is not a topic filter a partition may use (None: it is one)."""
    if not topic_filter or topic_filter.startswith("$"):
        return "empty, or a $ topic (shared and system topics are not partitions)"
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if level == "#" and index != len(levels) - 1:
            return "# is only allowed as the last level"
        if level not in ("+", "#") and ("+" in level or "#" in level):
            return f"level {level!r}: a wildcard must be the whole level"
    return None


def route_filter(template: str) -> str:
    """The subscription filter of a route's topic template: `{name}` levels become `+`."""
    return "/".join("+" if _NAMED.match(level) else level for level in template.split("/"))


def intersect(a: str, b: str) -> str | None:
    """The filter of the topics both match, or None when they share none."""
    x, y = a.split("/"), b.split("/")
    out: list[str] = []
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "#":
            return "/".join(out + y[i:]) if q is not None else "/".join(out)
        if q == "#":
            return "/".join(out + x[i:]) if p is not None else "/".join(out)
        if p is None or q is None:
            return None  # one is longer, with no # to absorb the extra levels
        if p == "+":
            out.append(q)
        elif q in ("+", p):
            out.append(p)
        else:
            return None
    return "/".join(out)


def includes(outer: str, inner: str) -> bool:
    """Every topic that matches `inner` matches `outer`."""
    x, y = outer.split("/"), inner.split("/")
    for i, p in enumerate(x):
        if p == "#":
            return True
        if i >= len(y):
            return False
        q = y[i]
        if q == "#" or (p != "+" and (q == "+" or p != q)):
            return False
    return len(x) == len(y)


def partition_problems(
    partitions: Sequence[tuple[str, Sequence[str]]],
    routes: Sequence[tuple[str, str]],
    *,
    complete: bool,
) -> list[str]:
    """What is wrong with partitions `(name, filters)` over routes `(name, filter)`: a duplicate
    name, two partitions that can both receive a topic, a filter no route takes, and (when
    `complete`) a route's topics that no partition takes."""
    problems: list[str] = []
    names = [name for name, _ in partitions]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"partition name {name!r} is used twice")
    for i, (name, filters) in enumerate(partitions):
        for other, other_filters in partitions[i + 1 :]:
            for f in filters:
                for g in other_filters:
                    common = intersect(f, g)
                    if common is not None:
                        problems.append(
                            f"partitions {name!r} and {other!r} overlap: {f!r} and {g!r} both "
                            f"take {common!r}"
                        )
        for f in filters:
            if not any(intersect(f, rf) is not None for _, rf in routes):
                problems.append(f"partition {name!r}: filter {f!r} takes no topic of any route")
    if complete:
        problems.extend(
            f"{rest}: taken by no partition; add one, or set bridge.partition_coverage: declared"
            for rest in uncovered(partitions, routes)
        )
    return problems


def uncovered(
    partitions: Sequence[tuple[str, Sequence[str]]], routes: Sequence[tuple[str, str]]
) -> list[str]:
    """The topics of each route that no single partition filter includes, named as the route
    beyond what the partitions take of it. (A route split between filters counts as uncovered:
    topic levels are open sets, so a union of literals never covers a `+`.)"""
    out: list[str] = []
    filters = [f for _, fs in partitions for f in fs]
    for route, rf in routes:
        if any(includes(f, rf) for f in filters):
            continue
        taken = [c for c in (intersect(f, rf) for f in filters) if c is not None]
        beyond = f" beyond {', '.join(taken)}" if taken else ""
        out.append(f"route {route!r} topics {rf}{beyond}")
    return out
