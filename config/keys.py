"""Redis key names: the one place that builds them. Every other module imports from here.

Keys are built from configured names only (prefix, route, group), never from a raw topic level.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix (default `iotbridge`)."""

    prefix: str = "iotbridge"

    def telemetry(self, route: str) -> str:
        """Telemetry stream of a route: `iotbridge:tel:<route>`."""
        return f"{self.prefix}:tel:{route}"

    def dedup(self, route: str) -> str:
        """Per-asset dedup state of a route (a hash, one field per asset)."""
        return f"{self.prefix}:dedup:{route}"

    def bridge_subscriptions(self, client_id: str) -> str:
        """The filters a bridge's persistent session was last subscribed to (JSON list)."""
        return f"{self.prefix}:bridge:{client_id}:filters"

    @property
    def dead_letters(self) -> str:
        """Dead letters of the bridge: `iotbridge:dlq`."""
        return f"{self.prefix}:dlq"

    @property
    def worker_dead_letters(self) -> str:
        """Poison entries a worker gave up on: `iotbridge:dlq:worker`."""
        return f"{self.prefix}:dlq:worker"

    @property
    def anomalies(self) -> str:
        """Anomaly flags: `iotbridge:anomalies`."""
        return f"{self.prefix}:anomalies"
