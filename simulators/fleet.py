"""Virtual assets: where each one sits in the plant, its class, its topic and its readings.

A reading is a pure function of (seed, asset index, message number k): the random numbers come
from a keyed 64-bit mix of those three, looked up in a table of Gaussian noise drawn once from the
seed, never from a stateful generator. So a run repeats message for message, adding assets never
changes the others, and the fleet keeps no generator per asset (a `random.Random` holds 2.5 KB:
250 MB at 100K assets). Per-asset state lives in typed arrays, not objects: about 60 bytes per
asset here plus its topic string.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Mapping

from config.settings import AssetClassName, RouteSettings, SimulatorSettings
from simulators.models import CLASS_NAMES, CLASSES, DAY_S, MAX_VALUES, AssetClass, payload_template

# Level filled into any named topic level other than site, line and asset, and into a final '#'.
FILLER = "x"
MASK = (1 << 64) - 1
NOISE_TABLE_BITS = 16  # 65,536 standard normals (512 KB), indexed by 16 bits of the mix
_NOISE_MASK = (1 << NOISE_TABLE_BITS) - 1
_GOLDEN = 0.6180339887498949  # offsets i * golden mod 1 spread any number of assets evenly
_U53 = 2.0**-53

# Independent random streams per purpose, so a new use never shifts the others.
STREAM_SAMPLE, STREAM_ASSET, STREAM_EXTRA, STREAM_PLAN = 1, 2, 3, 4


def mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def key(seed: int, stream: int, index: int, k: int = 0) -> int:
    """64 random bits determined by (seed, stream, asset index, k) alone."""
    return mix64(
        (seed * 0xA0761D6478BD642F + stream * 0xE7037ED1A0B428DB + index * 0x9E3779B97F4A7C15
         + k * 0xD1B54A32D192ED03) & MASK
    )  # fmt: skip


def uniform(bits: int) -> float:
    """[0, 1) from 64 random bits."""
    return (bits >> 11) * _U53


def asset_id(index: int) -> str:
    """`a000001` for index 0: fixed width, so ids sort in fleet order."""
    return f"a{index + 1:06d}"


def asset_index(name: str) -> int | None:
    """The index of `a000001`-style ids, None for anything else."""
    if len(name) < 2 or name[0] != "a" or not name[1:].isdigit():
        return None
    return int(name[1:]) - 1


def topic_for(route: RouteSettings, *, site: str, line: str, asset: str) -> str:
    """The route's topic template filled for one asset (the asset id goes to `asset_level`)."""
    fields = dict.fromkeys(route.level_names, FILLER)
    fields.update(site=site, line=line)
    fields[route.asset_level] = asset
    levels = route.topic.format(**fields).split("/")
    if levels[-1] == "#":  # a filter may end in '#'; a published topic may not contain it
        levels[-1] = FILLER
    return "/".join(levels)


def messages_per_asset(duration_s: float, rate_hz: float) -> int:
    """Messages per asset: the whole intervals in the duration, and at least one. (0.3 * 10
    comes out as 2.9999999999999996: the epsilon absorbs that.)"""
    return max(1, math.floor(duration_s * rate_hz + 1e-9))


def class_of(seed: int, index: int, shares: Mapping[AssetClassName, float]) -> int:
    """Index into CLASS_NAMES of an asset's class, drawn by its share of the fleet."""
    weights = [float(shares.get(name, 0.0)) for name in CLASS_NAMES]  # type: ignore[call-overload]
    u = uniform(key(seed, STREAM_ASSET, index, 99)) * sum(weights)
    chosen = 0
    for position, share in enumerate(weights):
        if share > 0:
            chosen = position
            if u < share:
                return position
            u -= share
    return chosen  # rounding at the very top of the range


def noise_table(seed: int) -> array[float]:
    rng = random.Random(seed)
    return array("d", (rng.gauss(0.0, 1.0) for _ in range(1 << NOISE_TABLE_BITS)))


