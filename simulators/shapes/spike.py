"""A spike: `--spike-base-users` users, then `--spike-peak-users` for `--spike-s` seconds from
`--spike-at-s`, then the base again until `--spike-total-s`, when the test stops. A shift change
or a plant coming back online after an outage: does the bridge absorb the burst (PUBACK latency,
E2E latency and missing messages while it lasts) and come back to the base without a backlog?

    locust -f simulators/locustfile.py,simulators/shapes/spike.py --headless \\
        --host mqtt://127.0.0.1:1883 MqttFleetUser TelemetryProbeUser
"""

from __future__ import annotations

from typing import Any

from locust import LoadTestShape, events


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--spike-base-users", type=int, default=5, help="Users before and after.")
    parser.add_argument("--spike-peak-users", type=int, default=30, help="Users during the spike.")
    parser.add_argument("--spike-at-s", type=float, default=60.0, help="When the spike starts.")
    parser.add_argument("--spike-s", type=float, default=30.0, help="How long the spike lasts.")
    parser.add_argument("--spike-total-s", type=float, default=180.0, help="When the test stops.")


class SpikeShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        base = int(getattr(options, "spike_base_users", 5))
        peak = int(getattr(options, "spike_peak_users", 30))
        at_s = float(getattr(options, "spike_at_s", 60.0))
        spike_s = float(getattr(options, "spike_s", 30.0))
        total_s = float(getattr(options, "spike_total_s", 180.0))
        now = self.get_run_time()
        if now >= total_s:
            return None
        users = peak if at_s <= now < at_s + spike_s else base
        # All at once: a spike that ramps is a step.
        return users, float(max(peak, 1))
