"""The detectors, one module each, and the configured checks built from
`worker.detectors`: threshold, deviation, rate, flatline, staleness, sequence_gap.

A check is one rule of one detector (`workers.detectors.base.Check`); `workers.state` decides which
checks apply to an asset and holds their state.
"""

from __future__ import annotations

from config.settings import DetectorSettings
from workers.detectors.base import Check
from workers.detectors.deviation import DeviationCheck
from workers.detectors.flatline import FlatlineCheck
from workers.detectors.rate import RateCheck
from workers.detectors.sequence_gap import SequenceGapCheck
from workers.detectors.staleness import StalenessCheck
from workers.detectors.threshold import ThresholdCheck

__all__ = ["Check", "build_checks"]


def build_checks(settings: DetectorSettings) -> list[Check]:
    """Every configured rule as a check, in a fixed detector order, so events come out in the
    same order on every worker."""
    return [
        *(ThresholdCheck(rule) for rule in settings.threshold),
        *(DeviationCheck(rule) for rule in settings.deviation),
        *(RateCheck(rule) for rule in settings.rate),
        *(FlatlineCheck(rule) for rule in settings.flatline),
        *(StalenessCheck(rule) for rule in settings.staleness),
        *(SequenceGapCheck(rule) for rule in settings.sequence_gap),
    ]
