"""Scenario files (`simulators/scenarios/*.yaml`): a fleet, its rates, a duration, and what to
inject, validated by one model (unknown keys are errors, reported with their YAML path like the
settings file) and turned into a plan: every injection on a named asset at a set time, drawn from
the seed, so a scenario replays exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config.errors import ConfigError, ConfigProblem
from config.loader import problems_from
from config.settings import NAME_PATTERN, AssetClassName, SimulatorSettings
from simulators.fleet import STREAM_PLAN, asset_id, asset_index, class_of
from simulators.models import CLASS_NAMES, CLASSES, WATCHED

AnomalyKind = Literal["spike", "drift", "stuck", "dropout", "out_of_range"]
FaultKind = Literal[
    "malformed", "wrong_type", "oversized", "duplicate", "out_of_order", "restart", "clock_skew"
]
# Faults that go to the bridge's dead-letter stream (or, for clock_skew inside the bridge's clock
# window, into the stream): never counted as lost by the audit.
BAD_FAULTS = frozenset({"malformed", "wrong_type", "oversized", "clock_skew"})
AssetName = Annotated[str, Field(pattern=r"^a\d{6}$")]

# Default size of an injection, per kind and value: each well past the default detector bounds.
SPIKE = {"temperature": 40.0, "vibration": 8.0, "pressure": 4.0}
DRIFT = {"temperature": 45.0, "vibration": 7.0, "pressure": 3.5}  # total change over the window
OUT_OF_RANGE = {"temperature": 115.0, "vibration": 12.0, "pressure": 9.5}
DURATION_S = {"spike": 3.0, "drift": 120.0, "stuck": 60.0, "dropout": 90.0, "out_of_range": 20.0}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FleetSpec(_Spec):
    assets: int | None = Field(None, gt=0, le=100_000, description="Virtual assets.")
    sites: int | None = Field(None, gt=0, description="Sites the assets are spread over.")
    lines: int | None = Field(None, gt=0, description="Lines per site.")
    classes: dict[AssetClassName, Annotated[float, Field(ge=0)]] | None = Field(
        None, description="Share of the fleet per asset class."
    )
    assets_per_connection: int | None = Field(None, gt=0, description="Assets per connection.")
    protocol: Literal["json", "sparkplug"] | None = Field(
        None, description="json, or sparkplug: edge nodes (one per connection) with devices."
    )


class RatesSpec(_Spec):
    rate_hz: float | None = Field(None, gt=0, description="Messages per second per asset.")
    jitter: float | None = Field(None, ge=0, le=0.45, description="+/- fraction of the interval.")
    qos: Literal[0, 1] | None = Field(None, description="Publish QoS.")
    processes: int | None = Field(None, ge=1, le=64, description="Publishing processes.")
    connect_rate_per_s: float | None = Field(None, gt=0, description="Connections per second.")
    max_in_flight: int | None = Field(None, gt=0, description="Unacked QoS 1 per connection.")
    anomaly_rate: float | None = Field(None, ge=0, le=1, description="One-sample anomalies.")


class InjectionSpec(_Spec):
    kind: AnomalyKind = Field(description="spike, drift, stuck, dropout or out_of_range.")
    count: int = Field(1, ge=1, le=100_000, description="How many, on distinct assets if possible.")
    asset: AssetName | None = Field(None, description="The asset (count 1); default: drawn.")
    value: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        None, description="The value changed; default: one the default detectors watch."
    )
    start_s: float | None = Field(None, ge=0, description="Start after the run's start; drawn.")
    duration_s: float | None = Field(None, gt=0, description="Length; default per kind.")
    magnitude: float | None = Field(
        None, description="spike: added; drift: total change; out_of_range: the value itself."
    )

    @model_validator(mode="after")
    def _asset_once(self) -> InjectionSpec:
        if self.asset is not None and self.count != 1:
            raise ValueError("asset names one asset: count must be 1")
        if self.kind == "dropout" and self.value is not None:
            raise ValueError("a dropout silences the whole asset: no value")
        return self


class FaultSpec(_Spec):
    kind: FaultKind = Field(description="The fault (README, Fleet simulator, lists each).")
    count: int = Field(1, ge=1, le=100_000, description="How many, on distinct assets if possible.")
    asset: AssetName | None = Field(None, description="The asset (count 1); default: drawn.")
    at_s: float | None = Field(None, ge=0, description="When, after the run's start; drawn.")
    duration_s: float = Field(10.0, gt=0, description="clock_skew: how long the clock is off.")
    skew_s: float = Field(3600.0, description="clock_skew: seconds added to the device time.")

    @model_validator(mode="after")
    def _asset_once(self) -> FaultSpec:
        if self.asset is not None and self.count != 1:
            raise ValueError("asset names one asset: count must be 1")
        return self


class Scenario(_Spec):
    name: str = Field("scenario", description="Name, for the report.")
    description: str = Field("", description="What the scenario exercises.")
    seed: int | None = Field(None, description="Random seed (default: simulator.seed).")
    duration_s: float | None = Field(None, gt=0, description="Run time.")
    warmup_s: float = Field(
        60.0, ge=0, description="Drawn start times come after this (detectors warm up first)."
    )
    fleet: FleetSpec = Field(default_factory=FleetSpec, description="The fleet.")
    rates: RatesSpec = Field(default_factory=RatesSpec, description="Rates and delivery.")
    injections: list[InjectionSpec] = Field(default_factory=list, description="Anomalies.")
    faults: list[FaultSpec] = Field(default_factory=list, description="Faults.")

    def apply(self, sim: SimulatorSettings) -> SimulatorSettings:
        """The simulator settings with this scenario's fleet, rates, seed and duration."""
        data = sim.model_dump()
        data.update(self.fleet.model_dump(exclude_none=True))
        data.update(self.rates.model_dump(exclude_none=True))
        data.update({k: v for k, v in (("seed", self.seed), ("duration_s", self.duration_s))
                     if v is not None})  # fmt: skip
        return SimulatorSettings.model_validate(data)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; ConfigError lists every problem with its YAML path."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read: {exc.strerror}")], source) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem("", f"not valid YAML: {exc}")], source) from exc
    if not isinstance(raw, dict):
        raise ConfigError([ConfigProblem("", "the top level must be a mapping")], source)
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(problems_from(exc), source) from exc


