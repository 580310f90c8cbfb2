"""The route table: topic templates -> routes, and the MQTT subscriptions derived from it.

`plant/{site}/{line}/{asset}/telemetry` subscribes as `plant/+/+/+/telemetry`; a match yields the
named levels. A level that is not a plain name (the allowlist `NAME_PATTERN`) does not match, so no
Redis field, key or metric label is ever built from an arbitrary topic level.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from config.settings import NAME_PATTERN, RouteSettings

_LEVEL_OK = re.compile(NAME_PATTERN)
_NAMED = re.compile(r"^\{([a-z_][a-z0-9_]*)\}$")


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled route: its settings, the subscription filter, and how to read a topic."""

    settings: RouteSettings
    filter: str
    # Per level: a literal to compare, or the name of the level to capture (None for literals).
    literals: tuple[str | None, ...]
    names: tuple[str | None, ...]
    tail: bool  # the template ends in #

    @property
    def name(self) -> str:
        return self.settings.name

    @classmethod
    def compile(cls, settings: RouteSettings) -> Route:
        levels = settings.topic.split("/")
        tail = levels[-1] == "#"
        if tail:
            levels = levels[:-1]
        literals: list[str | None] = []
        names: list[str | None] = []
        for level in levels:
            named = _NAMED.match(level)
            literals.append(None if named else level)
            names.append(named.group(1) if named else None)
        filter_ = "/".join("+" if n else lvl for lvl, n in zip(levels, names, strict=True))
        return cls(settings, filter_ + ("/#" if tail else ""), tuple(literals), tuple(names), tail)

    def match(self, levels: list[str]) -> dict[str, str] | None:
        """The named levels of a topic split on `/`, or None when it does not fit."""
        if len(levels) < len(self.literals) or (len(levels) > len(self.literals) and not self.tail):
            return None
        captured: dict[str, str] = {}
        for level, literal, name in zip(levels, self.literals, self.names, strict=False):
            if name is None:
                if level != literal:
                    return None
            elif _LEVEL_OK.match(level):
                captured[name] = level
            else:
                return None
        return captured


class RouteTable:
    """Ordered routes; the first that matches a topic wins."""

    def __init__(self, routes: list[RouteSettings]) -> None:
        self.routes = tuple(Route.compile(r) for r in routes)
        self._match = lru_cache(maxsize=200_000)(self._match_uncached)

    def subscriptions(self, shared_group: str | None = None) -> list[tuple[str, int]]:
        """(filter, qos) per route, as `$share/<group>/<filter>` when a shared group is set."""
        prefix = f"$share/{shared_group}/" if shared_group else ""
        return [(prefix + r.filter, r.settings.qos) for r in self.routes]

    def match(self, topic: str) -> tuple[Route, dict[str, str]] | None:
        """The route of a topic and its named levels, or None (dead-lettered with reason topic)."""
        return self._match(topic)

    def _match_uncached(self, topic: str) -> tuple[Route, dict[str, str]] | None:
        levels = topic.split("/")
        for route in self.routes:
            captured = route.match(levels)
            if captured is not None:
                return route, captured
        return None
