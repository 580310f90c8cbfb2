"""The host application's view of every edge node: births, aliases, sequence, deaths.

`Host.handle(topic, payload, now)` takes one received message and returns an `Outcome`: the
telemetry entries to write, online/offline events, commands to publish (rebirth requests) and
refusals. `Host.expire(now)` runs the reorder timers. `now` is the host's wall clock in epoch
seconds, passed in and never read here, so the timers are tested without waiting.

Per edge node (group, node), one session from NBIRTH on:
- NBIRTH/DBIRTH hold the metric tables, name, alias and datatype
  (tck-id-payloads-alias-birth-requirement, tck-id-payloads-metric-datatype-req), with aliases
  unique (tck-id-payloads-alias-uniqueness); NBIRTH must carry seq 0-255 and bdSeq
  (tck-id-payloads-nbirth-seq, tck-id-payloads-nbirth-bdseq) and restarts the sequence and the
  devices; births write their values (tck-id-operational-behavior-data-publish-nbirth-values).
- NDATA/DDATA are read by alias or name (tck-id-payloads-alias-data-cmd-requirement); DATA before
  its birth or with an alias no birth declared writes nothing for the whole message and asks for
  a rebirth, as does a seq hole not filled within the reorder timeout
  (tck-id-operational-behavior-host-reordering-rebirth; see `sequence`).
- Rebirth requests go to the node as NCMD (`publish.rebirth_request`), at most one per node per
  `rebirth_min_interval_s`, and only from the primary host.
- NDEATH with the bdSeq of the session's NBIRTH (tck-id-payloads-ndeath-bdseq,
  tck-id-topics-nbirth-bdseq-matching) marks the node and its devices offline and every metric
  stale at the host's time (tck-id-operational-behavior-edge-node-termination-host-action-ndeath-
  node-offline, -ndeath-node-tags-stale, -ndeath-devices-offline, -ndeath-devices-tags-stale); an
  NDEATH with another bdSeq belongs to an older connection and changes nothing.
- DDEATH marks its device offline and its metrics stale at the DDEATH's timestamp
  (tck-id-operational-behavior-edge-node-termination-host-action-ddeath-devices-offline,
  -ddeath-devices-tags-stale).
- is_historical values are written (flagged) but move neither the current value nor staleness;
  is_transient values move the current value but are not written (spec 6.4.6: not historized).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.record import Reason
from bridge.sparkplug import names
from bridge.sparkplug.births import (
    BD_SEQ,
    Entity,
    MetricState,
    birth_metrics,
    birth_seq,
    entity_of,
    read_bd_seq,
)
from bridge.sparkplug.payload import Metric, Payload, PayloadRefused, decode, value_of
from bridge.sparkplug.publish import (
    Publication,
    answer_state,
    rebirth_request,
    state_birth,
    state_death,
    state_will,
)
from bridge.sparkplug.records import Counters, Event, Outcome, Refusal, Sample, build_entries
from bridge.sparkplug.sequence import SEQ_MODULUS, Placement, Reorder
from bridge.sparkplug.topic import EdgeTopic, MessageType, StateTopic, TopicError, parse
from config.sparkplug_settings import SparkplugSettings

# Control metrics steer the session; they are not telemetry.
_CONTROL_PREFIXES = ("Node Control/", "Device Control/")


@dataclass(slots=True)
class Received:
    topic: EdgeTopic
    payload: Payload


@dataclass(slots=True)
class Node:
    group: str
    name: str
    reorder: Reorder[Received]
    entity: Entity | None = None  # None until the first NBIRTH
    bd_seq: int | None = None
    devices: dict[str, Entity] = field(default_factory=dict)
    last_rebirth_s: float | None = None

    @property
    def online(self) -> bool:
        return self.entity is not None and self.entity.online


class Host:
    def __init__(
        self,
        host_id: str,
        reorder_timeout_s: float,
        rebirth_min_interval_s: float,
        primary: bool = True,
        counters: Counters | None = None,
    ) -> None:
        self.host_id = host_id
        self._timeout_s = reorder_timeout_s
        self._rebirth_interval_s = rebirth_min_interval_s
        self._primary = primary
        self.counters = counters or Counters()
        self._nodes: dict[tuple[str, str], Node] = {}
        self.connect_ms: int | None = None  # the timestamp of this MQTT session's STATE

    @classmethod
    def from_settings(cls, settings: SparkplugSettings, counters: Counters | None = None) -> Host:
        return cls(
            settings.host_id,
            settings.reorder_timeout_ms / 1000,
            settings.rebirth_min_interval_s,
            settings.primary,
            counters,
        )

    def start_session(self, connect_ms: int) -> tuple[Publication, Publication]:
        """The Will to put in the next MQTT CONNECT and the STATE birth to publish once
        subscribed (tck-id-host-topic-phid-birth-sub-required: subscriptions first), both with
        the CONNECT's time."""
        self.connect_ms = connect_ms
        return state_will(self.host_id, connect_ms), state_birth(self.host_id, connect_ms)

    def stop_session(self, now_ms: int) -> Publication:
        """The STATE death to publish before a clean DISCONNECT."""
        self.connect_ms = None
        return state_death(self.host_id, now_ms)

    def node(self, group: str, name: str) -> Node:
        key = (group, name)
        if key not in self._nodes:
            self._nodes[key] = Node(group, name, Reorder(self._timeout_s))
        return self._nodes[key]

    def handle(self, topic: str, data: bytes, now: float) -> Outcome:
        """One received message."""
        out = Outcome()
        try:
            parsed = parse(topic)
        except TopicError as exc:
            out.refusals.append(Refusal(topic, Reason.TOPIC, str(exc)))
            return out
        if isinstance(parsed, StateTopic):
            self._state(parsed, data, out)
            return out
        if parsed.kind in (MessageType.NCMD, MessageType.DCMD):
            return out  # commands to edge nodes, from this or another host
        try:
            payload = decode(data)
        except PayloadRefused as exc:
            out.refusals.append(Refusal(topic, exc.reason, exc.detail))
            return out
        node = self.node(parsed.group, parsed.node)
        self._expire_node(node, now, out)
        if parsed.kind is MessageType.NBIRTH:
            self._node_birth(node, Received(parsed, payload), now, out)
        elif parsed.kind is MessageType.NDEATH:
            self._node_death(node, payload, now, out)
        else:
            self._sequenced(node, Received(parsed, payload), now, out)
            # With a timeout of 0 (reordering off) a hole is given up on at once.
            self._expire_node(node, now, out)
        return out

    def expire(self, now: float) -> Outcome:
        """Run every reorder timer: call at least every reorder timeout while nodes are held."""
        out = Outcome()
        for node in self._nodes.values():
            self._expire_node(node, now, out)
        return out

    @property
    def next_deadline(self) -> float | None:
        """When `expire` next has something to do (None: no message held)."""
        deadlines = [d for n in self._nodes.values() if (d := n.reorder.deadline) is not None]
        return min(deadlines, default=None)

    def _state(self, topic: StateTopic, data: bytes, out: Outcome) -> None:
        if topic.host_id == self.host_id and self.connect_ms is not None:
            answer = answer_state(self.host_id, data, self.connect_ms)
            if answer is not None:
                out.commands.append(answer)

    def _expire_node(self, node: Node, now: float, out: Outcome) -> None:
        expired = node.reorder.expire(now)
        if expired is None:
            return
        released, missing = expired
        out.missing += missing
        for received in released:
            self._apply(node, received, now, out)
        self._rebirth(node, now, out)

    def _flush(self, node: Node, now: float, out: Outcome) -> None:
        released, missing = node.reorder.flush()
        out.missing += missing
        for received in released:
            self._apply(node, received, now, out)

    def _rebirth(self, node: Node, now: float, out: Outcome) -> None:
        if not self._primary:
            return
        last = node.last_rebirth_s
        if last is not None and now - last < self._rebirth_interval_s:
            out.rebirths_suppressed += 1
            return
        node.last_rebirth_s = now
        out.commands.append(rebirth_request(node.group, node.name, round(now * 1000)))

    def _sequenced(self, node: Node, received: Received, now: float, out: Outcome) -> None:
        topic, seq = received.topic, received.payload.seq
        if seq is None or not 0 <= seq < SEQ_MODULUS:
            detail = "no seq" if seq is None else f"seq {seq} is not 0-255"
            out.refusals.append(Refusal(str(topic), Reason.SCHEMA, detail))
            return
        if not node.reorder.started:
            out.unknown += 1
            self._rebirth(node, now, out)  # DATA before birth
            return
        offer = node.reorder.offer(seq, received, now)
        if offer.placement in (Placement.BEHIND, Placement.DUPLICATE):
            out.unplaced += 1
            if offer.placement is Placement.BEHIND:
                self._rebirth(node, now, out)
        for message in offer.released:
            self._apply(node, message, now, out)

    def _apply(self, node: Node, received: Received, now: float, out: Outcome) -> None:
        """One message of the session, in seq order."""
        topic, payload = received.topic, received.payload
        if topic.kind is MessageType.DBIRTH:
            self._device_birth(node, received, now, out)
            return
        entity = node.entity if topic.device is None else node.devices.get(topic.device)
        if topic.kind is MessageType.DDEATH:
            if entity is not None and entity.online:
                ts = (payload.timestamp_ms or round(now * 1000)) / 1000
                stale = entity.go_offline()
                out.events.append(Event(entity.asset, False, ts, topic.kind, node.bd_seq, stale))
            return
        if entity is None or not entity.online:
            out.unknown += 1
            self._rebirth(node, now, out)
            return
        self._data(node, entity, received, now, out)

    def _data(
        self, node: Node, entity: Entity, received: Received, now: float, out: Outcome
    ) -> None:
        resolved: list[tuple[Metric, MetricState]] = []
        for metric in received.payload.metrics:
            state = self._lookup(entity, metric)
            if state is None:
                out.unknown += 1  # nothing of this message is written
                self._rebirth(node, now, out)
                return
            resolved.append((metric, state))
        self._write(node, entity, received, resolved, now, out)

    @staticmethod
    def _lookup(entity: Entity, metric: Metric) -> MetricState | None:
        if metric.alias is not None:
            return entity.by_alias.get(metric.alias)
        return entity.by_name.get(metric.name) if metric.name is not None else None

    def _write(
        self,
        node: Node,
        entity: Entity,
        received: Received,
        resolved: list[tuple[Metric, MetricState]],
        now: float,
        out: Outcome,
    ) -> None:
        """Read each value as its birth declared, update the current values, build entries."""
        topic, payload = received.topic, received.payload
        default_ms = payload.timestamp_ms if payload.timestamp_ms is not None else round(now * 1000)
        samples = []
        for metric, state in resolved:
            try:
                value = value_of(metric, state.datatype)
            except PayloadRefused as exc:
                out.refusals.append(Refusal(str(topic), exc.reason, exc.detail, state.name))
                continue
            timestamp_ms = metric.timestamp_ms if metric.timestamp_ms is not None else default_ms
            if not metric.is_historical:
                state.value, state.timestamp_ms, state.stale = value, timestamp_ms, False
            if metric.is_transient or state.name == BD_SEQ:
                continue
            if state.name.startswith(_CONTROL_PREFIXES):
                continue
            name = names.value_name(state.name)
            samples.append(Sample(name, value, timestamp_ms, metric.is_historical))
        base = {"sp.type": str(topic.kind), "sp.seq": str(payload.seq)}
        if node.bd_seq is not None:
            base["sp.bdseq"] = str(node.bd_seq)
        out.entries += build_entries(entity.asset, samples, base, self.counters)

    def _node_birth(self, node: Node, received: Received, now: float, out: Outcome) -> None:
        topic, payload = received.topic, received.payload
        try:
            seq = birth_seq(payload)
            bd_seq = read_bd_seq(payload)
            entity = entity_of(names.asset_id(topic.group, topic.node), payload)
        except PayloadRefused as exc:
            out.refusals.append(Refusal(str(topic), exc.reason, exc.detail))
            return
        if node.reorder.started:
            # What the previous session still held was sent under its tables: write it first.
            self._flush(node, now, out)
        node.reorder.start(seq)
        node.entity, node.bd_seq = entity, bd_seq
        node.devices.clear()
        ts = _seconds(payload, now)
        out.events.append(Event(entity.asset, True, ts, topic.kind, bd_seq))
        self._write(node, entity, received, birth_metrics(entity, payload), now, out)

    def _device_birth(self, node: Node, received: Received, now: float, out: Outcome) -> None:
        topic, payload = received.topic, received.payload
        if not node.online or topic.device is None:
            out.unknown += 1
            self._rebirth(node, now, out)
            return
        try:
            entity = entity_of(names.asset_id(topic.group, topic.node, topic.device), payload)
        except PayloadRefused as exc:
            out.refusals.append(Refusal(str(topic), exc.reason, exc.detail))
            self._rebirth(node, now, out)
            return
        node.devices[topic.device] = entity
        ts = _seconds(payload, now)
        out.events.append(Event(entity.asset, True, ts, topic.kind, node.bd_seq))
        self._write(node, entity, received, birth_metrics(entity, payload), now, out)

    def _node_death(self, node: Node, payload: Payload, now: float, out: Outcome) -> None:
        try:
            bd_seq = read_bd_seq(payload)
        except PayloadRefused as exc:
            topic = str(EdgeTopic(node.group, MessageType.NDEATH, node.name))
            out.refusals.append(Refusal(topic, exc.reason, exc.detail))
            return
        if node.entity is None or not node.online or bd_seq != node.bd_seq:
            return  # an earlier connection's Will: this session lives on
        self._flush(node, now, out)
        node.reorder.stop()
        entities = [node.entity, *(d for d in node.devices.values() if d.online)]
        for entity in entities:
            stale = entity.go_offline()
            out.events.append(Event(entity.asset, False, now, MessageType.NDEATH, bd_seq, stale))


def _seconds(payload: Payload, now: float) -> float:
    return payload.timestamp_ms / 1000 if payload.timestamp_ms is not None else now
