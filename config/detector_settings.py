"""Settings of the worker's detectors: one list of rules per detector."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from config.sections import Name, Section

Severity = Literal["info", "warning", "critical"]


class DetectorRule(Section):
    """Where a rule applies. Per detector (and value), the first rule in the list that matches
    a sample's route and asset wins, so a specific pattern goes before a catch-all."""

    route: Name | None = Field(None, description="Route the rule applies to; null: every route.")
    assets: str = Field(
        "*", min_length=1, description="fnmatch pattern on the asset id (e.g. `oven-*`)."
    )
    severity: Severity = Field("warning", description="Severity of the events it raises.")


class ValueRule(DetectorRule):
    value: Name = Field(description="Value name in the payload's `values`.")


class ThresholdRule(ValueRule):
    min: float | None = Field(None, description="Flag values below this bound.")
    max: float | None = Field(None, description="Flag values above this bound.")
    hysteresis: float = Field(
        0.0,
        ge=0,
        description="Absolute margin, in the value's unit: a flagged value must come back this far "
        "inside the bound to end the anomaly, so a value hovering at a bound is one flag.",
    )

    @model_validator(mode="after")
    def _some_bound(self) -> ThresholdRule:
        if self.min is None and self.max is None:
            raise ValueError("set min, max or both")
        if self.min is not None and self.max is not None:
            if self.min >= self.max:
                raise ValueError("min must be < max")
            if 2 * self.hysteresis >= self.max - self.min:
                raise ValueError("hysteresis must be less than half of max - min")
        return self


class DeviationRule(ValueRule):
    alpha: float = Field(
        0.02,
        gt=0,
        le=1,
        description="EWMA weight of a new sample (about 2/alpha samples of memory).",
    )
    z_max: float = Field(6.0, gt=0, description="Flag when |value - mean| / std exceeds this.")
    z_clear: float = Field(3.0, ge=0, description="End the anomaly when |z| is back at or below.")
    warmup_samples: int = Field(
        30, ge=2, description="Samples per asset and value before anything is flagged."
    )
    min_std: float = Field(
        0.0, ge=0, description="Floor of the std, so a very steady value does not flag noise."
    )

    @model_validator(mode="after")
    def _clear_below_max(self) -> DeviationRule:
        if self.z_clear >= self.z_max:
            raise ValueError("z_clear must be < z_max")
        return self


class RateRule(ValueRule):
    max_per_s: float = Field(gt=0, description="Flag when |dv/dt| (device time) exceeds this.")
    min_dt_s: float = Field(
        1.0,
        gt=0,
        description="Floor of dt: at high sample rates, sample noise must not read as a fast change.",
    )


class FlatlineRule(ValueRule):
    epsilon: float = Field(1e-9, ge=0, description="Largest change that still counts as unchanged.")
    samples: int = Field(30, ge=2, description="Flag after this many unchanged samples ...")
    duration_s: float | None = Field(
        None,
        gt=0,
        description="... or after this long unchanged (device time); null: samples only.",
    )


class StalenessRule(DetectorRule):
    silent_s: float = Field(
        60.0, gt=0, description="Flag an asset that sent nothing for this long (stream time)."
    )


class SequenceGapRule(DetectorRule):
    reorder_window: int = Field(
        8,
        ge=1,
        le=52,
        description="A missing seq is lost once a seq this far above it arrived; until then a "
        "late sample fills the hole. A seq this far behind the highest is a device restart.",
    )


def _default_thresholds() -> list[ThresholdRule]:
    return [
        ThresholdRule(
            value="temperature", min=-20.0, max=90.0, hysteresis=1.0, severity="critical"
        ),
        ThresholdRule(value="vibration", max=8.0, hysteresis=0.2),
    ]


def _default_deviation() -> list[DeviationRule]:
    return [
        DeviationRule(value="temperature", min_std=0.2),
        DeviationRule(value="vibration", min_std=0.05),
        DeviationRule(value="pressure", min_std=0.05),
    ]


def _default_rate() -> list[RateRule]:
    return [
        RateRule(value="temperature", max_per_s=10.0),
        RateRule(value="vibration", max_per_s=3.0),
        RateRule(value="pressure", max_per_s=1.5),
    ]


def _default_flatline() -> list[FlatlineRule]:
    return [FlatlineRule(value=name) for name in ("temperature", "vibration", "pressure")]


class DetectorSettings(Section):
    threshold: list[ThresholdRule] = Field(
        default_factory=_default_thresholds, description="Static bounds, with hysteresis."
    )
    deviation: list[DeviationRule] = Field(
        default_factory=_default_deviation, description="EWMA mean and variance: flag |z| > z_max."
    )
    rate: list[RateRule] = Field(
        default_factory=_default_rate, description="Rate of change: flag |dv/dt| > max_per_s."
    )
    flatline: list[FlatlineRule] = Field(
        default_factory=_default_flatline, description="A value stuck at one reading."
    )
    staleness: list[StalenessRule] = Field(
        default_factory=lambda: [StalenessRule()], description="An asset gone silent."
    )
    sequence_gap: list[SequenceGapRule] = Field(
        default_factory=lambda: [SequenceGapRule(severity="info")],
        description="`seq` jumps: samples lost before the broker (a restart to 0 is not a gap).",
    )
    tick_s: float = Field(
        1.0, gt=0, le=60, description="How often time-driven detectors (staleness) are checked."
    )