@dataclass(frozen=True, slots=True)
class Event:
    """One planned injection: an anomaly (ground truth for scoring) or a fault."""

    ident: int
    category: Literal["anomaly", "fault"]
    kind: str
    index: int  # global asset index
    start_s: float
    end_s: float  # == start_s for a one-message fault
    value: int | None  # index into the asset's class values
    magnitude: float
    skew_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The event for a child process (and back: `Event(**d)`)."""
        return {name: getattr(self, name) for name in self.__slots__}


def _default_magnitude(kind: str, value: str, noise: float, normal_high: float) -> float:
    if kind == "spike":
        return SPIKE.get(value, 30 * noise)
    if kind == "drift":
        return DRIFT.get(value, 40 * noise)
    if kind == "out_of_range":
        return OUT_OF_RANGE.get(value, normal_high + 20 * noise)
    return 0.0


def plan(scenario: Scenario, sim: SimulatorSettings) -> list[Event]:
    """Every injection of the scenario on an asset and a time (sim: after `apply`)."""
    rng = random.Random(sim.seed * 1_000_003 + STREAM_PLAN)
    duration = sim.duration_s
    warmup = min(scenario.warmup_s, duration / 4)
    specs: list[InjectionSpec | FaultSpec] = [*scenario.injections, *scenario.faults]
    wanted = sum(s.count for s in specs if s.asset is None)
    pool = rng.sample(range(sim.assets), min(sim.assets, wanted))
    problems: list[ConfigProblem] = []

    def draw_asset(named: str | None, where: str) -> int:
        if named is not None:
            index = asset_index(named)
            if index is None or index >= sim.assets:
                problems.append(ConfigProblem(where, f"{named} is not in a fleet of {sim.assets}"))
                return 0
            return index
        return pool.pop() if pool else rng.randrange(sim.assets)

    def draw_start(start: float | None, length: float, where: str) -> float:
        if start is None:
            return rng.uniform(warmup, max(warmup, duration - length))
        if start + length > duration:
            problems.append(ConfigProblem(where, f"ends after the run's {duration:g} s"))
        return start

    events: list[Event] = []
    for i, spec in enumerate(scenario.injections):
        length = spec.duration_s or min(DURATION_S[spec.kind], duration / 2)
        for _ in range(spec.count):
            index = draw_asset(spec.asset, f"injections[{i}].asset")
            asset_class = CLASSES[CLASS_NAMES[class_of(sim.seed, index, sim.classes)]]
            value: int | None = None
            if spec.kind != "dropout":
                names = asset_class.value_names
                name = spec.value or rng.choice([n for n in names if n in WATCHED])
                value = asset_class.value_index(name)
                if value is None:
                    problems.append(ConfigProblem(
                        f"injections[{i}].value",
                        f"{asset_id(index)} is a {asset_class.name}: values {', '.join(names)}",
                    ))  # fmt: skip
                    continue
            start = draw_start(spec.start_s, length, f"injections[{i}].start_s")
            model = asset_class.values[value] if value is not None else None
            magnitude = spec.magnitude
            if magnitude is None and model is not None:
                magnitude = _default_magnitude(spec.kind, model.name, model.noise, model.normal[1])
            events.append(Event(len(events), "anomaly", spec.kind, index, start, start + length,
                                value, magnitude or 0.0))  # fmt: skip
    for i, fault in enumerate(scenario.faults):
        length = fault.duration_s if fault.kind == "clock_skew" else 0.0
        # A one-message fault applies to the asset's first message at or after its time: drawn
        # two intervals before the end, there always is one.
        room = max(length, 2.0 / sim.rate_hz) if fault.at_s is None else length
        for _ in range(fault.count):
            index = draw_asset(fault.asset, f"faults[{i}].asset")
            start = draw_start(fault.at_s, room, f"faults[{i}].at_s")
            events.append(Event(len(events), "fault", fault.kind, index, start, start + length,
                                None, 0.0, fault.skew_s if fault.kind == "clock_skew" else 0.0))  # fmt: skip
    if problems:
        raise ConfigError(problems, scenario.name)
    return sorted(events, key=lambda e: (e.start_s, e.ident))


def bundled(name: str) -> Path:
    """A scenario shipped in `simulators/scenarios/` by name (`standard`, `smoke`)."""
    return Path(__file__).with_name("scenarios") / f"{name}.yaml"
