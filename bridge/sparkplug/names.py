"""Sparkplug identifiers and metric names as iotbridge asset ids and value names.

Sparkplug group, edge node and device ids may hold any UTF-8 but `+`, `/` and `#`
(tck-id-topic-structure-namespace-valid-group-id, -valid-edge-node-id, -valid-device-id), and
metric names any UTF-8 at all, with `/` as a folder separator by convention ("Node Control/Rebirth").
An asset id and a value name must be plain names (`config.sections.NAME_PATTERN`: a letter or
digit, then up to 63 of letters, digits, `_`, `.`, `-`), because they become Redis fields, dedup
keys and detector rule names. The mapping, one for both:

- letters, digits and `_` stay as they are;
- `/` becomes `.` (the asset `<group>/<node>[/<device>]` reads `<group>.<node>[.<device>]`);
- every other character becomes `-` and two upper-case hex digits per UTF-8 byte: a space `-20`,
  `-` itself `-2D`, `.` `-2E` (so `Motor 1/Speed` reads `Motor-201.Speed`);
- a result that would not start with a letter or digit is prefixed with `0-` (never otherwise
  followed by `-`, `_` or `.`);
- a result longer than 64 characters keeps its first 46 and ends in `--` and 16 hex digits of the
  SHA-256 of the original (`--` appears nowhere else but right after that `0` prefix).

Up to the length cut the mapping is reversible (`unescape`), so two names never share a field.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

MAX_CHARS = 64
_HEAD = MAX_CHARS - 18  # room for "--" and 16 hex digits
_KEPT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_PREFIX = "0-"
_ESCAPE = re.compile(r"(?:-[0-9A-F]{2})+")


def _escape_char(char: str) -> str:
    if char in _KEPT:
        return char
    if char == "/":
        return "."
    return "".join(f"-{byte:02X}" for byte in char.encode())


@lru_cache(maxsize=65_536)
def escape(text: str) -> str:
    """`text` as a plain name (see the module docstring); ValueError for an empty text."""
    if not text:
        raise ValueError("an empty name has no escaped form")
    escaped = "".join(_escape_char(char) for char in text)
    if escaped[0] not in _ALNUM:
        escaped = _PREFIX + escaped
    if len(escaped) > MAX_CHARS:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        escaped = f"{escaped[:_HEAD]}--{digest}"
    return escaped


def unescape(name: str) -> str:
    """The original of an escaped name; ValueError for a shortened (hashed) one."""
    if len(name) == MAX_CHARS and name[_HEAD : _HEAD + 2] == "--":
        raise ValueError("a shortened name cannot be reversed")
    if name.startswith(_PREFIX) and len(name) > 2 and name[2] in "-_.":
        name = name[2:]
    parts: list[str] = []
    position = 0
    for match in _ESCAPE.finditer(name):
        parts.append(name[position : match.start()].replace(".", "/"))
        parts.append(bytes.fromhex(match.group().replace("-", "")).decode())
        position = match.end()
    parts.append(name[position:].replace(".", "/"))
    return "".join(parts)


def asset_id(group: str, node: str, device: str | None = None) -> str:
    """The asset of an edge node (`<group>/<node>`) or device (`<group>/<node>/<device>`). The
    ids come from topic levels, so none holds a `/`: the path is unambiguous."""
    path = f"{group}/{node}" if device is None else f"{group}/{node}/{device}"
    return escape(path)


def value_name(metric: str) -> str:
    """The value name of a metric (the entry field is `v.<value name>` or `s.<value name>`)."""
    return escape(metric)
