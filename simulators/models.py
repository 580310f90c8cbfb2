"""Asset classes and their signal model: what a motor, a pump, a press and an oven report.

Each value of a class moves around a per-asset base level with a daily cycle, Gaussian noise and
slow wear, clamped into its normal range. The normal ranges sit inside the default detector rules
of `config/settings.yaml` (temperature at most 90, vibration at most 8, rate-of-change and
deviation bounds), so a fleet without injections raises no flag; an oven is a low-temperature
curing oven for the same reason. Every class reports `temperature`, so every asset is watched by
the default threshold, deviation, rate and flatline rules.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class ValueModel:
    """One reading of a class. Units are for people; the payload carries numbers only."""

    name: str
    unit: str
    base: tuple[float, float]  # per-asset base level drawn uniformly from this range
    daily: float  # amplitude of the 24 h cycle (load, ambient)
    noise: float  # standard deviation of the per-sample noise
    wear_per_day: float  # drift of the base per simulated day (bearing wear, fouling)
    normal: tuple[float, float]  # clamp: never outside without an injection
    decimals: int  # resolution in the payload; well below the noise, so no reading repeats


@dataclass(frozen=True, slots=True)
class AssetClass:
    name: str
    values: tuple[ValueModel, ...]

    def value_index(self, name: str) -> int | None:
        for index, model in enumerate(self.values):
            if model.name == name:
                return index
        return None

    @property
    def value_names(self) -> tuple[str, ...]:
        return tuple(model.name for model in self.values)


def _v(
    name: str,
    unit: str,
    base: tuple[float, float],
    daily: float,
    noise: float,
    wear: float,
    normal: tuple[float, float],
    decimals: int = 2,
) -> ValueModel:
    return ValueModel(name, unit, base, daily, noise, wear, normal, decimals)


# The order of the classes and of their values is part of the seeded output: append, never reorder.
CLASSES: dict[str, AssetClass] = {
    "motor": AssetClass("motor", (
        _v("temperature", "degC", (52.0, 62.0), 3.0, 0.5, 0.4, (35.0, 75.0)),
        _v("vibration", "mm/s", (1.8, 2.8), 0.2, 0.12, 0.02, (0.5, 5.0), 3),
        _v("current", "A", (12.0, 28.0), 1.5, 0.3, 0.05, (2.0, 40.0)),
    )),
    "pump": AssetClass("pump", (
        _v("temperature", "degC", (38.0, 48.0), 2.5, 0.4, 0.2, (20.0, 65.0)),
        _v("pressure", "bar", (3.2, 4.8), 0.2, 0.06, -0.01, (1.5, 6.5), 3),
        _v("flow", "m3/h", (25.0, 55.0), 4.0, 0.6, -0.1, (5.0, 80.0)),
        _v("vibration", "mm/s", (1.4, 2.4), 0.15, 0.1, 0.02, (0.5, 4.5), 3),
    )),
    "press": AssetClass("press", (
        _v("temperature", "degC", (34.0, 44.0), 2.0, 0.4, 0.1, (20.0, 60.0)),
        _v("vibration", "mm/s", (3.2, 4.6), 0.3, 0.2, 0.03, (1.5, 6.5), 3),
        _v("force", "kN", (300.0, 480.0), 15.0, 4.0, 0.0, (150.0, 600.0), 1),
    )),
    "oven": AssetClass("oven", (
        _v("temperature", "degC", (68.0, 76.0), 2.0, 0.3, 0.05, (55.0, 82.0)),
        _v("humidity", "%", (18.0, 30.0), 3.0, 0.5, 0.0, (5.0, 50.0), 1),
        _v("power", "kW", (30.0, 60.0), 5.0, 0.8, 0.0, (10.0, 90.0), 1),
    )),
}  # fmt: skip
CLASS_NAMES: tuple[str, ...] = tuple(CLASSES)
MAX_VALUES = max(len(c.values) for c in CLASSES.values())

# Values the default detector rules watch; injections without a named value pick one of these.
WATCHED = ("temperature", "vibration", "pressure")


def payload_template(asset_class: AssetClass) -> bytes:
    """The class's payload as a bytes %-template: ts, seq, then one number per value.

    Formatting one template is about ten times cheaper than building a dict and json.dumps."""
    values = ",".join(f'"{m.name}":%.{m.decimals}f' for m in asset_class.values)
    return ('{"ts":%.6f,"seq":%d,"values":{' + values + "}}").encode()
