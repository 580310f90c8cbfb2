"""Locust load shapes for `simulators/locustfile.py`: add one file to `-f`
(`-f simulators/locustfile.py,simulators/shapes/step_ramp.py`)."""
