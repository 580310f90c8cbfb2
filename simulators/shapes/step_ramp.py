"""A step ramp: `--ramp-step-users` more users every `--ramp-step-s` seconds, `--ramp-steps`
times, then the test stops. With MqttFleetUser each user is `--devices-per-user` devices, so a
step of 10 users at 100 devices and 1 Hz adds 1,000 msg/s: where the achieved rate stops
following the steps, or the PUBACK percentiles bend, is the pipeline's knee.

    locust -f simulators/locustfile.py,simulators/shapes/step_ramp.py --headless \\
        --host mqtt://127.0.0.1:1883 MqttFleetUser
"""

from __future__ import annotations

from typing import Any

from locust import LoadTestShape, events


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    parser.add_argument("--ramp-step-users", type=int, default=10, help="Users added per step.")
    parser.add_argument("--ramp-step-s", type=float, default=30.0, help="Seconds per step.")
    parser.add_argument("--ramp-steps", type=int, default=5, help="Steps before the test stops.")


class StepRampShape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        users = int(getattr(options, "ramp_step_users", 10))
        step_s = float(getattr(options, "ramp_step_s", 30.0))
        steps = int(getattr(options, "ramp_steps", 5))
        step = int(self.get_run_time() // step_s)
        if step >= steps:
            return None
        # Each step's users start within its first second.
        return (step + 1) * users, float(max(users, 1))
