"""Sparkplug B 3.0 topics: `spBv1.0/<group>/<type>/<edge node>[/<device>]` and
`spBv1.0/STATE/<host id>` (spec 4.1).

A topic that does not fit is refused (TopicError), never guessed at: wrong namespace
(tck-id-topic-structure-namespace-a), an unknown message type, an empty id, a `+` or `#` in an id
(tck-id-topic-structure-namespace-valid-group-id, -valid-edge-node-id, -valid-device-id), a device
level on a node message or none on a device message
(tck-id-topic-structure-namespace-device-id-associated-message-types, -non-associated-message-types).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

NAMESPACE = "spBv1.0"
STATE = "STATE"


class MessageType(StrEnum):
    NBIRTH = "NBIRTH"
    NDEATH = "NDEATH"
    NDATA = "NDATA"
    NCMD = "NCMD"
    DBIRTH = "DBIRTH"
    DDEATH = "DDEATH"
    DDATA = "DDATA"
    DCMD = "DCMD"

    @property
    def device_level(self) -> bool:
        """Whether the topic names a device (D* messages)."""
        return self.value.startswith("D")


class TopicError(ValueError):
    """A topic that is not a Sparkplug B topic."""


@dataclass(frozen=True, slots=True)
class EdgeTopic:
    """A message from or to an edge node (device None) or one of its devices."""

    group: str
    kind: MessageType
    node: str
    device: str | None = None

    @property
    def node_key(self) -> tuple[str, str]:
        return (self.group, self.node)

    def __str__(self) -> str:
        tail = "" if self.device is None else f"/{self.device}"
        return f"{NAMESPACE}/{self.group}/{self.kind}/{self.node}{tail}"


@dataclass(frozen=True, slots=True)
class StateTopic:
    """A host application's STATE topic."""

    host_id: str

    def __str__(self) -> str:
        return f"{NAMESPACE}/{STATE}/{self.host_id}"


def _check_id(what: str, value: str) -> str:
    if not value:
        raise TopicError(f"empty {what}")
    if "+" in value or "#" in value:
        raise TopicError(f"{what} {value!r} holds a reserved character (+ or #)")
    return value


# Topics recur with every message of a node; refusals are not cached (lru_cache keeps no raise).
@lru_cache(maxsize=65_536)
def parse(topic: str) -> EdgeTopic | StateTopic:
    """The parts of a Sparkplug B topic; TopicError when it is not one."""
    levels = topic.split("/")
    if levels[0] != NAMESPACE:
        raise TopicError(f"namespace {levels[0]!r} is not {NAMESPACE}")
    if len(levels) == 3 and levels[1] == STATE:
        return StateTopic(_check_id("host id", levels[2]))
    if len(levels) not in (4, 5):
        raise TopicError(f"{len(levels)} levels; a Sparkplug topic has 4 or 5")
    try:
        kind = MessageType(levels[2])
    except ValueError:
        raise TopicError(f"unknown message type {levels[2]!r}") from None
    if kind.device_level != (len(levels) == 5):
        needs = "needs a" if kind.device_level else "takes no"
        raise TopicError(f"{kind} {needs} device id")
    group = _check_id("group id", levels[1])
    node = _check_id("edge node id", levels[3])
    device = _check_id("device id", levels[4]) if len(levels) == 5 else None
    return EdgeTopic(group, kind, node, device)


def subscriptions(groups: list[str], host_id: str) -> list[str]:
    """The filters a host subscribes to: its own STATE topic (tck-id-host-topic-phid-birth-sub-
    required) and, per group filter, `spBv1.0/<group>/#`. The group filter `#` is every group:
    `spBv1.0/#` alone, which covers the STATE topic too (an overlapping second filter would have
    some brokers deliver every STATE message twice)."""
    if "#" in groups:
        return [f"{NAMESPACE}/#"]
    return [str(StateTopic(host_id)), *(f"{NAMESPACE}/{group}/#" for group in groups)]
