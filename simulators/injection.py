"""Injections applied to an asset's messages, and the ground truth they leave.

An event applies to message k of its asset when the message's nominal time (its place in the
schedule, not the wall clock) falls in the event's window, so the same seed injects into the same
messages on every run. A one-message fault (restart, duplicate, ...) applies to the first message
at or after its time. Ground truth is one JSON object per event, written when the event is over:
kind, asset, value, the device times and seqs of the first and last message it changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simulators.fleet import Fleet, asset_id
from simulators.scenario import BAD_FAULTS, OUT_OF_RANGE, Event

WINDOWED = frozenset({"spike", "drift", "stuck", "dropout", "out_of_range", "clock_skew"})
# A restarted device's first message is stamped this much after the tick's time, so it is newer
# than its last message even when both went out in one pass (the bridge needs a newer ts to
# recognise a restart, the audit to tell the epochs apart).
RESTART_STEP_S = 0.001
TS_STEP_S = 0.000001


@dataclass(slots=True)
class EventState:
    event: Event
    messages: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    frozen: float | None = None
    done: bool = False

    def touch(self, ts: float, seq: int) -> None:
        if self.first_ts is None:
            self.first_ts, self.first_seq = ts, seq
        self.last_ts, self.last_seq = ts, seq
        self.messages += 1


@dataclass(slots=True)
class Message:
    """What the injector decided for one scheduled message."""

    ts: float
    epoch: int
    seq: int
    silenced: bool = False
    bad: bool = False  # a skewed clock: never audited
    restarted: bool = False
    duplicate: bool = False
    hold: bool = False  # send after the asset's next message (out of order)
    extras: list[str] = field(default_factory=list)  # malformed, wrong_type, oversized


class Injector:
    """The planned events of one process's assets, and each asset's restart state."""

    def __init__(self, fleet: Fleet, events: list[Event], truth: Callable[[dict[str, Any]], None]):
        self._fleet = fleet
        self._truth = truth
        self.by_asset: dict[int, list[EventState]] = {}
        for event in events:
            local = event.index - fleet.first
            if 0 <= local < fleet.count:
                self.by_asset.setdefault(local, []).append(EventState(event))
        self.windows = [s for states in self.by_asset.values() for s in states
                        if s.event.kind in WINDOWED]  # fmt: skip
        # local -> [epoch, schedule number of seq 0, last ts]: assets that restarted.
        self.restarts: dict[int, list[float]] = {}
        self.counts: dict[str, int] = {}  # anomalies started, by kind

    def restart_state(self, local: int, k: int, ts: float) -> tuple[int, int, float]:
        state = self.restarts.get(local)
        if state is None:
            return 0, k, ts
        ts = max(ts, state[2] + TS_STEP_S)
        state[2] = ts
        return int(state[0]), k - int(state[1]), ts

    def apply(self, local: int, k: int, ts: float, values: list[float]) -> Message:
        """Change `values` in place for the events active at message k; say how to send it."""
        nominal = self._fleet.nominal_s(local, k)
        epoch, seq, ts = self.restart_state(local, k, ts)
        message = Message(ts, epoch, seq)
        for state in self.by_asset[local]:
            event = state.event
            if event.kind in WINDOWED:
                if event.start_s <= nominal < event.end_s:
                    self._windowed(state, message, values, nominal)
            elif not state.done and nominal >= event.start_s:
                self._point(state, local, k, message)
        return message

    def _windowed(self, state: EventState, message: Message, values: list[float], t: float) -> None:
        event, v = state.event, state.event.value
        if state.first_ts is None and event.category == "anomaly":
            self.counts[event.kind] = self.counts.get(event.kind, 0) + 1
        state.touch(message.ts, message.seq)
        kind = event.kind
        if kind == "dropout":
            message.silenced = True
        elif kind == "clock_skew":
            message.ts += event.skew_s
            message.bad = True
        elif v is None:
            return
        elif kind == "spike":
            values[v] += event.magnitude
        elif kind == "drift":
            values[v] += event.magnitude * (t - event.start_s) / (event.end_s - event.start_s)
        elif kind == "out_of_range":
            values[v] = event.magnitude
        elif kind == "stuck":
            if state.frozen is None:
                state.frozen = values[v]
            values[v] = state.frozen

    def _point(self, state: EventState, local: int, k: int, message: Message) -> None:
        kind = state.event.kind
        state.done = True
        if kind == "restart":
            previous = self.restarts.get(local, [0, 0, 0.0])
            message.epoch, message.seq = int(previous[0]) + 1, 0
            message.ts += RESTART_STEP_S
            self.restarts[local] = [message.epoch, k, message.ts]
            message.restarted = True
        elif kind == "duplicate":
            message.duplicate = True
        elif kind == "out_of_order":
            message.hold = True
        else:
            message.extras.append(kind)
        state.touch(message.ts, message.seq)
        self._emit(state)

    def random_anomaly(self, local: int, k: int, ts: float, seq: int, value: int) -> float:
        """The value of a one-sample anomaly (`anomaly_rate`), and its ground truth."""
        model = self._fleet.asset_class(local).values[value]
        reading = OUT_OF_RANGE.get(model.name, model.normal[1] + 20 * model.noise)
        self.counts["spike"] = self.counts.get("spike", 0) + 1
        nominal = self._fleet.nominal_s(local, k)
        event = Event(-1, "anomaly", "spike", self._fleet.first + local, nominal, nominal, value,
                      reading)  # fmt: skip
        state = EventState(event)
        state.touch(ts, seq)
        self._emit(state, one_sample=True)
        return reading

    def finish(self, elapsed_s: float, final: bool = False) -> None:
        """Write the ground truth of windows that are over (all of them when `final`)."""
        margin = self._fleet.interval_s * (1 + self._fleet.jitter)
        for state in self.windows:
            if not state.done and (final or elapsed_s >= state.event.end_s + margin):
                state.done = True
                self._emit(state, truncated=final and elapsed_s < state.event.end_s)
        if final:
            for states in self.by_asset.values():
                for state in states:
                    if not state.done:  # a one-message fault whose time never came
                        state.done = True
                        self._emit(state, truncated=True)

    def _emit(
        self, state: EventState, *, truncated: bool = False, one_sample: bool = False
    ) -> None:
        event = state.event
        local = event.index - self._fleet.first
        asset_class = self._fleet.asset_class(local)
        record: dict[str, Any] = {
            "category": event.category,
            "kind": event.kind,
            "asset": asset_id(event.index),
            "class": asset_class.name,
            "value": asset_class.values[event.value].name if event.value is not None else None,
            "start": state.first_ts,
            "end": state.last_ts,
            "start_seq": state.first_seq,
            "end_seq": state.last_seq,
            "messages": state.messages,
            "planned_start_s": round(event.start_s, 3),
            "planned_end_s": round(event.end_s, 3),
        }
        if event.category == "anomaly" and event.kind != "dropout":
            record["magnitude"] = event.magnitude
        if event.kind == "clock_skew":
            record["skew_s"] = event.skew_s
        if event.kind in BAD_FAULTS:
            record["expected"] = "dead letter" if event.kind != "clock_skew" else "clock window"
        if one_sample:
            record["one_sample"] = True
        if truncated:
            record["truncated"] = True
        self._truth(record)


def bad_payload(kind: str, payload: bytes, ts: float, seq: int, max_payload: int) -> bytes:
    """The extra message of a bad-message fault, made from the message it rides along with."""
    if kind == "malformed":
        return payload[: len(payload) // 2]  # cut mid-object: not JSON
    if kind == "wrong_type":
        return b'{"ts":%.6f,"seq":"%d","values":{"temperature":"hot"}}' % (ts, seq)
    pad = max_payload + 1024 - len(payload)  # oversized: past bridge.max_payload_bytes
    return payload[:-1] + b',"blob":"' + b"x" * max(pad, 1) + b'"}'