class Fleet:
    """The assets `first .. first + count - 1` of a run (a process's share of the fleet)."""

    def __init__(
        self,
        settings: SimulatorSettings,
        route: RouteSettings,
        first: int = 0,
        count: int | None = None,
    ) -> None:
        self.seed = settings.seed
        self.first = first
        self.count = settings.assets - first if count is None else count
        self.interval_s = 1.0 / settings.rate_hz
        self.jitter = settings.jitter
        self.anomaly_rate = settings.anomaly_rate
        self.classes: list[AssetClass] = [CLASSES[name] for name in CLASS_NAMES]
        self.templates = [payload_template(c) for c in self.classes]
        self._noise = noise_table(settings.seed)
        n, width = self.count, MAX_VALUES
        self.class_index = array("B", bytes(n))
        self.base = array("d", bytes(8 * n * width))
        self.phase = array("d", bytes(8 * n))
        self.wear = array("d", bytes(8 * n))
        self.offset = array("d", bytes(8 * n))
        self.topics: list[str] = []
        for local in range(n):
            index = first + local
            c = class_of(self.seed, index, settings.classes)
            self.class_index[local] = c
            bits = key(self.seed, STREAM_ASSET, index)
            for v, model in enumerate(self.classes[c].values):
                u = uniform(key(self.seed, STREAM_ASSET, index, v + 1))
                self.base[local * width + v] = model.base[0] + (model.base[1] - model.base[0]) * u
            self.phase[local] = 2 * math.pi * uniform(bits)
            self.wear[local] = 0.5 + uniform(mix64(bits))
            self.offset[local] = (index * _GOLDEN) % 1.0 * self.interval_s
            site = f"s{index % settings.sites + 1}"
            line = f"l{(index // settings.sites) % settings.lines + 1}"
            self.topics.append(topic_for(route, site=site, line=line, asset=asset_id(index)))

    def asset_class(self, local: int) -> AssetClass:
        return self.classes[self.class_index[local]]

    def nominal_s(self, local: int, k: int) -> float:
        """When message k of an asset is due, in seconds after the start, before jitter."""
        return self.offset[local] + k * self.interval_s

    def due_s(self, local: int, k: int) -> float:
        """Message k's due time with its jitter (always within half an interval, so in order)."""
        nominal = self.offset[local] + k * self.interval_s
        if not self.jitter:
            return nominal
        u = uniform(key(self.seed, STREAM_EXTRA, self.first + local, k))
        return max(0.0, nominal + (2.0 * u - 1.0) * self.jitter * self.interval_s)

    def per_asset(self, duration_s: float) -> int:
        return messages_per_asset(duration_s, 1.0 / self.interval_s)

    def values(self, local: int, k: int) -> list[float]:
        """The normal readings of message k of an asset (before any injection)."""
        c = self.class_index[local]
        models = self.classes[c].values
        t = self.offset[local] + k * self.interval_s
        cycle = math.sin(2 * math.pi * t / DAY_S + self.phase[local])
        age_days = t / DAY_S * self.wear[local]
        bits = key(self.seed, STREAM_SAMPLE, self.first + local, k)
        noise = self._noise
        row = local * MAX_VALUES
        out = []
        for v, m in enumerate(models):
            value = (
                self.base[row + v] + m.daily * cycle + m.wear_per_day * age_days
                + m.noise * noise[(bits >> (16 * v)) & _NOISE_MASK]
            )  # fmt: skip
            low, high = m.normal
            out.append(low if value < low else high if value > high else value)
        return out

    def random_anomaly(self, local: int, k: int) -> int | None:
        """The value index made out of range at message k (`anomaly_rate`), or None."""
        if not self.anomaly_rate:
            return None
        bits = key(self.seed, STREAM_SAMPLE + 100, self.first + local, k)
        if uniform(bits) >= self.anomaly_rate:
            return None
        asset_class = self.asset_class(local)
        vibration = asset_class.value_index("vibration")
        if vibration is not None and bits & 1:
            return vibration
        return asset_class.value_index("temperature") or 0

    def encode(self, local: int, ts: float, seq: int, values: list[float]) -> bytes:
        return self.templates[self.class_index[local]] % (ts, seq, *values)
