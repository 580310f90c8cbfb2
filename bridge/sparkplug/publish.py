"""What a Sparkplug host publishes: rebirth requests and its own STATE.

Rebirth request: NCMD to `spBv1.0/<group>/NCMD/<node>` with the metric `Node Control/Rebirth`,
Boolean true, named rather than aliased (tck-id-operational-behavior-data-commands-ncmd-rebirth-verb,
-ncmd-rebirth-name, -ncmd-rebirth-value; tck-id-operational-behavior-data-commands-rebirth-name-
aliases keeps the metric out of the alias table). QoS 0, not retained (tck-id-topics-ncmd-mqtt).

Host STATE on `spBv1.0/STATE/<host id>`, JSON `{"online": <bool>, "timestamp": <ms UTC>}`, QoS 1,
retained: the Will carries online false and the time of the CONNECT
(tck-id-host-topic-phid-death-payload, tck-id-host-topic-phid-death-payload-timestamp-connect,
tck-id-host-topic-phid-death-qos, -death-retain); the birth after it online true with the same
timestamp (tck-id-host-topic-phid-birth-payload, tck-id-host-topic-phid-birth-payload-timestamp,
-birth-qos, -birth-retain); a clean stop publishes online false at the time of the stop before
DISCONNECT (tck-id-host-topic-phid-death-payload-timestamp-disconnect-clean). An offline STATE for
its own id reaching the host after its birth is answered with the birth again
(tck-id-message-flow-hid-sparkplug-state-message-delivered).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bridge.sparkplug.payload import DataType, OutMetric, encode
from bridge.sparkplug.topic import EdgeTopic, MessageType, StateTopic

REBIRTH_METRIC = "Node Control/Rebirth"


@dataclass(frozen=True, slots=True)
class Publication:
    """One MQTT publish (or Will) for the wiring to send as it is."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


def rebirth_request(group: str, node: str, now_ms: int) -> Publication:
    topic = EdgeTopic(group, MessageType.NCMD, node)
    metric = OutMetric(REBIRTH_METRIC, DataType.BOOLEAN, True, timestamp_ms=now_ms)
    # NCMD carries no seq: the sequence is the edge node's (tck-id-payloads-ncmd-seq).
    return Publication(str(topic), encode(now_ms, None, [metric]), qos=0, retain=False)


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    return json.dumps({"online": online, "timestamp": timestamp_ms}).encode()


def state_will(host_id: str, connect_ms: int) -> Publication:
    """The Will of the host's CONNECT: offline at the time of the CONNECT."""
    return Publication(str(StateTopic(host_id)), state_payload(False, connect_ms), 1, True)


def state_birth(host_id: str, connect_ms: int) -> Publication:
    """Published once subscribed: online, with the Will's timestamp."""
    return Publication(str(StateTopic(host_id)), state_payload(True, connect_ms), 1, True)


def state_death(host_id: str, now_ms: int) -> Publication:
    """Published on a clean stop, before DISCONNECT: offline at the time of the stop."""
    return Publication(str(StateTopic(host_id)), state_payload(False, now_ms), 1, True)


def parse_state(payload: bytes) -> tuple[bool, int] | None:
    """(online, timestamp) of a STATE payload; None when it is not one."""
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    online, timestamp = document.get("online"), document.get("timestamp")
    if (
        not isinstance(online, bool)
        or isinstance(timestamp, bool)
        or not isinstance(timestamp, int)
    ):
        return None
    return online, timestamp


def answer_state(host_id: str, payload: bytes, connect_ms: int) -> Publication | None:
    """The answer to a STATE message on the host's own id while it is online: its birth again when
    the message says offline (a Will or a death of an earlier session), else nothing."""
    state = parse_state(payload)
    if state is None or state[0]:
        return None
    return state_birth(host_id, connect_ms)
