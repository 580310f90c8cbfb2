"""Virtual assets: where each one sits in the plant, its topic, and the samples it publishes.

A sample is a pure function of (seed, asset index, seq): the random numbers come from a keyed hash
of those three, not from a stateful generator. So a run repeats message for message, adding assets
never changes the samples of the others, and a fleet of 100K assets keeps no generator state
(a `random.Random` holds 2.5 KB, which is 250 MB at that size).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass

from config.settings import RouteSettings, SimulatorSettings

# Normal operating ranges. Values are clamped into them, so only injected anomalies cross the
# default threshold rules (temperature max 90, vibration max 8).
NORMAL_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (40.0, 70.0),
    "vibration": (1.0, 4.0),
    "pressure": (2.0, 6.0),
}
# Injected anomalies: (value name, low, high), each well past its threshold so detection is certain.
ANOMALIES: tuple[tuple[str, float, float], ...] = (
    ("temperature", 96.0, 110.0),
    ("vibration", 10.5, 15.0),
)
# Standard deviation of the per-sample noise, by value.
NOISE: dict[str, float] = {"temperature": 0.6, "vibration": 0.15, "pressure": 0.08}
# Temperature follows a slow cycle (load changes) of this many samples, amplitude in degrees.
CYCLE_SAMPLES = 600
CYCLE_AMPLITUDE = 3.0
# Level filled into any named topic level other than site, line and asset, and into a final '#'.
FILLER = "x"

_SCALE = 2.0**-64  # maps a 64-bit integer to [0, 1)


def _uniforms(seed: int, index: int, seq: int, domain: bytes) -> tuple[float, ...]:
    """Eight independent uniforms in [0, 1), determined by the arguments alone."""
    key = f"{seed}:{index}:{seq}".encode()
    digest = hashlib.blake2b(key, digest_size=64, person=domain).digest()
    return tuple(value * _SCALE for value in struct.unpack("<8Q", digest))


def _normals(u1: float, u2: float) -> tuple[float, float]:
    """Box-Muller: two standard normals from two uniforms (1 - u1 keeps log() away from 0)."""
    radius = math.sqrt(-2.0 * math.log(1.0 - u1))
    return radius * math.cos(2 * math.pi * u2), radius * math.sin(2 * math.pi * u2)


def asset_id(index: int) -> str:
    """`a000001` for index 0: fixed width, so ids sort in fleet order."""
    return f"a{index + 1:06d}"


def topic_for(route: RouteSettings, *, site: str, line: str, asset: str) -> str:
    """The route's topic template filled for one asset (the asset id goes to `asset_level`)."""
    fields = dict.fromkeys(route.level_names, FILLER)
    fields.update(site=site, line=line)
    fields[route.asset_level] = asset
    levels = route.topic.format(**fields).split("/")
    if levels[-1] == "#":  # a filter may end in '#'; a published topic may not contain it
        levels[-1] = FILLER
    return "/".join(levels)


@dataclass(frozen=True, slots=True)
class Asset:
    """One virtual asset and its operating point (the centre its readings move around)."""

    index: int
    asset_id: str
    site: str
    line: str
    topic: str
    base: tuple[float, float, float]  # temperature, vibration, pressure
    phase: float


@dataclass(frozen=True, slots=True)
class Sample:
    values: dict[str, float]
    anomaly: str | None  # the value made out of range, or None: the ground truth of the message


def make_asset(settings: SimulatorSettings, route: RouteSettings, index: int) -> Asset:
    """Assets go round-robin over sites, then over lines, so every line gets its share."""
    site = f"s{index % settings.sites + 1}"
    line = f"l{(index // settings.sites) % settings.lines + 1}"
    name = asset_id(index)
    u = _uniforms(settings.seed, index, 0, b"iotbridge-asset")
    # Operating points sit in the middle of the normal range, leaving room for cycle and noise.
    base = (48.0 + 14.0 * u[0], 1.8 + 1.2 * u[1], 3.2 + 1.6 * u[2])
    return Asset(
        index=index,
        asset_id=name,
        site=site,
        line=line,
        topic=topic_for(route, site=site, line=line, asset=name),
        base=base,
        phase=2 * math.pi * u[3],
    )


def sample(asset: Asset, seed: int, seq: int, anomaly_rate: float) -> Sample:
    """The readings of `asset` at `seq`: operating point, slow cycle, noise, maybe one anomaly."""
    u = _uniforms(seed, asset.index, seq, b"iotbridge-sample")
    n0, n1 = _normals(u[0], u[1])
    n2, _ = _normals(u[2], u[3])
    cycle = CYCLE_AMPLITUDE * math.sin(2 * math.pi * seq / CYCLE_SAMPLES + asset.phase)
    raw = {
        "temperature": asset.base[0] + cycle + NOISE["temperature"] * n0,
        "vibration": asset.base[1] + NOISE["vibration"] * n1,
        "pressure": asset.base[2] + NOISE["pressure"] * n2,
    }
    values = {
        name: round(min(max(value, NORMAL_RANGES[name][0]), NORMAL_RANGES[name][1]), 3)
        for name, value in raw.items()
    }
    anomaly = None
    if u[4] < anomaly_rate:
        anomaly, low, high = ANOMALIES[int(u[5] * len(ANOMALIES))]
        values[anomaly] = round(low + (high - low) * u[6], 3)
    return Sample(values, anomaly)


def encode_payload(ts: float, seq: int, values: dict[str, float]) -> bytes:
    """The default route's JSON contract, compact: no spaces, ts to the microsecond."""
    return json.dumps(
        {"ts": round(ts, 6), "seq": seq, "values": values}, separators=(",", ":")
    ).encode()


class Fleet:
    """All assets of a run, built once from the settings and the first route."""

    def __init__(self, settings: SimulatorSettings, route: RouteSettings) -> None:
        self._seed = settings.seed
        self._anomaly_rate = settings.anomaly_rate
        self.assets = [make_asset(settings, route, index) for index in range(settings.assets)]

    def message(self, index: int, seq: int, ts: float) -> tuple[str, bytes, str | None]:
        """(topic, payload, injected anomaly or None) of message `seq` of asset `index`."""
        asset = self.assets[index]
        drawn = sample(asset, self._seed, seq, self._anomaly_rate)
        return asset.topic, encode_payload(ts, seq, drawn.values), drawn.anomaly
