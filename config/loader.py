"""Read a settings file: YAML, `${VAR}` from the environment, then the model.

Every problem is reported with its YAML path (`bridge.batch.max_size: must be > 0`), all at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.errors import ConfigError, ConfigProblem
from config.settings import Settings
from config.topic_filters import route_filter, uncovered

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Pydantic error types -> the short wording a plant engineer reads in check-config.
_COMPARISONS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
                "less_than_equal": "<="}  # fmt: skip


def default_settings_path() -> Path:
    """The shipped `config/settings.yaml`."""
    return Path(__file__).with_name("settings.yaml")


def format_path(loc: tuple[int | str, ...]) -> str:
    """`("bridge", "routes", 0, "name")` -> `bridge.routes[0].name`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind in _COMPARISONS:
        bound = next(iter(ctx.values()))
        return f"must be {_COMPARISONS[kind]} {bound}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def problems_from(exc: ValidationError) -> list[ConfigProblem]:
    return [ConfigProblem(format_path(tuple(e["loc"])), _describe(e)) for e in exc.errors()]


def _substitute(node: Any, path: tuple[int | str, ...], problems: list[ConfigProblem]) -> Any:
    if isinstance(node, dict):
        return {key: _substitute(value, (*path, key), problems) for key, value in node.items()}
    if isinstance(node, list):
        return [_substitute(value, (*path, i), problems) for i, value in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name, default)
        if value is None:
            problems.append(
                ConfigProblem(format_path(path), f"environment variable {name} is not set")
            )
            return ""
        return value

    replaced = _VAR.sub(replace, node)
    # A whole-value substitution is re-read as YAML so `${PORT}` can fill an integer field.
    if _VAR.fullmatch(node):
        try:
            return yaml.safe_load(replaced) if replaced else replaced
        except yaml.YAMLError:
            return replaced
    return replaced


def parse(text: str, source: str = "<string>") -> Settings:
    """Validate settings from YAML text; raise ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", f"not valid YAML: {exc}")], source) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", "the top level must be a mapping")], source)
    problems: list[ConfigProblem] = []
    data = _substitute(raw, (), problems)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        # A value left empty by a missing variable is reported once, as the missing variable.
        unset = {p.path for p in problems}
        problems.extend(p for p in problems_from(exc) if p.path not in unset)
        raise ConfigError(problems, source) from exc
    if problems:
        raise ConfigError(problems, source)
    return settings


def load(path: str | Path | None = None) -> Settings:
    """Load a settings file (default: the shipped one) with environment overrides."""
    file = Path(path) if path is not None else default_settings_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read: {exc.strerror}")], str(file)) from exc
    return parse(text, str(file))


def summary(settings: Settings) -> str:
    """One line that says what a valid file configures, with no secret in it."""
    routes = ", ".join(f"{r.name}={r.topic}" for r in settings.bridge.routes)
    return (
        f"ok: mqtt {settings.mqtt.host}:{settings.mqtt.port} (MQTT {settings.mqtt.protocol}), "
        f"redis {settings.redis.url.split('@')[-1]}, {len(settings.bridge.routes)} route(s) [{routes}], "
        f"{len(settings.worker.detectors.threshold)} threshold rule(s)"
    ) + _partitions_summary(settings)


def _partitions_summary(settings: Settings) -> str:
    bridge = settings.bridge
    if not bridge.partitions:
        return ""
    names = ", ".join(p.name for p in bridge.partitions)
    line = f", {len(bridge.partitions)} partition(s) [{names}]"
    if bridge.partition_coverage == "declared":
        rest = uncovered(
            [(p.name, p.filters) for p in bridge.partitions],
            [(r.name, route_filter(r.topic)) for r in bridge.routes],
        )
        if rest:
            line += "; not subscribed (coverage: declared): " + "; ".join(rest)
    return line
